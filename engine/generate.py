"""Streaming text generation from ``inputs_embeds`` with a KV cache.

``stream_generate`` returns a ``TextStream``: iterate it to receive text pieces as they decode
(multi-byte characters split over several byte-level tokens are held back until complete);
afterwards ``stream.result`` holds the full text, token counts and timings. Decoding is greedy by
default (sampling optional), with the checkpoint's repetition penalty on the tokens generated so far
(as transformers' ``generate`` applies it, sampling or not), stops at ``<|im_end|>`` / eos or ``max_new_tokens``, checks a
``threading.Event`` before every step (raising ``Cancelled``), and restricts logits to the
tokenizer's size (the embedding matrix has extra rows). A prompt longer than the model's context
(``tokenizer_model_max_length``, 32768) raises ``ContextTooLong`` instead of being truncated.

An image prefix can be prefilled once (``prefill_prefix``) and reused across questions: pass
``prefix=`` and the full ``inputs_embeds``; only the part after the prefix is run, and the cache
is cropped back to the prefix afterwards so the next question can reuse it (one user at a time).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from engine.errors import Cancelled, ContextTooLong, OutOfMemory, is_oom
from engine.prompt import stop_token_ids


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    n_prompt_tokens: int = 0  # positions in inputs_embeds (visual + text)
    n_new_tokens: int = 0
    prefill_s: float = 0.0  # time to first token
    generate_s: float = 0.0  # first token -> last token
    stopped: str = ""  # 'stop' | 'length' | 'cancelled'
    peak_memory_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        n = max(self.n_new_tokens - 1, 0)
        return n / self.generate_s if self.generate_s > 0 else 0.0


@dataclass
class PrefixCache:
    """KV cache of the first ``length`` positions of a prompt (e.g. system + image)."""

    cache: object  # transformers DynamicCache
    length: int
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@torch.no_grad()
def prefill_prefix(model, prefix_embeds: torch.Tensor) -> PrefixCache:
    """Run the LM over ``prefix_embeds`` (1, P, H) and keep its KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    p = int(prefix_embeds.shape[1])
    model(
        inputs_embeds=prefix_embeds,
        past_key_values=cache,
        use_cache=True,
        cache_position=torch.arange(p, device=prefix_embeds.device),
        logits_to_keep=1,
    )
    return PrefixCache(cache=cache, length=p)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces whose concatenation equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``; holds back an incomplete character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # wait for the rest of a multi-byte character
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self._decode()
        if text.startswith(self.emitted):
            piece = text[len(self.emitted) :]
        else:  # cannot happen with byte-level BPE; keep the stream consistent anyway
            piece = ""
            text = self.emitted
        self.emitted = text
        return piece


class TextStream:
    """Iterator over text pieces; ``result`` is complete once iteration ends."""

    def __init__(self, gen: Iterator[str], result: GenerationResult) -> None:
        self._gen = gen
        self.result = result

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def close(self) -> None:
        """Stop early (releases a shared prefix cache)."""
        self._gen.close()

    def text(self) -> str:
        """Consume the stream and return the full answer."""
        for _ in self._gen:
            pass
        return self.result.text


def stream_generate(
    model,
    tokenizer,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    cancel: threading.Event | None = None,
    prefix: PrefixCache | None = None,
    vocab_limit: int | None = None,
    stop_ids: set[int] | None = None,
    repetition_penalty: float = 1.0,
) -> TextStream:
    """Generate from ``inputs_embeds`` (1, L, H); see the module docstring."""
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError("inputs_embeds must have shape (1, L, H)")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if prefix is not None and not 0 < prefix.length < inputs_embeds.shape[1]:
        raise ValueError("the prefix must be shorter than the prompt")
    n_prompt = int(inputs_embeds.shape[1])
    limit = check_context(model, n_prompt)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - n_prompt)
    result = GenerationResult(n_prompt_tokens=n_prompt)
    gen = _run(
        model,
        tokenizer,
        inputs_embeds,
        result,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        cancel=cancel,
        prefix=prefix,
        vocab_limit=vocab_limit or len(tokenizer),
        stop_ids=stop_ids if stop_ids is not None else stop_token_ids(tokenizer),
        repetition_penalty=repetition_penalty,
    )
    return TextStream(gen, result)


def context_limit(model) -> int | None:
    """Longest sequence the model reads: ``tokenizer_model_max_length`` (32768 for the release,
    the length the original code truncates to), else ``max_position_embeddings``."""
    cfg = getattr(model, "config", None)
    for name in ("tokenizer_model_max_length", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model, n_prompt: int) -> int | None:
    """Raise ContextTooLong when a prompt of `n_prompt` positions leaves the model no room to
    answer; return the model's context limit (None when it has none)."""
    limit = context_limit(model)
    if limit is not None and n_prompt >= limit:
        raise ContextTooLong(n_prompt, limit)
    return limit


def generate_text(model, tokenizer, inputs_embeds: torch.Tensor, **kwargs) -> GenerationResult:
    """Non-streaming convenience wrapper around ``stream_generate``."""
    stream = stream_generate(model, tokenizer, inputs_embeds, **kwargs)
    stream.text()
    return stream.result


def penalize_repetition(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """``logits`` with the tokens in ``seen`` made less likely (transformers'
    RepetitionPenaltyLogitsProcessor): a positive logit divided by ``penalty``, a negative one
    multiplied by it."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> int:
    if not do_sample or temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


def _run(
    model,
    tokenizer,
    embeds,
    result: GenerationResult,
    *,
    max_new_tokens,
    do_sample,
    temperature,
    top_p,
    seed,
    cancel,
    prefix,
    vocab_limit,
    stop_ids,
    repetition_penalty=1.0,
) -> Iterator[str]:
    from transformers import DynamicCache

    device = embeds.device
    embed_layer = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(int(seed)) if do_sample and seed is not None else None
    decoder = IncrementalDecoder(tokenizer)
    reset_peak_memory(device)
    lock = prefix.lock if prefix is not None else None
    if lock is not None:
        lock.acquire()
    t0 = time.perf_counter()
    t_first = None
    try:
        if prefix is not None:
            cache = prefix.cache
            start = prefix.length
        else:
            cache = DynamicCache()
            start = 0
        x = embeds[:, start:]
        pos = start
        for step in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                result.stopped = "cancelled"
                raise Cancelled("the question was cancelled while the answer was being written")
            n = int(x.shape[1])
            with torch.no_grad():
                out = model(
                    inputs_embeds=x,
                    past_key_values=cache,
                    use_cache=True,
                    cache_position=torch.arange(pos, pos + n, device=device),
                    logits_to_keep=1,
                )
            pos += n
            logits = penalize_repetition(out.logits[0, -1, :vocab_limit].float(), result.token_ids,
                                         repetition_penalty)
            token = _pick(logits, do_sample, temperature, top_p, gen)
            if t_first is None:
                t_first = time.perf_counter()
                result.prefill_s = t_first - t0
            if token in stop_ids:
                result.stopped = "stop"
                break
            result.token_ids.append(token)
            result.n_new_tokens = len(result.token_ids)
            piece = decoder.push(token)
            result.text = decoder.emitted
            if piece:
                yield piece
            if step + 1 == max_new_tokens:
                result.stopped = "length"
                break
            x = embed_layer(torch.tensor([[token]], device=embed_layer.weight.device)).to(embeds.dtype)
        tail = decoder.flush()
        result.text = decoder.emitted
        if tail:
            yield tail
    except Exception as exc:
        if is_oom(exc):
            raise OutOfMemory("generating the answer", exc) from exc
        raise
    finally:
        end = time.perf_counter()
        if t_first is not None:
            result.generate_s = end - t_first
        result.n_new_tokens = len(result.token_ids)
        result.peak_memory_bytes = peak_memory_bytes(device)
        if prefix is not None:
            prefix.cache.crop(prefix.length)
        if lock is not None:
            lock.release()


def reset_peak_memory(device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_bytes(device="cpu") -> int | None:
    """CUDA max_memory_allocated on a GPU; the process's peak RSS on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except Exception:
        return None
