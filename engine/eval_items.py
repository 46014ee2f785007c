"""Benchmark annotation files for `python -m engine eval`: their formats, read into `EvalItem`s.

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
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine.json_files import json_lines, loads, text_is_encodable

LETTERS = string.ascii_uppercase
# XLRS-Bench asks for several letters only in this subtask (multi-label land-use classes).
XLRS_MULTI_LABEL_CATEGORIES = ("Overall Land use classification",)
FORMATS = ("auto", "xlrs", "mme", "lrsvqa", "generic")


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
                value = loads(s)
            except ValueError:
                value = [p for p in s.splitlines() if p.strip()]
        else:
            value = [p for p in s.splitlines() if p.strip()]
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if not isinstance(value, list):  # a number or true/false, or JSON text that is no list
        raise EvalError(f"its options are {json.dumps(value)[:40]}, not a list of option texts")
    if len(value) > len(LETTERS):
        raise EvalError(f"it has {len(value)} options; at most {len(LETTERS)} (A to Z) can be named "
                        "by a letter")
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
    norm = [norm_text(o) for o in options]
    # an option's text, alone or after its own letter ("(B) airport", "B. airport")
    text = norm_text(s)
    if norm.count(text) == 1:
        return allowed[norm.index(text)]
    m = _OPTION_PREFIX.match(s)
    if m and s[m.end():].strip():
        k = LETTERS.find(m.group(1).upper())
        if 0 <= k < len(options) and norm_text(s[m.end():]) == norm[k]:
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
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"The annotation file {p} cannot be read as UTF-8 text: {exc}.") from exc
    records: list[Any]
    try:
        obj = loads(text)  # a JSON list, or an object holding one
    except ValueError as whole:
        obj = []  # JSON Lines
        for n, line in enumerate(json_lines(text), 1):
            if not line.strip():
                continue
            try:
                obj.append(loads(line))
            except ValueError as exc:
                # each line is parsed alone, so json's own "line 1" is the file's line n; where not
                # even the first record parses, the file was more likely meant as one JSON text
                detail = (f"column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError)
                          else str(exc))
                where = (f"line {n} {detail}" if obj else str(whole))
                raise EvalError(f"The annotation file {p} is neither JSON nor JSON Lines ({where}).") from exc
    if isinstance(obj, dict):
        records = next((obj[k] for k in ("data", "questions", "annotations") if isinstance(obj.get(k), list)), [obj])
    elif isinstance(obj, list):
        records = list(obj)
    else:  # a lone number, string or null: an annotation that is not an object, said below
        records = [obj]
    if fmt not in FORMATS:
        raise EvalError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    items = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise EvalError(f"annotation {i} in {p} is not a JSON object")
        if not text_is_encodable(rec):  # predictions.jsonl, results.json and the console take UTF-8 only
            raise EvalError(f"annotation {i} in {p} has text that is not valid Unicode (a lone UTF-16 "
                            "surrogate such as \\ud800); fix the text")
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
        if not item.answer or (not item.multiple_choice and not norm_text(item.answer)):
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


# Answer text as loading checks it and eval_scoring compares it (open-ended answers, option texts).

# The number words of counting answers, read as digits (as VQA's answer normalisation does).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def norm_text(s: str) -> str:
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
