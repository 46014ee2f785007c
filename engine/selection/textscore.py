"""Question-to-visual-token relevance from the language model, for `pyramid` and `budget`.

Both LRS-VQA (text-guided coarse-to-fine pruning) and UHR-BAT (budget-aware selection) rank
visual tokens by how strongly the text attends to them inside the LM, with contextualised states:
the query of the last text token after LM layers (LRS-VQA through a pruning module holding copies
of LM layers). Running the LM over tens of thousands of visual tokens is exactly the cost we want
to avoid, so we use a cheaper proxy, deliberately, and it is **not** their score: the attention
logits of the LM's **first decoder layer**, over every token of the question. It sees the words
of the question, not what the LM makes of the whole prompt, so its ranking can differ from theirs.

What we compute, precisely:

1. the question is tokenised (the tokenizer comes from the strategy's `tokenizer` parameter,
   else `model.tokenizer`, else the tokenizer files in the local checkpoint directory the model
   was loaded from, `model.name_or_path`; a list of token ids is also accepted) and embedded with `embed_text`;
   every token of it counts (`last_n` keeps only the last ones). These are the first layer's
   inputs, word embeddings that carry no context yet, so a tail of the question would be judged
   by its last words only (and a benchmark prompt, whose tail is the same answer instruction for
   every item, would rank the tokens alike for every question). Callers pass the question, not
   the whole prompt: `AskRequest.selection_text` (eval: the question and its options, without
   the answer instruction);
2. text and visual embeddings (visual = features through the projector) pass that layer's
   `input_layernorm` (RMSNorm), then its `q_proj` (text) and `k_proj` (visual), reshaped into
   heads (grouped KV heads repeated to match the query heads);
3. logits q.k / sqrt(head_dim) (no rotary position: the relevance should not depend on where a
   token would sit in the sequence), softmax over **all** candidate visual tokens per head and
   text token, then the mean over heads and text tokens.

The result is a distribution over the candidates (sums to 1): the share of the question's
first-layer attention each visual token would receive. The model may be wrapped by peft (a LoRA
adapter): the first layer is looked up under the wrapper, its LoRA weights applied. Without a
decoder layer (a stub model, which has no `model.layers` at all) the fallback is the softmax of
cosine similarity between the mean question embedding and each visual embedding.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import torch

from engine.selection.base import SelectionError

DEFAULT_LAST_N: int | None = None  # every token of the question
# text tokens x heads x visual tokens of one chunk's logits (float32): 16M, 64 MiB
LOGITS_PER_CHUNK = 2**24


def question_ids(model: Any, question, tokenizer: Any = None) -> torch.Tensor:
    """Token ids of the question (a string, or already a sequence of ids)."""
    if isinstance(question, torch.Tensor):
        return question.reshape(-1).long()
    if isinstance(question, (list, tuple)):
        return torch.as_tensor(question, dtype=torch.long)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        tok = _tokenizer_from_checkpoint(getattr(model, "name_or_path", None))
    if tok is None:
        raise SelectionError(
            "This text-guided strategy needs the model's tokenizer to read the question; "
            "pass tokenizer=... to the strategy or set model.tokenizer."
        )
    from engine.prompt import encode_text

    ids = encode_text(tok, str(question))  # as the prompt reads it: control-token spellings are text
    if not ids:
        raise SelectionError("The question is empty after tokenisation.")
    return torch.as_tensor(ids, dtype=torch.long)


@lru_cache(maxsize=4)
def _tokenizer_from_checkpoint(path: str | None):
    """The tokenizer saved next to a local checkpoint (the loader's `from_pretrained` dir)."""
    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception:  # no tokenizer files there: the caller explains what to pass
        return None


def _first_layer(model: Any):
    """The LM's first decoder layer, under a peft wrapper too (whose `.model` is the wrapped
    LlavaQwenForCausalLM, not the decoder); None for a model with no decoder layers (a stub).
    A model that has a `model` part without reachable layers is refused, not scored another way."""
    from engine.loader import base_model

    model = base_model(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        if inner is not None and hasattr(model, "config"):
            raise SelectionError("The text-guided strategy found no decoder layers in this model "
                                 f"({type(model).__name__}); it cannot score the question.")
        return None
    if len(layers) == 0:
        return None
    return layers[0]


class TextScorer:
    """Scores projected visual tokens against one question (see module docstring)."""

    def __init__(self, model: Any, question, tokenizer: Any = None,
                 last_n: int | None = DEFAULT_LAST_N) -> None:
        self.model = model
        ids = question_ids(model, question, tokenizer)
        if last_n:
            ids = ids[-int(last_n):]
        with torch.no_grad():
            self.text = model.embed_text(ids)
        self.layer = _first_layer(model)
        if self.layer is not None:
            attn = self.layer.self_attn
            cfg = getattr(model, "config", None)
            self.n_heads = int(getattr(cfg, "num_attention_heads"))
            self.n_kv = int(getattr(cfg, "num_key_value_heads", self.n_heads) or self.n_heads)
            self.hd = int(getattr(attn, "head_dim", 0) or cfg.hidden_size // self.n_heads)
            with torch.no_grad():
                q = attn.q_proj(self.layer.input_layernorm(self.text))
            self.q = q.reshape(q.shape[0], self.n_heads, self.hd)

    def chunk_size(self, chunk: int) -> int:
        """Visual tokens a chunk: at most `chunk`, fewer for a long question (its logits are
        text tokens x heads x visual tokens)."""
        rows = int(self.text.shape[0]) * (self.n_heads if self.layer is not None else 1)
        return min(int(chunk), max(256, LOGITS_PER_CHUNK // max(1, rows)))

    def keys(self, embeds: torch.Tensor) -> torch.Tensor:
        attn = self.layer.self_attn
        x = embeds.to(device=self.text.device, dtype=self.text.dtype)
        k = attn.k_proj(self.layer.input_layernorm(x)).reshape(x.shape[0], self.n_kv, self.hd)
        return k.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def _logits(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            t = torch.nn.functional.normalize(self.text.float().mean(0), dim=0)
            v = torch.nn.functional.normalize(embeds.float().to(t.device), dim=-1)
            return (v @ t)[None, None]
        k = self.keys(embeds)
        return torch.einsum("lhd,nhd->lhn", self.q.float(), k.float()) / math.sqrt(self.hd)

    def __call__(self, embeds: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(N, H) projected visual tokens -> (N,) relevance on the CPU, summing to 1."""
        if embeds.shape[0] == 0:
            return torch.zeros(0)
        with torch.no_grad():
            logits = torch.cat([self._logits(c) for c in torch.split(embeds, self.chunk_size(chunk))], -1)
            return torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()

    def score_features(self, vectors: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Like calling the scorer on ``model.project(vectors)``, projecting chunk by chunk so
        the projected tokens of a whole 8K image never sit in memory at once."""
        if vectors.shape[0] == 0:
            return torch.zeros(0)
        with torch.no_grad():
            logits = torch.cat([self._logits(self.model.project(c))
                                for c in torch.split(vectors, self.chunk_size(chunk))], -1)
            return torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()


def make_scorer(model: Any, question, tokenizer: Any = None, scorer=None,
                last_n: int | None = DEFAULT_LAST_N):
    """The scorer to use: an explicit callable (tests) or a TextScorer on the model."""
    if scorer is not None:
        return scorer
    return TextScorer(model, question, tokenizer, last_n)


def score_vectors(score_fn, model: Any, vectors: torch.Tensor) -> torch.Tensor:
    """Relevance of raw vision vectors: projected chunk-wise by a TextScorer, else projected
    at once (no model: unchanged) and passed to the plain callable."""
    if isinstance(score_fn, TextScorer):
        return score_fn.score_features(vectors)
    from engine.selection.common import project

    return score_fn(project(model, vectors))
