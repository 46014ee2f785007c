"""Prompts for `python -m engine eval`: the text each item is asked with, and which items are not asked.

Prompt (multiple choice): each benchmark's official prompt, reproduced exactly. xlrs: lmms-eval's
xlrs-lite layout (the question, "The choices are listed below:", one "(A) text" line an option, a
blank line, the instruction ending in the cue line "The answer is:"; the multi-label subtask has
its own instruction, ending "The answer(s) is(are):"). mme: MME-RealWorld's (the question, " The
choices are listed below: ", the option lines, its instruction, the cue line "The best answer
is:"). generic: the question + " The choices are listed below:", the option lines and our
instruction to answer with the letter(s). `--instruction` replaces the instruction (and cue).
The instruction never depends on the answer. Greedy decoding, at most each benchmark's official
number of new tokens (`MAX_NEW_TOKENS`: 128 for lrsvqa, 64 for the others) unless
`--max-new-tokens` sets one for every item.
"""

from __future__ import annotations

from engine.eval_items import LETTERS, EvalItem

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly. If several options are correct, give all their letters."
# The official prompts, reproduced exactly (interface facts: the scores are only comparable with
# the published tables when the model is asked the same thing).
# XLRS-Bench(-lite): lmms-eval, lmms_eval/tasks/xlrs/mcq_utils.py (xlrs_doc_to_text): the question,
# this header glued to it, the "(A) ..." lines, a blank line, then the instruction; the
# multi-label subtask has its own instruction (its cue follows "spaces." on the same line there).
XLRS_CHOICES_HEADER = "The choices are listed below:\n"
XLRS_INSTRUCTION = ("Select the best answer for the multiple-choice question based on the image. Only respond "
                    "with the letter corresponding to the correct answer (A, B, C, D).\nThe answer is:")
XLRS_MULTI_INSTRUCTION = ("Select the best answer(s) for the multiple-choice question based on the image. There "
                          "may be more than one correct option. Only respond with the letter(s) corresponding "
                          "to the correct answer(s) (A, B, C, D), with multiple choices separated by spaces."
                          "The answer(s) is(are):")
# MME-RealWorld(-RS): yfzhang114/MME-RealWorld, evaluation/model_vqa_mme_real_world.py (also run by
# VisionXLab/LRS-VQA's eval_mme-realworld-rs.sh): the question, this header, one "(A) ..." line an
# option, the default --test-prompt, then the cue line.
MME_CHOICES_HEADER = " The choices are listed below: \n"
MME_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. "
                   "Respond with only the letter (A, B, C, D, or E) of the correct option.")
MME_CUE = "\nThe best answer is:"
CHOICES_HEADER = " The choices are listed below:"  # the generic layout (ours)

# The most new tokens an item's reply may have, per format: each benchmark's official generation
# setting (a reply cut shorter than the official one can lose the words it is judged on).
# xlrs: lmms-eval, lmms_eval/tasks/xlrs/XLRS-lite.yaml (generation_kwargs max_new_tokens 64).
# mme: MME-RealWorld, evaluation/model_vqa_mme_real_world.py (--max_new_tokens default 64), the
#   script whose prompt is reproduced above (lmms-eval's own mmerealworld task generates 16).
# lrsvqa: VisionXLab/LRS-VQA, Script/llava_eval_LRSVQA.py, the inference script its README names
#   (--max_new_tokens default 128; eval_LRS_VQA_multiprocess.sh keeps it).
# generic: ours.
MAX_NEW_TOKENS = {"xlrs": 64, "mme": 64, "lrsvqa": 128, "generic": 64}

# An item about several images (XLRS-Bench's change detection: two dates) is not asked: the engine
# answers about one raster, and asked about the first image alone the item would be scored on a
# question the model could not see. Recorded with this reason and counted apart from the figures.
SKIP_IMAGES = "needs {n} images; the engine answers about one"


def skip_reason(item: EvalItem) -> str | None:
    """Why `item` is not asked (several images), or None."""
    n = len(item.extra.get("images") or ())
    return SKIP_IMAGES.format(n=n) if n > 1 else None


def max_new_tokens(item: EvalItem, override: int | None = None) -> int:
    """The most new tokens `item`'s reply is generated with: `override` (--max-new-tokens) when
    given, else its format's official number (MAX_NEW_TOKENS)."""
    if override is not None:
        return override
    return MAX_NEW_TOKENS.get(item.extra.get("format") or "generic", MAX_NEW_TOKENS["generic"])


def max_new_tokens_setting(items: list[EvalItem], override: int | None = None) -> str:
    """The new-token cap of a run as its settings record it: `override`, else the one cap its
    items' formats share ("64"), else each format's ("lrsvqa=128, xlrs=64")."""
    if override is not None:
        return str(override)
    caps = {item.extra.get("format") or "generic": max_new_tokens(item) for item in items}
    if len(set(caps.values())) <= 1:
        return str(next(iter(caps.values()), MAX_NEW_TOKENS["generic"]))
    return ", ".join(f"{fmt}={cap}" for fmt, cap in sorted(caps.items()))


def selection_text(item: EvalItem) -> str:
    """What the question-guided strategies score the image against: the question and its options
    (which name what to look for), not the answer instruction the prompt ends with."""
    return "\n".join([item.question.strip(), *(str(opt) for opt in item.options)])


def build_prompt(item: EvalItem, instruction: str | None = None) -> str:
    """The question text that goes after `<image>\\n` in the user turn."""
    if not item.multiple_choice:
        q = item.question.strip()
        if "single word" in q.lower() or "short phrase" in q.lower():
            return q  # the file already carries its answer instruction
        return q + "\nAnswer the question using a single word or phrase."
    fmt = item.extra.get("format")
    options = [f"({LETTERS[k]}) {opt}" for k, opt in enumerate(item.options)]
    if fmt == "xlrs":  # lmms-eval's xlrs-lite layout; --instruction replaces instruction and cue
        post = instruction if instruction is not None else (
            XLRS_MULTI_INSTRUCTION if item.extra.get("multi_label") else XLRS_INSTRUCTION)
        return item.question + XLRS_CHOICES_HEADER + "\n".join(options) + "\n\n" + post
    if fmt == "mme":  # MME-RealWorld's layout; --instruction replaces instruction and cue
        post = instruction if instruction is not None else MME_INSTRUCTION + MME_CUE
        return item.question + MME_CHOICES_HEADER + "".join(o + "\n" for o in options) + post
    lines = [item.question.strip() + CHOICES_HEADER, *options]
    lines.append(MC_INSTRUCTION if instruction is None else instruction)
    return "\n".join(lines)
