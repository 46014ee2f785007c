"""One conversation sample as `finetune`'s training inputs: token ids with answer labels
(`encode_conversation`), its visual tokens (`default_visual_fn`), the embedded sequence
(`build_training_inputs`) and the loss on its answers (`answer_loss`).

Visual tokens
    Every sample's image goes through the same path as inference (raster read, anyres tiling,
    CLIP, the chosen ``--strategy`` / ``--budget``), so the model is trained on exactly the
    tokens it will see, as GeoLLaVA-8K trained with its pruning active. The vision side is
    frozen, so it runs without gradients.
Loss
    Labels are -100 everywhere except the assistant answers (each answer's tokens and its
    closing ``<|im_end|>``), for every assistant turn of a multi-turn conversation. The output
    head runs only on those positions (`answer_loss`), so long visual prefixes cost no logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from engine.data import Sample, strip_image_token
from engine.loader import base_model

IGNORE = -100
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class EncodedConversation:
    before: list[int]  # token ids before the image (all prompt: label -100)
    after: list[int]  # token ids after the image
    after_labels: list[int]  # labels for `after` (-100 except assistant answers + <|im_end|>)

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.after_labels if x != IGNORE)


def encode_conversation(tokenizer, sample: Sample, system: str | None = None) -> EncodedConversation:
    """ChatML (qwen_1_5) ids of a whole conversation, split at `<image>`, with answer labels.

    Layout: system turn, then for each exchange ``<|im_start|>user\\n{q}<|im_end|>\\n
    <|im_start|>assistant\\n{a}<|im_end|>\\n``; the first user turn is written with ``<image>\\n``
    first (as inference's prompt does), and only ``{a}<|im_end|>`` carries labels. The questions
    and answers are the data's text (``encode_text``: a control token's spelling in them is plain
    text, as in a question asked); the markers around them are the template's."""
    from engine.prompt import encode_template, encode_text

    def enc(s: str) -> list[int]:
        return encode_template(tokenizer, s)

    def text(s: str) -> list[int]:
        return encode_text(tokenizer, s)

    sys_text = system if system is not None else (sample.system or SYSTEM_PROMPT)
    before = enc(f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n")
    after: list[int] = []
    labels: list[int] = []
    first = True
    for turn in sample.turns:
        if turn.role == "user":
            q = turn.text
            if first:
                q = "\n" + strip_image_token(q)  # "<image>" goes between before and after
                first = False
                ids = text(q) + enc("<|im_end|>\n<|im_start|>assistant\n")
            else:
                ids = enc("<|im_start|>user\n") + text(q.strip()) + enc("<|im_end|>\n<|im_start|>assistant\n")
            after += ids
            labels += [IGNORE] * len(ids)
        else:
            ans = text(turn.text.strip()) + enc("<|im_end|>")
            after += ans
            labels += ans
            nl = enc("\n")
            after += nl
            labels += [IGNORE] * len(nl)
    return EncodedConversation(before=before, after=after, after_labels=labels)


def build_training_inputs(model, enc: EncodedConversation, visual):
    """(inputs_embeds (1, L, H), labels (1, L), attention_mask (1, L)) for one conversation;
    the visual embeddings (N, H) sit between the two text pieces with label -100."""
    import torch  # noqa: PLC0415

    base = base_model(model)
    emb = base.get_input_embeddings()
    dev = emb.weight.device
    parts = [emb(torch.tensor(enc.before, dtype=torch.long, device=dev))]
    n_vis = 0
    if visual is not None and visual.numel():
        parts.append(visual.to(device=dev, dtype=emb.weight.dtype))
        n_vis = int(visual.shape[0])
    parts.append(emb(torch.tensor(enc.after, dtype=torch.long, device=dev)))
    embeds = torch.cat(parts, 0).unsqueeze(0)
    labels = [IGNORE] * (len(enc.before) + n_vis) + list(enc.after_labels)
    labels_t = torch.tensor(labels, dtype=torch.long, device=dev).unsqueeze(0)
    mask = torch.ones_like(labels_t)
    return embeds, labels_t, mask


def answer_loss(model, inputs_embeds, labels, attention_mask=None):
    """Mean cross-entropy over the labelled (answer) positions, the same value as the causal-LM
    loss of `model(..., labels=labels)`, but the output head runs only on those positions: the
    full (L x vocab) logits of a 14K-token sequence would take ~8 GB in float32."""
    import torch.nn.functional as F  # noqa: PLC0415

    base = base_model(model)
    hidden = base.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    head = base.lm_head
    h = hidden[:, :-1][keep]
    logits = head(h.to(head.weight.dtype))  # float32 norms hand on float32 to a bf16 head
    return F.cross_entropy(logits.float(), target[keep])


def default_visual_fn(model, *, strategy: str, budget: int | None, tokens_per_tile: int | None = None,
                      seed: int = 0, tokenizer=None, faithful_empty_slots: bool = False,
                      bands: Sequence[int] | None = None) -> Callable[[Sample], Any]:
    """A function sample -> visual embeddings (N, H) built by `engine.pipeline.prepare_visual`
    (the very path `ask` uses: raster read, anyres tiling, CLIP, the strategy), without
    gradients. The question given to text-guided strategies is the first user turn. The bands
    read are the sample's own (its record's "bands", else --bands, `engine.data`), else `bands`,
    else the engine's default choice, as `ask` makes it.

    The model runs in eval mode while the tokens are built (train mode is restored after): the
    text-guided strategies (`pyramid`, `budget`) score the image through the first decoder
    layer's q/k projections, which carry LoRA, and LoRA dropout in train mode would pick other
    tokens on every pass than `ask` (eval mode) picks."""
    import torch  # noqa: PLC0415

    from engine.pipeline import prepare_visual  # noqa: PLC0415

    base = base_model(model)

    def fn(sample: Sample):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                vis = prepare_visual(base, str(sample.image), sample.first_question, strategy=strategy,
                                     budget=budget, tokens_per_tile=tokens_per_tile, seed=seed,
                                     bands=getattr(sample, "bands", None) or (list(bands) if bands else None),
                                     tokenizer=tokenizer, faithful_empty_slots=faithful_empty_slots)
        finally:
            if was_training:
                model.train()
        return vis.selection.embeds.detach()

    return fn
