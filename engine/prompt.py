"""The ``qwen_1_5`` ChatML prompt of GeoLLaVA-8K / LongVA and the ``<image>`` split.

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n
    {question}<|im_end|>\n<|im_start|>assistant\n

The text is split at ``<image>`` before tokenising (the original code puts index -200 there);
the visual token embeddings go between the two pieces. The answer ends at ``<|im_end|>``.

Only the template's own markers become control tokens: text a user or a dataset supplies (the
question, a training answer) is tokenised with :func:`encode_text`, so ``<|im_end|>``,
``<|im_start|>`` or ``<|endoftext|>`` typed in a question stay plain text and cannot end the
user's turn, open a system turn or stop the prompt.
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


def encode_template(tokenizer, text: str) -> list[int]:
    """Ids of the template's own text: its ``<|im_start|>`` / ``<|im_end|>`` are control tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of text a user or a dataset supplies: a control token's spelling in it is plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids) if text else []


def split_prompt(tokenizer, question: str, *, system: str = SYSTEM_PROMPT, image: bool = True) -> PromptPieces:
    """Tokenise the prompt around the single ``<image>`` placeholder (no BOS is added); the
    question with :func:`encode_text`, the rest with :func:`encode_template`."""
    text = chat_prompt(question, system=system, image=image)
    q = question.replace(IMAGE_PLACEHOLDER, "").strip()
    head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    end = f"{STOP_TOKEN}\n<|im_start|>assistant\n"
    if image:
        before = encode_template(tokenizer, head)
        after = encode_text(tokenizer, f"\n{q}") + encode_template(tokenizer, end)
    else:
        before = encode_template(tokenizer, head) + encode_text(tokenizer, q) + encode_template(tokenizer, end)
        after = []
    return PromptPieces(before=before, after=after, text=text)


def stop_token_ids(tokenizer) -> set[int]:
    """Ids that end the answer: ``<|im_end|>``, ``<|endoftext|>`` and the tokenizer's eos."""
    ids: set[int] = set()
    for tok in (STOP_TOKEN, EOS_TOKEN, getattr(tokenizer, "eos_token", None)):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
                ids.add(i)
    return ids
