"""Answer extraction and judging for `python -m engine eval`: a reply's letters or text, right or wrong.

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
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Callable

from engine.eval_items import LETTERS, EvalItem, norm_text

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
# the same word at the very start of the text after a cue (where _WORD's look-behind would see
# the cue's last letter in the whole reply, and nothing in the text cut after the cue)
_WORD_FIRST = re.compile(r"(?!(?:and|or)(?![A-Za-z]))[A-Za-z]{2,}")
# what follows a capital "A" / "I" that makes it the article / pronoun, and the "and"/"or" that
# makes it a letter again ("A and C")
_LOWER_WORD_NEXT = re.compile(r"\s+[a-z]")
_AND_OR_NEXT = re.compile(r"\s+(and|or)\b")
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
    if whole_reply and len(segment.strip()) <= 3:
        for m in re.finditer(r"(?<![A-Za-z(])([a-z])[\.\)](?![A-Za-z])", segment):
            found.append(m.group(1).upper())
    # bare capital letters standing alone ("B", "B and D", "A, C"); "A" as an article is
    # excluded when followed by a lowercase word (looked at in place: a copy of the rest of the
    # segment for every letter made a reply of many letters quadratic)
    for m in re.finditer(r"(?<![A-Za-z(])([A-Z])(?![A-Za-z\.\):])", segment):
        L = m.group(1)
        if (L in ("A", "I") and _LOWER_WORD_NEXT.match(segment, m.end())
                and not _AND_OR_NEXT.match(segment, m.end())):
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
    #    "The answer is B. Option C is wrong ..." stays B. Each cue's text is found in place and
    #    cut once it is known: cutting the rest of the reply after every cue (and looking for its
    #    end there) made a reply of many cues ("answer answer ...") quadratic.
    ends = [e.start() for e in _CUE_END.finditer(text)]
    tried: set[str] = set()  # the text after a cue that named no letter names none the next time
    for m in _CUE.finditer(text):
        start = m.end()
        k = bisect.bisect_left(ends, start)
        stop = ends[k] if k < len(ends) else len(text)
        w = _WORD_FIRST.match(text, start, stop) or _WORD.search(text, start + 1, stop)
        if w:  # keep that word: it tells the article in "A large harbour" from the letter A
            stop = w.end()
        seg = text[start:stop]
        if seg in tried:
            continue
        tried.add(seg)
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
        low = f" {norm_text(text)} "
        hits = sorted(((len(norm_text(o)), k) for k, o in enumerate(options)
                       if norm_text(o) and f" {norm_text(o)} " in low), reverse=True)
        if hits:
            return LETTERS[hits[0][1]]
    return ""


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def score_lenient(item: EvalItem, reply: str) -> tuple[str, bool]:
    """Our lenient reading: (extracted prediction, correct?). `extract_letters` for multiple
    choice; open-ended answers after `norm_text`, a yes/no answer also by the reply's first
    word, a number by a first word of equal value. No benchmark scores this way."""
    if item.multiple_choice:
        pred = extract_letters(reply, item.options)
        return pred, bool(pred) and set(pred) == set(item.answer)
    pred = norm_text(reply)
    gt = norm_text(item.answer)
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
        try:
            from nltk.corpus import wordnet as wn  # noqa: PLC0415 - optional

            wn.synsets("dog")  # LookupError without the data

            def share_a_synset(a: str, b: str) -> bool:
                return not set(wn.synsets(a)).isdisjoint(wn.synsets(b))
        except Exception:  # noqa: BLE001 - ImportError, LookupError, a broken data folder
            share_a_synset = None
        _wordnet_cache.append(share_a_synset)
    return _wordnet_cache[0]


def synonym_test(synonyms: Any) -> Callable[[str, str], bool] | None:
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
        return lrsvqa_official(item, reply, synonym_test(synonyms))
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
