"""The ``qwen_1_5`` ChatML prompt of GeoLLaVA-8K / LongVA and the ``<image>`` split.

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n
    {question}<|im_end|>\n<|im_start|>assistant\n

The text is split at ``<image>`` before tokenising (the original code puts index -200 there);
the visual token embeddings go between the two pieces. The answer ends at ``<|im_end|>``.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
STOP_TOKEN = "<|im_end|>"
EOS_TOKEN = "<|endoftext|>"


def chat_prompt(question: str, *, system: str = SYSTEM_PROMPT, image: bool = True) -> str:
    """The full prompt text, with the ``<image>`` placeholder on its own line before the
    question (as the training data puts it)."""
    q = question.replace(IMAGE_PLACEHOLDER, "").strip()
    user = f"{IMAGE_PLACEHOLDER}\n{q}" if image else q
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


@dataclass(frozen=True)
class PromptPieces:
    before: list[int]  # token ids before the image
    after: list[int]  # token ids after the image (question + assistant header)
    text: str  # the full prompt text (with the placeholder)


def split_prompt(tokenizer, question: str, *, system: str = SYSTEM_PROMPT, image: bool = True) -> PromptPieces:
    """Tokenise the prompt around the single ``<image>`` placeholder (no BOS is added)."""
    text = chat_prompt(question, system=system, image=image)
    if image:
        head, tail = text.split(IMAGE_PLACEHOLDER, 1)
    else:
        head, tail = text, ""
    enc = lambda s: list(tokenizer(s, add_special_tokens=False).input_ids) if s else []  # noqa: E731
    return PromptPieces(before=enc(head), after=enc(tail), text=text)


def stop_token_ids(tokenizer) -> set[int]:
    """Ids that end the answer: ``<|im_end|>``, ``<|endoftext|>`` and the tokenizer's eos."""
    ids: set[int] = set()
    for tok in (STOP_TOKEN, EOS_TOKEN, getattr(tokenizer, "eos_token", None)):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
                ids.add(i)
    return ids
