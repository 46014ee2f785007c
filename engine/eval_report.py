"""Reports for `python -m engine eval`: the figures of scored predictions and their Markdown table.

Results (both figures): micro accuracy (all items), macro accuracy (mean of per-category
accuracies), per-category counts, as JSON and a Markdown table; skipped items (several images)
are counted apart. A `--limit` run's macro averages cover only the categories its items have
(``macro_note``, said under the table).
"""

from __future__ import annotations

from typing import Any, Iterable

from engine.eval_scoring import LENIENT_RULE, NO_WORDNET, OFFICIAL_RULES


def limited_macro_note(limit: int, items_in_file: int, categories: int) -> str:
    """What a `--limit` run's macro figures cover: only the categories its first `limit` items
    have. A category none of them has is left out of the mean, not counted as 0, so the figure is
    no full run's macro (the figure is kept; the note says what it covers)."""
    return (f"a limited run (--limit {limit}, of {items_in_file} items): the macro averages are the means over "
            f"the {categories} categories these items have only; categories without an item asked are left out, "
            "not counted as 0, so they are not comparable with a full run's")


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
    if summary.get("macro_note"):
        lines += ["", f"**Note: {summary['macro_note']}.**"]
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
