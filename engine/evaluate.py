"""Benchmark evaluation: XLRS-Bench(-lite), LRS-VQA, MME-RealWorld(-RS) and a generic layout.

Annotation files are local JSON lists or JSON Lines. Each format is a small adapter that turns a
record into an `EvalItem` (id, image, question, options, answer, category):

``mme``      MME-RealWorld / MME-RealWorld-RS (the public JSON): ``Question_id``, ``Image``,
             ``Text``, ``Answer choices`` (list of "(A) ..." strings), ``Ground truth`` (letter),
             category = ``Task/Subtask/Category`` as the official table counts them (the
             category lowercased, the "attribute" ones merged), so Perception and Reasoning
             "diagram" are two rows; without Task/Subtask, ``Category`` (else ``Subtask``).
``xlrs``     XLRS-Bench(-lite) as lmms-eval reads it: ``index``, ``image`` (path, or list; an item
             with several images, change detection's two dates, is skipped: not asked, recorded
             with the reason "needs 2 images; the engine answers about one" and counted apart),
             ``question``, ``multi-choice options`` (list of "(A) ..." strings; ``options`` /
             ``choices`` lists or VLMEvalKit columns ``A``..``H`` also work), ``answer`` one or
             several letters ("AC", "A C", "A,C"), ``category`` "Task/Subtask" (13 subtasks; the
             macro average runs over them, and task totals are reported too), ``l2-category``.
             Only the multi-label subtask (Overall Land use classification) is told that
             several letters may be correct.
``lrsvqa``   LRS-VQA question JSONL: ``question_id``, ``image``, ``text``, ``ground_truth``,
             ``category``; open-ended (no options). Ids ``PREFIX_n`` (FAIR / GLH-Bridge / STAR)
             are also reported per source dataset (per-category accuracy, OA, AA).
``generic``  any other file: ``--field key=source`` maps our keys (id, image, question, options,
             answer, category) to the file's names; without a mapping the common names above
             are tried in turn. Items with options are multiple choice, the rest open-ended.
``auto``     (default) picks a format from the first record's keys; with ``--field``, generic.

With an explicit ``--format mme|xlrs|lrsvqa``, ``--field`` points that format's fields at other
names and the format keeps its instruction (and xlrs its multi-label subtask).

A multiple-choice answer is option letters, an option's text or "(B) text" (`choice_answer`);
anything else (a letter outside the options, text no option has) is refused with the item named.

Prompt (multiple choice): each benchmark's official prompt, reproduced exactly. xlrs: lmms-eval's
xlrs-lite layout (the question, "The choices are listed below:", one "(A) text" line an option, a
blank line, the instruction ending in the cue line "The answer is:"; the multi-label subtask has
its own instruction, ending "The answer(s) is(are):"). mme: MME-RealWorld's (the question, " The
choices are listed below: ", the option lines, its instruction, the cue line "The best answer
is:"). generic: the question + " The choices are listed below:", the option lines and our
instruction to answer with the letter(s). `--instruction` replaces the instruction (and cue).
Greedy decoding, 64 new tokens. The instruction never depends on the answer.

Scoring: every reply is scored twice.
* official (the headline figure: ``prediction``/``correct`` in predictions.jsonl, the top level of
  results.json, the accuracy column of results.md): each benchmark's own rule, comparable with
  its published tables.
  xlrs (lmms-eval xlrs-lite): after deleting a few cue phrases ("The answer is", ...), no capital
  A-E means no letter; else the letters written "(X)"; else every a-e/A-E letter of the reply,
  inside words too ("Answer: B" is A, B, E); correct if that set equals the answer's.
  mme (MME-RealWorld eval_your_results.py): after deleting the same phrases, the first capital
  A-E, inside a word too ("Based on ..." is B; "C, D" is C); a reply of up to 10 words without
  one is the first "(A) text" choice containing it (an empty reply reads as A); more words, none.
  lrsvqa (evaluation_LRSVQA.py): the reply equals the answer once both are lowercased, or they
  share a WordNet synset (nltk, optional: without it exact matches only, and the results say so).
  generic files have no official rule: the lenient one.
* lenient (ours: ``lenient_prediction``/``lenient_correct``, results.json "lenient", the second
  column): for multiple choice, in order
  1. "The answer is B", "Answer: B, D", "answer: (b)", "The correct option is B" -> the letters
     right after the first such cue, up to the end of its sentence or the next word, so later
     words ("The answer is B. Option C is wrong", "B; the other choices (A, C, D) ...") do not
     add or replace letters; a bare "Option C" is not a cue;
  2. letters in the first sentence that has any, written as "(B)", "B.", "B)", "B:" or standing
     alone ("B", "B and D", "A, C"); a lowercase letter counts only in the "(b)"/"b." forms or
     when it is the whole reply; the English article "A" counts only if it stands alone or is
     followed by ".", ")" or ":";
  3. otherwise the option whose text appears in the reply (longest match first);
  correct only if the set of letters equals the answer's. Open-ended answers are compared after
  lowercasing and removing punctuation, articles and extra spaces (a number keeps its decimal
  point and minus sign); a yes/no answer also matches the reply's first word, a number a first
  word of equal value.

Results (both figures): micro accuracy (all items), macro accuracy (mean of per-category
accuracies), per-category counts, as JSON and a Markdown table; skipped items (several images)
are counted apart. Predictions are appended to a JSONL file as
they are made; a rerun skips item ids already there (resumable; their stored replies are scored
anew, so lines of older versions, without the lenient fields, get both) and asks failed items again,
whose new lines replace their error lines when the run ends (one line an item); `--limit N`
stops after N items.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.cli_args import add_model_arguments, add_strategy_arguments, positive_int
from engine.run_settings import (absolute_path, changed_settings, model_choice, resolve_tokens_per_tile,
                                 resolved_quantization, with_model_choice, with_resolved_quantization)

LETTERS = string.ascii_uppercase
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
# XLRS-Bench asks for several letters only in this subtask (multi-label land-use classes).
XLRS_MULTI_LABEL_CATEGORIES = ("Overall Land use classification",)
# MME-RealWorld(-RS): yfzhang114/MME-RealWorld, evaluation/model_vqa_mme_real_world.py (also run by
# VisionXLab/LRS-VQA's eval_mme-realworld-rs.sh): the question, this header, one "(A) ..." line an
# option, the default --test-prompt, then the cue line.
MME_CHOICES_HEADER = " The choices are listed below: \n"
MME_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. "
                   "Respond with only the letter (A, B, C, D, or E) of the correct option.")
MME_CUE = "\nThe best answer is:"
CHOICES_HEADER = " The choices are listed below:"  # the generic layout (ours)
FORMATS = ("auto", "xlrs", "mme", "lrsvqa", "generic")


ON_ERROR = ("stop", "skip")
# An item about several images (XLRS-Bench's change detection: two dates) is not asked: the engine
# answers about one raster, and asked about the first image alone the item would be scored on a
# question the model could not see. Recorded with this reason and counted apart from the figures.
SKIP_IMAGES = "needs {n} images; the engine answers about one"


class EvalError(ValueError):
    """The annotation file or an option cannot be used."""


@dataclass
class EvalItem:
    id: str
    image: str
    question: str
    options: list[str]  # option texts without their "(A)" prefix; empty = open-ended
    answer: str  # letters ("B", "AC") for multiple choice, text otherwise
    category: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


# ------------------------------------------------------------------------------------- formats

_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[\).:]\s*")


def _strip_option_prefix(text: str, k: int) -> str:
    m = _OPTION_PREFIX.match(text)
    if m and m.group(1).upper() == LETTERS[k]:
        return text[m.end():].strip()
    return text.strip()


def _options_from(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                value = [p for p in s.splitlines() if p.strip()]
        else:
            value = [p for p in s.splitlines() if p.strip()]
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    return [_strip_option_prefix(str(v), k) for k, v in enumerate(value)]


def _first(rec: dict, names: Iterable[str], default: Any = None) -> Any:
    for n in names:
        if n in rec and rec[n] is not None and rec[n] != "":
            return rec[n]
    return default


def _text(value: Any) -> str:
    """An open-ended answer as text: a missing one (None, absent) is "" (refused by load_items),
    not the text "None"."""
    return "" if value is None else str(value).strip()


def normalize_letters(answer: Any) -> str:
    """'A, C' / ['a','c'] / '(B)' -> sorted unique upper-case letters ('AC', 'B')."""
    if isinstance(answer, (list, tuple)):
        answer = ",".join(str(a) for a in answer)
    s = str(answer).strip()
    letters = re.findall(r"[A-Za-z]", re.sub(r"[\s,;/&()\.]|and", "", s))
    return "".join(sorted(set(x.upper() for x in letters)))


_LETTER_LIST = re.compile(r"\s*\(?[A-Za-z]\)?\.?(?:\s*(?:[,;/&]|\s|\band\b)\s*\(?[A-Za-z]\)?\.?)*\s*")


def choice_answer(answer: Any, options: list[str]) -> str:
    """The letters an annotation's answer names, checked against the item's options: letters
    ("B", "(b)", "A, C", "AC", ["A", "C"]), an option's text ("airport") or a letter with its
    text ("(B) airport"). Raises EvalError when the answer is none of these (a letter outside the
    options, text that is no option's), instead of scoring against letters it never meant."""
    if isinstance(answer, (list, tuple)):
        answer = ",".join(str(a) for a in answer)
    s = str(answer if answer is not None else "").strip()
    if not s:
        return ""
    allowed = LETTERS[: len(options)]
    norm = [_norm_text(o) for o in options]
    # an option's text, alone or after its own letter ("(B) airport", "B. airport")
    text = _norm_text(s)
    if norm.count(text) == 1:
        return allowed[norm.index(text)]
    m = _OPTION_PREFIX.match(s)
    if m and s[m.end():].strip():
        k = LETTERS.find(m.group(1).upper())
        if 0 <= k < len(options) and _norm_text(s[m.end():]) == norm[k]:
            return LETTERS[k]
        raise EvalError(f"its answer {s!r} names option {m.group(1).upper()} with other text than that "
                        f"option ({options[k]!r})" if 0 <= k < len(options) else
                        f"its answer {s!r} names a letter outside the options ({', '.join(allowed)})")
    # letters: one ("b", "(B)"), several separated ("A, C", "A and C") or written together ("AC")
    if _LETTER_LIST.fullmatch(s) or re.fullmatch(r"[A-Z]{2,}", s):
        letters = normalize_letters(s)
        outside = sorted(set(letters) - set(allowed))
        if outside:
            raise EvalError(f"its answer {s!r} names {', '.join(outside)}, not among the options "
                            f"({', '.join(allowed)})")
        return letters
    raise EvalError(f"its answer {s!r} is neither option letters ({', '.join(allowed)}) nor an option's text")


def mme_category(rec: dict) -> str:
    """An MME-RealWorld item's row, keyed as eval_your_results.py counts it: Task / Subtask /
    Category, the category lowercased and every "attribute" one merged into "<first part>/attribute";
    so Perception's "diagram" and Reasoning's are two rows. Without Task and Subtask, the category
    alone (else Subtask, else Task)."""
    cat = _first(rec, ["Category"])
    if cat is None:
        return str(_first(rec, ["Subtask", "Task"], "all"))
    cat = str(cat).lower()
    if "attribute" in cat:
        cat = cat.split("/")[0] + "/attribute"
    return "/".join([*(str(rec[k]) for k in ("Task", "Subtask") if rec.get(k)), cat])


def _item_mme(rec: dict, i: int) -> EvalItem:
    opts = _options_from(rec.get("Answer choices"))
    item = EvalItem(
        id=str(_first(rec, ["Question_id", "question_id", "index"], i)),
        image=str(rec.get("Image", "")),
        question=str(rec.get("Text", "")),
        options=opts,
        answer=choice_answer(rec.get("Ground truth", ""), opts) if opts else _text(rec.get("Ground truth")),
        category=mme_category(rec),
    )
    item.extra["format"] = "mme"
    return item


def _item_lrsvqa(rec: dict, i: int) -> EvalItem:
    item = EvalItem(
        id=str(_first(rec, ["question_id", "id"], i)),
        image=str(rec.get("image", "")),
        question=str(_first(rec, ["text", "question"], "")),
        options=[],
        answer=_text(_first(rec, ["ground_truth", "answer"], "")),
        category=str(rec.get("category", "all")),
    )
    item.extra["format"] = "lrsvqa"
    return item


GENERIC_NAMES = {
    "id": ["id", "index", "question_id", "Question_id", "qid"],
    "image": ["image", "image_path", "img", "Image", "image_file"],
    "question": ["question", "text", "Text", "prompt", "query"],
    "options": ["options", "choices", "multi-choice options", "Answer choices", "candidates"],
    "answer": ["answer", "ground_truth", "Ground truth", "label", "gt"],
    "category": ["category", "l2-category", "task", "subtask", "Category", "type"],
}


def _item_generic(rec: dict, i: int, mapping: dict[str, str] | None = None) -> EvalItem:
    mapping = mapping or {}

    def get(key: str, default: Any = None) -> Any:
        if key in mapping:
            return rec.get(mapping[key], default)
        return _first(rec, GENERIC_NAMES[key], default)

    opts = _options_from(get("options"))
    if not opts and "options" not in mapping:  # VLMEvalKit layout: one column a letter
        cols = []
        for L in LETTERS:
            v = rec.get(L)
            if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "":
                break
            cols.append(str(v).strip())
        opts = cols
    ans = get("answer", "")
    image = get("image", "")
    extra: dict[str, Any] = {}
    if isinstance(image, list):
        if len(image) > 1:  # every image is kept: such an item is skipped, not asked about the first
            extra["images"] = [str(x) for x in image]
        image = image[0] if image else ""
    return EvalItem(
        id=str(get("id", i)),
        image=str(image),
        question=str(get("question", "")),
        options=opts,
        answer=choice_answer(ans, opts) if opts else _text(ans),
        category=str(get("category", "all")),
        extra=extra,
    )


def _item_xlrs(rec: dict, i: int, mapping: dict[str, str] | None = None) -> EvalItem:
    """XLRS-Bench(-lite): `index`, `question`, `multi-choice options` ("(A) ..." strings),
    `answer` (letters), `category` "Task/Subtask" (the macro average runs over subtasks),
    `l2-category`; the protocol asks for several letters in the multi-label subtask only."""
    item = _item_generic(rec, i, mapping)
    item.extra["format"] = "xlrs"
    item.extra["multi_label"] = any(c in item.category for c in XLRS_MULTI_LABEL_CATEGORIES)
    return item


def detect_format(rec: dict) -> str:
    if "Answer choices" in rec or "Ground truth" in rec:
        return "mme"
    if "ground_truth" in rec and "text" in rec and "question_id" in rec:
        return "lrsvqa"
    if "question" in rec and ("A" in rec or "options" in rec or "multi-choice options" in rec or "choices" in rec):
        return "xlrs"
    return "generic"


# the names the mme / lrsvqa adapters read for our keys: --field points them at other names
FORMAT_NAMES = {
    "mme": {"id": "Question_id", "image": "Image", "question": "Text", "options": "Answer choices",
            "answer": "Ground truth", "category": "Category"},
    "lrsvqa": {"id": "question_id", "image": "image", "question": "text", "answer": "ground_truth",
               "category": "category"},
}


def _remapped(rec: dict, fmt: str, mapping: dict[str, str]) -> dict:
    """`rec` with the fields --field names copied to the names format `fmt` reads."""
    out = dict(rec)
    for key, source in mapping.items():
        if key not in FORMAT_NAMES[fmt]:
            raise EvalError(f"--format {fmt} is open-ended: --field {key}= does not apply")
        out[FORMAT_NAMES[fmt][key]] = rec.get(source)
    return out


def parse_field_map(pairs: Iterable[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise EvalError(f"--field expects key=source, got {p!r}")
        k, v = p.split("=", 1)
        if k not in GENERIC_NAMES:
            raise EvalError(f"--field key {k!r} is not one of {', '.join(GENERIC_NAMES)}")
        out[k] = v
    return out


def _named(rec: dict, i: int, field_map: dict[str, str] | None) -> str:
    """An annotation as error messages name it: its position, and its id when it has one."""
    ident = _first(rec, [field_map["id"]] if field_map and "id" in field_map else GENERIC_NAMES["id"], None)
    return f"annotation {i}" + (f" (id {ident})" if ident is not None else "")


def load_items(path: str | Path, fmt: str = "auto", field_map: dict[str, str] | None = None) -> list[EvalItem]:
    """Read an annotation file (JSON list, {"data": [...]}, or JSONL) into EvalItems."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"The annotation file {p} does not exist.")
    text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    records: list[Any]
    try:
        obj = json.loads(text)  # a JSON list, or an object holding one
    except json.JSONDecodeError as whole:
        obj = []  # JSON Lines
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj.append(json.loads(line))
            except json.JSONDecodeError as exc:
                # each line is parsed alone, so json's own "line 1" is the file's line n; where not
                # even the first record parses, the file was more likely meant as one JSON text
                where = (f"line {n} column {exc.colno}: {exc.msg}" if obj else str(whole))
                raise EvalError(f"The annotation file {p} is neither JSON nor JSON Lines ({where}).") from exc
    if isinstance(obj, dict):
        records = next((obj[k] for k in ("data", "questions", "annotations") if isinstance(obj.get(k), list)), [obj])
    else:
        records = list(obj)
    if fmt not in FORMATS:
        raise EvalError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    items = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise EvalError(f"annotation {i} in {p} is not a JSON object")
        # --field maps fields on top of an explicit format (which keeps its instruction and, for
        # xlrs, its multi-label subtask); with --format auto it means the generic layout
        f = "generic" if fmt == "auto" and field_map else detect_format(rec) if fmt == "auto" else fmt
        try:
            if f == "mme":
                item = _item_mme(_remapped(rec, f, field_map) if field_map else rec, i)
            elif f == "lrsvqa":
                item = _item_lrsvqa(_remapped(rec, f, field_map) if field_map else rec, i)
            elif f == "xlrs":
                item = _item_xlrs(rec, i, field_map)
            else:
                item = _item_generic(rec, i, field_map)
        except EvalError as exc:  # an answer that names no option: say which item
            raise EvalError(f"{_named(rec, i, field_map)} in {p}: {exc}") from exc
        if not item.question:
            raise EvalError(f"annotation {i} in {p} has no question (format {f}); map it with --field question=NAME")
        # scored against an empty answer, an empty reply (a failed generation) would count as correct
        if not item.answer or (not item.multiple_choice and not _norm_text(item.answer)):
            what = ("options but no answer letter" if item.multiple_choice else
                    f"an answer with no words to compare ({item.answer!r})" if item.answer else "no answer")
            raise EvalError(f"{_named(rec, i, field_map)} in {p} has {what} (format {f}); if the file "
                            "holds it under another name, map it with --field answer=NAME")
        items.append(item)
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise EvalError(f"annotation id {it.id!r} appears twice in {p}; ids must be unique for resumable runs")
        seen.add(it.id)
    return items


# -------------------------------------------------------------------------------------- prompt

def skip_reason(item: EvalItem) -> str | None:
    """Why `item` is not asked (several images), or None."""
    n = len(item.extra.get("images") or ())
    return SKIP_IMAGES.format(n=n) if n > 1 else None


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


# ---------------------------------------------------------------------------------- extraction

# A cue that announces the chosen letters: "answer" in any form ("The answer is", "Answer:"), or
# "option"/"choice" when qualified ("the correct option") or followed by is/are/":" ("Options: A, C").
# A bare "Option C ..." is no cue: it is how a reply goes on to discuss the other options.
_CUE = re.compile(r"(?<![A-Za-z])(?:(?:the\s+)?(?:correct|best|final|right)\s+(?:answer|option|choice)s?"
                  r"|answers?|(?:options?|choices?)(?=\s*(?:is|are|:)))(?![A-Za-z])"
                  r"\s*(?:is|are|:)?\s*[:\-]?\s*", re.I)
# where the letters after a cue end: a sentence end, a semicolon, a new line
_CUE_END = re.compile(r"\.(?=\s|$)|[;!?\n]")
# the first word (2+ letters) after the letters, other than "and" / "or"
_WORD = re.compile(r"(?<![A-Za-z])(?!(?:and|or)(?![A-Za-z]))[A-Za-z]{2,}")
# a sentence end inside a line
_SENTENCE = re.compile(r"(?<=[.;!?])\s+")


def _letters_in(segment: str, n_options: int, whole_reply: bool) -> list[str]:
    valid = set(LETTERS[:n_options]) if n_options else set(LETTERS)
    found: list[str] = []
    # (B) / (b)
    for m in re.finditer(r"\(([A-Za-z])\)", segment):
        found.append(m.group(1).upper())
    # B. B) B: at word start (upper case; lower case only with . or ) )
    for m in re.finditer(r"(?<![A-Za-z(])([A-Z])[\.\):](?![A-Za-z])", segment):
        found.append(m.group(1))
    for m in re.finditer(r"(?<![A-Za-z(])([a-z])[\.\)](?![A-Za-z])", segment):
        if whole_reply and len(segment.strip()) <= 3:
            found.append(m.group(1).upper())
    # bare capital letters standing alone ("B", "B and D", "A, C"); "A" as an article is
    # excluded when followed by a lowercase word
    for m in re.finditer(r"(?<![A-Za-z(])([A-Z])(?![A-Za-z\.\):])", segment):
        L = m.group(1)
        rest = segment[m.end():]
        if L in ("A", "I") and re.match(r"\s+[a-z]", rest) and not re.match(r"\s+(and|or)\b", rest):
            continue  # the article "A" / pronoun "I" starting a sentence
        found.append(L)
    if whole_reply and not found and re.fullmatch(r"\s*([a-z])\s*", segment):
        found.append(segment.strip().upper())
    if whole_reply and not found and re.fullmatch(r"\s*[A-Z]{2,8}\s*", segment):
        found.extend(segment.strip())  # "AC": several letters written together
    return [x for x in found if x in valid]


def extract_letters(reply: str, options: list[str] | None = None) -> str:
    """Letters a reply chooses, as a sorted string ('' when none can be found)."""
    n = len(options or [])
    text = reply.strip()
    if not text:
        return ""
    # 1. an explicit cue: the letters right after the first "answer is" / "Answer:" that names
    #    any, up to the end of that sentence or the first word that follows them, so that
    #    "The answer is B. Option C is wrong ..." stays B
    for m in _CUE.finditer(text):
        seg = _CUE_END.split(text[m.end():], maxsplit=1)[0]
        w = _WORD.search(seg)
        if w:  # keep that word: it tells the article in "A large harbour" from the letter A
            seg = seg[:w.end()]
        got = _letters_in(seg, n, whole_reply=len(seg.strip()) <= 3)
        if got:
            return "".join(sorted(set(got)))
    # 2. letter forms in the first sentence that has any ("B. Option D would ..." -> B)
    for line in text.splitlines():
        for sentence in _SENTENCE.split(line):
            got = _letters_in(sentence, n, whole_reply=(sentence.strip() == text))
            if got:
                return "".join(sorted(set(got)))
    # 3. option text inside the reply
    if options:
        low = f" {_norm_text(text)} "
        hits = sorted(((len(_norm_text(o)), k) for k, o in enumerate(options)
                       if _norm_text(o) and f" {_norm_text(o)} " in low), reverse=True)
        if hits:
            return LETTERS[hits[0][1]]
    return ""


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# The number words of counting answers, read as digits (as VQA's answer normalisation does).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def _norm_text(s: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed; a number keeps its decimal
    point and its minus sign ("3.5", "-5"), which are not punctuation there, loses its thousands
    separators ("1,000" is "1000"), and a number word up to twenty is its digits ("three" is "3")."""
    s = s.lower()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = re.sub(r"(?<=\d)\.(?=\d)", "\x00", s)  # decimal point
    s = re.sub(r"(?<![\w.])-(?=\d)", "\x01", s)  # minus sign (not the hyphen of "covid-19")
    s = "".join(ch if ch not in string.punctuation else " " for ch in s)
    s = s.replace("\x00", ".").replace("\x01", "-")
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split())


def score_lenient(item: EvalItem, reply: str) -> tuple[str, bool]:
    """Our lenient reading: (extracted prediction, correct?). `extract_letters` for multiple
    choice; open-ended answers after `_norm_text`, a yes/no answer also by the reply's first
    word, a number by a first word of equal value. No benchmark scores this way."""
    if item.multiple_choice:
        pred = extract_letters(reply, item.options)
        return pred, bool(pred) and set(pred) == set(item.answer)
    pred = _norm_text(reply)
    gt = _norm_text(item.answer)
    if pred == gt:
        return pred, True
    first = pred.split(" ")[0] if pred else ""
    if gt in {"yes", "no"}:
        return pred, first == gt
    if _NUMBER.fullmatch(gt):  # "3.5" matches "3.5 meters" and "3.50", "-5" does not match "5"
        return pred, bool(_NUMBER.fullmatch(first)) and float(first) == float(gt)
    return pred, False


# ------------------------------------------------------------------------- official extraction

# Both official extractors (lmms-eval's xlrs mcq_utils.extract_characters_regex and MME-RealWorld's
# evaluation/eval_your_results.py) first delete these phrases from the reply, case-sensitively. Two
# of their list entries lack the comma between two phrases, so Python joined them: they are deleted
# only as that joined text, and so here.
OFFICIAL_CUE_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                        "The best option isThe correct option is", "Best answer:Best option:")


def _without_cue_phrases(reply: str) -> str:
    s = reply.strip()
    for phrase in OFFICIAL_CUE_PHRASES:
        s = s.replace(phrase, "")
    return s


def xlrs_official_letters(reply: str) -> str:
    """lmms-eval xlrs-lite's extraction, as sorted letters: none when the reply (cue phrases
    deleted) has no capital A-E; else the letters written "(x)"; else every a-e / A-E letter of
    the reply, inside words too ("Answer: B" is ABE), in upper case."""
    s = _without_cue_phrases(reply)
    if not re.search(r"[A-E]", s):
        return ""
    found = re.findall(r"\(([a-eA-E])\)", s) or re.findall(r"[a-eA-E]", s)
    return "".join(sorted({x.upper() for x in found}))


def mme_official_letter(reply: str, options: list[str]) -> str:
    """MME-RealWorld's extraction: the first capital A-E of the reply (cue phrases deleted), inside
    a word too ("Based on ..." is B); none in a reply of more than 10 words without one; a shorter
    reply without one is the letter of the first "(A) text" choice containing it (lowercased), so
    an empty reply reads as A there, and here."""
    s = _without_cue_phrases(reply)
    m = re.search(r"[A-E]", s)
    if m:
        return m.group(0)
    if len(s.split()) > 10:
        return ""
    for k, opt in enumerate(options):
        if s.lower() in f"({LETTERS[k]}) {opt}".lower():
            return LETTERS[k]
    return ""


# What the headline figure is, per format: the benchmark's official rule.
OFFICIAL_RULES = {
    "xlrs": "lmms-eval xlrs-lite (mcq_utils.extract_characters_regex): no capital A-E, no letter; else the "
            "letters written (X), or else every a-e/A-E letter of the reply; correct if that set is the answer's",
    "mme": "MME-RealWorld (evaluation/eval_your_results.py): the first capital A-E after deleting a few cue "
           "phrases (a reply of up to 10 words without one: the first choice containing it)",
    "lrsvqa": "LRS-VQA (Script/evaluation_LRSVQA.py): the reply equals the answer after lowercasing, or the "
              "two share a WordNet synset (nltk)",
    "generic": "no official rule for a generic file: the lenient rule",
}
NO_WORDNET = ("official rule without WordNet synonyms: install nltk and its wordnet data for the exact rule "
              "(pip install nltk; python -m nltk.downloader wordnet)")
# "use WordNet when nltk and its data are installed" (scoring functions' default)
WORDNET = "wordnet"
_wordnet_cache: list[Callable[[str, str], bool] | None] = []


def wordnet_synonyms() -> Callable[[str, str], bool] | None:
    """LRS-VQA's synonym test, or None when nltk or its wordnet data is missing (an optional extra:
    `pip install '.[eval]'`, then `python -m nltk.downloader wordnet`). The official script counts
    two strings as synonyms when a synset of one has a path similarity above 0.8 to a synset of
    the other; distinct synsets are at least one step apart (similarity 0.5 at most), so that is
    a synset they share."""
    if not _wordnet_cache:
        fn = None
        try:
            from nltk.corpus import wordnet as wn  # noqa: PLC0415 - optional

            wn.synsets("dog")  # LookupError without the data

            def fn(a: str, b: str) -> bool:
                return not set(wn.synsets(a)).isdisjoint(wn.synsets(b))
        except Exception:  # noqa: BLE001 - ImportError, LookupError, a broken data folder
            fn = None
        _wordnet_cache.append(fn)
    return _wordnet_cache[0]


def _synonym_test(synonyms: Any) -> Callable[[str, str], bool] | None:
    return wordnet_synonyms() if synonyms == WORDNET else synonyms


def lrsvqa_official(item: EvalItem, reply: str, synonyms: Callable[[str, str], bool] | None) -> tuple[str, bool]:
    """LRS-VQA's judge: the reply (stripped, as its generation script stores it) equals the answer
    once both are lowercased, or `synonyms(answer, reply)` holds; nothing else (no first word, no
    number rule). Without `synonyms`, exact matches only."""
    gt, pred = item.answer.lower(), reply.strip().lower()
    return pred, gt == pred or (synonyms is not None and bool(synonyms(gt, pred)))
LENIENT_RULE = ("ours, more lenient: letters after an answer cue or in the first sentence, else an option's "
                "text; open-ended answers after normalising, yes/no by the first word, numbers by value")


def score_item(item: EvalItem, reply: str, synonyms: Any = WORDNET) -> tuple[str, bool]:
    """(extracted prediction, correct?) by the official rule of the item's benchmark (xlrs, mme,
    lrsvqa); items of a generic file, which has none, by the lenient rule. `synonyms` is LRS-VQA's
    synonym test: WordNet's when installed (default), a function, or None (exact matches only)."""
    fmt = item.extra.get("format")
    if not item.multiple_choice and fmt == "lrsvqa":
        return lrsvqa_official(item, reply, _synonym_test(synonyms))
    if item.multiple_choice and fmt == "xlrs":
        pred = xlrs_official_letters(reply)
        return pred, set(pred) == set(item.answer)
    if item.multiple_choice and fmt == "mme":
        pred = mme_official_letter(reply, item.options)
        return pred, pred == item.answer
    return score_lenient(item, reply)


def scores(item: EvalItem, reply: str, synonyms: Any = WORDNET) -> dict[str, Any]:
    """A reply's fields in predictions.jsonl: the official figure's prediction and verdict, and
    the lenient ones."""
    pred, ok = score_item(item, reply, synonyms)
    lpred, lok = score_lenient(item, reply)
    return {"prediction": pred, "correct": ok, "lenient_prediction": lpred, "lenient_correct": lok}


# --------------------------------------------------------------------------------------- report

def _figures(records: list[dict], correct: str, prediction: str) -> dict[str, Any]:
    """Counts and accuracies of `records` by their verdict field `correct`."""
    cats: dict[str, list[int]] = {}
    for r in records:
        c = cats.setdefault(r["category"], [0, 0])
        c[0] += int(bool(r.get(correct)))
        c[1] += 1
    per = {k: {"correct": v[0], "total": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(cats.items())}
    total = sum(v[1] for v in cats.values())
    n_correct = sum(v[0] for v in cats.values())
    out = {
        "total": total,
        "correct": n_correct,
        # multiple-choice replies in which no option letter could be found (counted wrong)
        "no_letter_found": sum(1 for r in records if r.get("multiple_choice") and not r.get(prediction)
                               and "error" not in r),
        "micro_accuracy": n_correct / total if total else None,
        "macro_accuracy": sum(p["accuracy"] for p in per.values()) / len(per) if per else None,
        "per_category": per,
    }
    if per and all("/" in k for k in per):  # "Task/Subtask" categories (XLRS-Bench): task totals too
        tasks: dict[str, list[int]] = {}
        for k, v in per.items():
            t = tasks.setdefault(k.split("/", 1)[0], [0, 0])
            t[0] += v["correct"]
            t[1] += v["total"]
        out["per_task"] = {k: {"correct": a, "total": b, "accuracy": a / b} for k, (a, b) in sorted(tasks.items())}
    return out


def _per_dataset(records: list[dict], correct: str, prediction: str) -> dict[str, Any]:
    """LRS-VQA's tables are per source dataset, the id's prefix before "_" (FAIR_12, GLH-Bridge_3,
    STAR_40), as evaluation_LRSVQA.py splits them: per-category accuracy, OA (overall) and AA (mean
    of the category accuracies) of each. Empty unless every id has such a prefix."""
    if not records or not all(str(r["id"]).split("_", 1)[0] and "_" in str(r["id"]) for r in records):
        return {}
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r["id"]).split("_", 1)[0], []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        f = _figures(rs, correct, prediction)
        out[name] = {"total": f["total"], "correct": f["correct"], "OA": f["micro_accuracy"],
                     "AA": f["macro_accuracy"], "per_category": f["per_category"]}
    return out


def summarize(records: list[dict], formats: Iterable[str] = (), wordnet: bool = True) -> dict[str, Any]:
    """The official figure (top level: each benchmark's own rule) and the lenient one ("lenient")
    of `records`; `formats` are the items' formats, whose official rules are named; `wordnet`
    False: LRS-VQA's official figure was computed without its synonyms (said in "official_note")."""
    formats = set(formats)
    skipped = [r for r in records if "skipped" in r]
    records = [r for r in records if "skipped" not in r]
    out = _figures(records, "correct", "prediction")
    out.update({
        # items whose prediction failed (--on-error skip; counted wrong)
        "failed": sum(1 for r in records if "error" in r),
        # items not asked (several images): in none of the figures
        "skipped": len(skipped),
        "skipped_reasons": {why: sum(1 for r in skipped if r["skipped"] == why)
                            for why in sorted({r["skipped"] for r in skipped})},
        "official_rule": {f: OFFICIAL_RULES[f] for f in sorted(formats) if f in OFFICIAL_RULES},
        "lenient": {**_figures(records, "lenient_correct", "lenient_prediction"), "rule": LENIENT_RULE},
    })
    if formats == {"lrsvqa"}:
        for block, (correct, prediction) in ((out, ("correct", "prediction")),
                                             (out["lenient"], ("lenient_correct", "lenient_prediction"))):
            per = _per_dataset(records, correct, prediction)
            if per:
                block["per_dataset"] = per
    if "lrsvqa" in formats and not wordnet:
        out["official_note"] = NO_WORDNET
    return out


def markdown_table(summary: dict[str, Any], title: str = "") -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    lines = [f"### {title}", ""] if title else []
    len_ = summary.get("lenient") or {}
    lines += ["accuracy: by the benchmark's official rule (comparable with its published tables); lenient: our "
              "more lenient reading of the same replies, a second figure only", ""]
    lines += ["| category | correct | total | accuracy (%) | lenient (%) |", "| --- | ---: | ---: | ---: | ---: |"]

    def other(group: str, key: str) -> str:
        v = len_.get(group, {}).get(key)
        return pct(v["accuracy"]) if v else "n/a"

    for k, v in summary["per_category"].items():
        lines.append(f"| {k} | {v['correct']} | {v['total']} | {pct(v['accuracy'])} | {other('per_category', k)} |")
    for k, v in summary.get("per_task", {}).items():
        lines.append(f"| *{k} (task)* | {v['correct']} | {v['total']} | {pct(v['accuracy'])} | {other('per_task', k)} |")
    lines.append(f"| **micro (overall)** | {summary['correct']} | {summary['total']} | "
                 f"{pct(summary['micro_accuracy'])} | {pct(len_.get('micro_accuracy'))} |")
    lines.append(f"| **macro (mean of categories)** | | | {pct(summary['macro_accuracy'])} | "
                 f"{pct(len_.get('macro_accuracy'))} |")
    if summary.get("per_dataset"):
        lines += ["", "Per source dataset (the id's prefix; LRS-VQA's tables are LRS-FAIR, LRS-Bridge, LRS-STAR):", "",
                  "| dataset | category | correct | total | accuracy (%) | lenient (%) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, d in summary["per_dataset"].items():
            ld = len_.get("per_dataset", {}).get(name, {})
            for k, v in d["per_category"].items():
                lv = ld.get("per_category", {}).get(k)
                lines.append(f"| {name} | {k} | {v['correct']} | {v['total']} | {pct(v['accuracy'])} | "
                             f"{pct(lv['accuracy']) if lv else 'n/a'} |")
            lines.append(f"| **{name}** | **OA** | {d['correct']} | {d['total']} | {pct(d['OA'])} | {pct(ld.get('OA'))} |")
            lines.append(f"| **{name}** | **AA** | | | {pct(d['AA'])} | {pct(ld.get('AA'))} |")
    for f, rule in summary.get("official_rule", {}).items():
        lines += ["", f"Official rule ({f}): {rule}."]
    if summary.get("official_note"):
        lines += ["", f"**Note: {summary['official_note']}.**"]
    if summary.get("no_letter_found"):
        lines += ["", f"{summary['no_letter_found']} multiple-choice replies named no option by the official "
                      "rule (counted wrong)."]
    if summary.get("older_prompt_answers"):
        lines += ["", f"{summary['older_prompt_answers']} answers were made by an older version with its own prompt, "
                      "not the official one (rescored; another --out asks every item anew)."]
    for why, n in summary.get("skipped_reasons", {}).items():
        lines += ["", f"{n} items skipped ({why}): not asked, and in none of the figures above."]
    if summary.get("failed"):
        lines += ["", f"{summary['failed']} items failed (counted wrong; their errors are in "
                      "predictions.jsonl, and a rerun into the same folder tries them again)."]
    return "\n".join(lines) + "\n"


def _read_done(pred_path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not pred_path.is_file():
        return done
    for line in pred_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: the item is redone
        if isinstance(rec, dict) and "id" in rec:
            done[str(rec["id"])] = rec
    return done


def evaluate(
    items: list[EvalItem],
    predict: Callable[[EvalItem, str], str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    title: str = "",
    progress: bool = False,
    instruction: str | None = None,
    on_error: str = "stop",
    synonyms: Any = WORDNET,
) -> dict[str, Any]:
    """Run `predict(item, prompt) -> reply` on each item not yet in predictions.jsonl, score,
    write results.json and results.md into out_dir, return the results dict.

    An item whose prediction fails (out of memory, an unreadable image, a prompt too long for
    the model) stops the run (`on_error` "stop"), or is recorded with its error and counted
    wrong ("skip"); a later run into the same folder tries failed items again. `synonyms`: LRS-VQA's
    synonym test (WordNet's when nltk and its data are installed, a function, or None)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    done = _read_done(pred_path)
    todo = items if limit is None else items[:limit]
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        # items answered by an earlier run count as done from the start, not as progress of this
        # one: updated for them, the bar's rate (and so its ETA) counted them as asked in no time
        n_done = sum(1 for it in todo if it.id in done and "error" not in done[it.id]
                     and ("skipped" in done[it.id] or skip_reason(it) is None))
        bar = tqdm(total=len(todo), initial=n_done, desc="eval", unit="item", file=sys.stderr)
    records: list[dict] = []
    rescored: dict[str, dict] = {}
    synonyms = _synonym_test(synonyms)
    try:
        _predict_all(todo, done, predict, pred_path, records, bar, instruction, on_error, rescored, synonyms)
    finally:
        if bar is not None:
            bar.close()
        _one_line_per_item(pred_path, rescored)
    summary = summarize(records, {it.extra.get("format") or "generic" for it in todo}, synonyms is not None)
    older = sum(1 for r in records if r.get("older_prompt"))
    if older:
        summary["older_prompt_answers"] = older
        print(f"{older} stored answers were made by an older version with its own prompt, not the official "
              "one; they are rescored, not asked again (use another --out to ask every item anew)", file=sys.stderr)
    results = {"title": title, "items_in_file": len(items), "limit": limit, **summary}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown_table(summary, title), encoding="utf-8")
    return results


def _one_line_per_item(pred_path: Path, rescored: dict[str, dict] | None = None) -> None:
    """Rewrite predictions.jsonl with one line an item (the last one written for it) when it holds
    more: a failed item asked again appends its new line after the error line, and a line cut by
    an interruption stays behind; or when stored answers were scored anew (`rescored`, by id: a
    line of an older version gets both verdicts). Records are appended as they are made, so an
    interrupted run loses nothing; this rewrite goes through a temporary file replaced in one step."""
    if not pred_path.is_file():
        return
    lines = [x for x in pred_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    done = _read_done(pred_path)
    rescored = {k: v for k, v in (rescored or {}).items() if k in done and "error" not in done[k]
                and "skipped" not in done[k]}
    if len(lines) == len(done) and not rescored:
        return
    done.update(rescored)
    tmp = pred_path.with_name(pred_path.name + ".tmp")
    with contextlib.suppress(OSError):  # the appended file reads the same, only longer
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(tmp, pred_path)


def _predict_all(todo: list[EvalItem], done: dict[str, dict], predict: Callable[[EvalItem, str], str],
                 pred_path: Path, records: list[dict], bar, instruction: str | None, on_error: str,
                 rescored: dict[str, dict], synonyms: Callable[[str, str], bool] | None = None) -> None:
    """`evaluate`'s loop: ask each item of `todo` not answered in `done`, append its record to
    predictions.jsonl as it is made, and collect every item's record in `records` (answered
    ones scored anew, and put in `rescored` when that changed them)."""
    with pred_path.open("a", encoding="utf-8") as f:
        if f.tell():  # a last line cut by an interruption: the next record starts on a line of its own
            with pred_path.open("rb") as tail:
                tail.seek(-1, 2)
                if tail.read(1) != b"\n":
                    f.write("\n")
        for item in todo:
            why = skip_reason(item)
            if why is not None:  # never asked (also when an older version answered it)
                rec = {"id": item.id, "category": item.category, "image": item.extra["images"],
                       "answer": item.answer, "skipped": why}
                if done.get(item.id) != rec:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    if bar is not None:
                        bar.update(1)
            elif item.id in done and "error" not in done[item.id]:
                rec = done[item.id]
                before = dict(rec)
                if "lenient_correct" not in rec and item.extra.get("format") in ("xlrs", "mme"):
                    # an older version's answer, asked with its own prompt wording, not the
                    # official prompt: kept and rescored, but marked (and said in the results)
                    rec["older_prompt"] = True
                # rescore from the stored reply (extraction rules may have changed; lines of older
                # versions lack the lenient fields: they are added)
                rec.update(**scores(item, rec.get("reply", ""), synonyms), category=item.category,
                           answer=item.answer, multiple_choice=item.multiple_choice)
                if rec != before:
                    rescored[item.id] = rec
            else:
                prompt = build_prompt(item, instruction)
                t0 = time.perf_counter()
                try:
                    reply, error = predict(item, prompt), None
                except Exception as exc:  # noqa: BLE001 - recorded per item, or re-raised
                    error = str(exc).strip() or type(exc).__name__
                    if on_error == "stop":
                        named = error if error.startswith(f"item {item.id}:") else f"item {item.id}: {error}"
                        raise EvalError(f"{named} (--on-error skip records such items as failed and "
                                        "goes on)") from exc
                    reply = ""
                scored = scores(item, reply, synonyms) if error is None else {
                    "prediction": None, "correct": False, "lenient_prediction": None, "lenient_correct": False}
                rec = {"id": item.id, "category": item.category, "image": item.image, "reply": reply,
                       **scored, "answer": item.answer, "multiple_choice": item.multiple_choice,
                       "seconds": round(time.perf_counter() - t0, 3)}
                if error is not None:
                    rec["error"] = error
                    print(f"item {item.id} failed (counted wrong): {error}", file=sys.stderr)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                if bar is not None:
                    bar.update(1)
            records.append(rec)
            scored = [r for r in records if "skipped" not in r]
            if bar is not None and scored:
                bar.set_postfix(acc=f"{sum(bool(r['correct']) for r in scored) / len(scored):.3f}")


# -------------------------------------------------------------------------------------- CLI

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="annotation file (JSON list or JSON Lines)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="annotation layout (default: auto)")
    parser.add_argument("--field", action="append", metavar="KEY=SOURCE",
                        help="read a field from another name, e.g. --field question=Text --field answer=gt "
                        f"(keys: {', '.join(GENERIC_NAMES)}); on top of an explicit --format, else "
                        "the generic layout")
    parser.add_argument("--image-root", default=None, help="folder relative image paths are taken from "
                        "(default: the annotation file's folder)")
    parser.add_argument("--out", default="eval_out",
                        help="output folder: predictions.jsonl, results.json, results.md (default: eval_out)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N items")
    add_model_arguments(parser)
    # None when not given, so that runs saved before the option existed stay comparable
    add_strategy_arguments(parser, faithful_default=None, budget_help="visual token budget per item")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64,
                        help="64 = the XLRS-Bench-lite protocol")
    parser.add_argument("--on-error", choices=ON_ERROR, default="stop",
                        help="an item whose prediction fails (out of memory, unreadable image): stop, or "
                        "record it as failed (counted wrong) and go on")
    parser.add_argument("--title", default="", help="heading of the Markdown table")
    parser.add_argument("--instruction", default=None,
                        help="last line(s) of multiple-choice prompts, replacing the format's instruction and its "
                        "answer cue (default: the official one of xlrs / mme; ours for generic files)")
    parser.add_argument("--keep-heatmaps", action="store_true",
                        help="keep each answer's token heatmap and anchors in OUT/heatmaps")


def _resolve_image(item: EvalItem, root: Path) -> str:
    p = Path(item.image)
    return str(p if p.is_absolute() else root / p)


def image_root(args: argparse.Namespace) -> Path:
    """The folder relative image paths are taken from: --image-root, else the annotation file's."""
    return Path(args.image_root) if args.image_root else Path(args.annotations).resolve().parent


def engine_predictor(args: argparse.Namespace, weights: str | Path | None = None) -> Callable[[EvalItem, str], str]:
    """A predict function that runs the engine (greedy decoding inside Engine.ask) on `weights`, the
    checkpoint folder resolved for the run's settings (else --weights as given)."""
    from engine.pipeline import AskRequest, Engine  # noqa: PLC0415 - heavy

    keep = bool(getattr(args, "keep_heatmaps", False))
    engine = Engine(weights or args.weights, device=args.device, quantization=args.quantization,
                    adapter=args.adapter, demo_ok=not getattr(args, "no_demo", False),
                    output_dir=Path(args.out) / "heatmaps",
                    prune_old_outputs=False)  # heatmaps kept with --keep-heatmaps are the run's results
    if engine.health().get("demo_model"):
        from engine.weights import demo_model_note

        print(demo_model_note(args.weights, "evaluating"), file=sys.stderr)
    root = image_root(args)

    def predict(item: EvalItem, prompt: str) -> str:
        req = AskRequest(raster_path=_resolve_image(item, root), question=prompt,
                         selection_text=selection_text(item), strategy=args.strategy,
                         budget=args.budget, tokens_per_tile=args.tokens_per_tile,
                         max_new_tokens=args.max_new_tokens, seed=0,
                         faithful_empty_slots=bool(getattr(args, "faithful_empty_slots", False)))
        answer = None
        for ev in engine.ask(req):
            if ev.get("type") == "result":
                answer = ev.get("answer", "")
                if not keep:  # the engine writes a heatmap per answer; eval has no use for them
                    for key in ("heatmap_path", "anchors_path"):
                        if ev.get(key):
                            Path(ev[key]).unlink(missing_ok=True)
            elif ev.get("type") == "error":
                raise EvalError(f"item {item.id}: {ev.get('message')}")
        return answer or ""

    return predict


# "weights" is the checkpoint folder the engine resolved (GEOVQA_WEIGHTS, the default folder or the
# demo model when --weights is left out) and "demo_model" whether it is the tiny random one
RUN_KEYS = ("annotations", "format", "field", "image_root", "weights", "demo_model", "adapter", "quantization",
            "strategy", "budget", "tokens_per_tile", "max_new_tokens", "instruction", "faithful_empty_slots")
RUN_PATH_KEYS = ("annotations", "image_root", "weights", "adapter")  # compared as absolute paths


def _check_run_settings(args: argparse.Namespace, model: dict | None = None) -> None:
    """A resumed run must use the settings its stored predictions were made with. `model` is the
    resolved checkpoint (run_settings.model_choice); without it (an injected predictor) --weights
    is recorded as typed."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cur = {k: (str(getattr(args, k)) if getattr(args, k, None) is not None else None) for k in RUN_KEYS}
    cur.update(model or {})
    # the weight format the model runs in, not "auto" as typed: nf4 on a GPU, fp32 on the CPU
    cur["quantization"] = resolved_quantization(getattr(args, "device", None), getattr(args, "quantization", None))
    # --field as its mapping (the order of the flags does not matter); the folder images are
    # read from, given or not (the annotation file's own folder by default)
    fields = parse_field_map(getattr(args, "field", None))
    cur["field"] = ",".join(f"{k}={v}" for k, v in sorted(fields.items())) or None
    cur["image_root"] = str(image_root(args))
    cur.update({k: absolute_path(cur[k]) for k in RUN_PATH_KEYS})  # not as typed: from any folder
    cfg = out / "run_settings.json"
    # only answers made with the recorded settings are kept by a rerun: an empty predictions.jsonl
    # (the first item failed) or one of failed items only (tried again) binds the folder to nothing
    made = any("error" not in rec for rec in _read_done(out / "predictions.jsonl").values())
    if cfg.is_file() and made:
        # settings files of older versions lack field, image_root and the resolved model: assumed
        # unchanged (a --weights they recorded as typed is still compared)
        saved = with_resolved_quantization(with_model_choice(json.loads(cfg.read_text()), cur), cur)
        desc = changed_settings(saved, cur, RUN_KEYS, paths=RUN_PATH_KEYS,
                                defaults={k: cur[k] for k in ("field", "image_root")})
        if desc:
            raise EvalError(f"{out} holds predictions made with other settings ({desc}); use another --out "
                            "or delete that folder to start over")
    cfg.write_text(json.dumps(cur, indent=2) + "\n")


def _check_images(args: argparse.Namespace, items: list[EvalItem]) -> None:
    """Every item to be asked has its image file, before the model loads."""
    root = image_root(args)
    todo = items if args.limit is None else items[: args.limit]
    missing = [it for it in todo if skip_reason(it) is None and not Path(_resolve_image(it, root)).is_file()]
    if missing:
        shown = "; ".join(f"{it.id}: {_resolve_image(it, root)}" for it in missing[:5])
        raise EvalError(f"{len(missing)} of {len(todo)} items have no image file ({shown}"
                        f"{'; ...' if len(missing) > 5 else ''}). Check --image-root.")


def run_eval(args: argparse.Namespace, predict: Callable[[EvalItem, str], str] | None = None) -> int:
    items = load_items(args.annotations, args.format, parse_field_map(getattr(args, "field", None)))
    if predict is None:
        _check_images(args, items)
        # resolved before the settings check, so that a rerun on another model (GEOVQA_WEIGHTS, the
        # default folder, the demo) is refused before anything loads; then loaded exactly that
        model = model_choice(args.weights, demo_ok=not getattr(args, "no_demo", False))
        resolve_tokens_per_tile(args, model)
        _check_run_settings(args, model)
        predict = engine_predictor(args, model["weights"])
    else:
        _check_run_settings(args)
    try:
        res = evaluate(items, predict, args.out, limit=args.limit, title=args.title or Path(args.annotations).name,
                       progress=True, instruction=getattr(args, "instruction", None),
                       on_error=getattr(args, "on_error", "stop"))
    finally:
        with contextlib.suppress(OSError):  # the engine's folder for heatmaps, when none were kept
            (Path(args.out) / "heatmaps").rmdir()
    print(markdown_table(res, res["title"]))
    print(f"Results in {Path(args.out) / 'results.json'} and results.md; predictions in predictions.jsonl.")
    return 0
