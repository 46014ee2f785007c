"""Benchmark evaluation: formats, answer extraction, set scoring, report, --limit and resume."""

from __future__ import annotations

import argparse
import json

import pytest

from engine.eval_items import EvalError, load_items
from engine.eval_prompts import build_prompt
from engine.eval_scoring import extract_letters
from engine.evaluate import add_eval_arguments, evaluate, run_eval

OPTS = ["ship", "harbor", "plane", "car"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("B", "B"),
        ("b", "B"),
        ("(b)", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("The correct answer is (D) car.", "D"),
        ("B and D", "BD"),
        ("A, C", "AC"),
        ("AC", "AC"),
        ("The best answer is: A and C", "AC"),
        ("A large harbor is visible.", "B"),  # article "A", option text fallback
        ("There is a plane.", "C"),
        ("I cannot tell.", ""),
        ("E", ""),  # not an offered option
        # later words do not override or add to the letters the reply chose first
        ("The answer is B. Option C is incorrect because it shows no ships.", "B"),
        ("B. Option D would require a river.", "B"),
        ("The answer is B. C is wrong.", "B"),
        ("The correct answer is B; the other choices (A, C, D) do not match.", "B"),
        ("Answer: B\n\nThe choices are listed below: (A) harbour", "B"),
        ("The answer is B, because C shows no ships.", "B"),
        ("**B**", "B"),
        ("Option B: harbor", "B"),
        ("Options: A, C", "AC"),
        ("The correct option is D", "D"),
        ("The answer is a large harbor.", "B"),  # article, then the option text
        ("", ""),
    ],
)
def test_extract_letters(reply, expected):
    assert extract_letters(reply, OPTS) == expected


@pytest.mark.parametrize("reply, expected", [
    # the text after a cue is cut in place now: these read as they did when it was cut out first
    ("answer isB", "B"),
    ("The answer isBx", ""),  # "Bx" is the word after the cue, no letter
    ("Answer: A or I think C", "A"),
    ("answer answer B", "B"),
    ("Answer - D; A is wrong", "D"),
    ("The answer is\nB", "B"),
    ("answers: B, D and maybe", "BD"),
    ("The correct answer: b.", "B"),
    ("Answer: I cannot tell", ""),
    ("a ship and a plane", "C"),
])
def test_letters_after_a_cue_read_as_before(reply, expected):
    assert extract_letters(reply, OPTS) == expected


@pytest.mark.parametrize("unit", ["answer ", "The answer is ", "B ", "answer: B ", "A x ", "x a) ", "the  "])
def test_a_long_adversarial_reply_is_scored_in_well_under_a_second(unit):
    """Letter extraction cut the rest of the reply after every answer cue and looked for the end
    of its sentence there: quadratic, a 30 KB reply of repeated "answer" took seconds (200 KB:
    tens of seconds). Each reply here is 200 KB, scored by the rules of each format (both figures)
    in under a second (a generous bound: it takes about a tenth of that)."""
    import time

    from engine.eval_items import EvalItem
    from engine.eval_scoring import scores

    reply = unit * (200_000 // len(unit))
    items = [EvalItem("1", "a.tif", "q", OPTS, "B", extra={"format": fmt}) for fmt in ("xlrs", "mme", "generic")]
    items.append(EvalItem("2", "a.tif", "q", [], "harbor", extra={"format": "lrsvqa"}))
    for item in items:
        t0 = time.perf_counter()
        scores(item, reply, synonyms=None)
        assert time.perf_counter() - t0 < 1.0, item.extra["format"]
    assert extract_letters(reply, OPTS) == extract_letters(unit * 3, OPTS)


def test_option_text_fallback_matches_whole_words():
    opts = ["1", "3", "13", "none of them"]
    assert extract_letters("There are 13 ships.", opts) == "C"
    assert extract_letters("I count 3.", opts) == "B"
    assert extract_letters("none of them", opts) == "D"


MME = [
    {"Question_id": "rs/color/0001", "Image": "a.png", "Text": "What colour is the roof?",
     "Answer choices": ["(A) red", "(B) blue", "(C) green", "(D) white", "(E) none"],
     "Ground truth": "B", "Category": "color", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "rs/count/0002", "Image": "a.png", "Text": "How many planes?",
     "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) none"],
     "Ground truth": "C", "Category": "count", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "rs/count/0003", "Image": "b.png", "Text": "How many ships?",
     "Answer choices": ["(A) 5", "(B) 6", "(C) 7", "(D) 8", "(E) none"],
     "Ground truth": "A", "Category": "count", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "rs/position/0004", "Image": "b.png", "Text": "Where is the harbour?",
     "Answer choices": ["(A) north", "(B) south", "(C) east", "(D) west", "(E) none"],
     "Ground truth": "D", "Category": "position", "Subtask": "Remote Sensing", "Task": "Perception"},
]
# replies and whether each one is right, by hand
MME_REPLIES = {"rs/color/0001": "The answer is B.", "rs/count/0002": "(C)",
               "rs/count/0003": "B", "rs/position/0004": "west"}
# color 1/1, count 1/2, position 1/1 -> micro 3/4, macro (1 + 0.5 + 1) / 3


def _write(path, rows, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def _recording_engine(monkeypatch) -> list:
    """Replace the engine `engine_predictor` loads by one that answers "B" to every request;
    returns the list its requests are appended to."""
    import engine.pipeline as P

    asked = []

    class Recording:
        def __init__(self, *a, **k):
            pass

        def health(self):
            return {"demo_model": False}

        def ask(self, req):
            asked.append(req)
            yield {"type": "result", "answer": "B"}

    monkeypatch.setattr(P, "Engine", Recording)
    return asked


def _predictor(replies, calls):
    def predict(item, prompt):
        calls.append(item.id)
        return replies[item.id]
    return predict


def test_mme_file_scored_exactly(tmp_path):
    ann = _write(tmp_path / "mme_rs.json", MME)
    calls = []
    res = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), tmp_path / "out", title="MME-RS")
    assert res["total"] == 4 and res["correct"] == 3
    assert res["micro_accuracy"] == pytest.approx(0.75)
    assert res["macro_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert res["per_category"]["Perception/Remote Sensing/count"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert res["per_task"]["Perception"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["correct"] == 3
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Perception/Remote Sensing/count | 1 | 2 | 50.00 | 50.00 |" in md and "micro" in md and "83.33" in md


def test_xlrs_multilabel_set_equality_and_columns(tmp_path):
    rows = [
        {"index": 1, "image_path": "x.tif", "question": "Which objects are present?", "A": "ship",
         "B": "harbor", "C": "plane", "D": "car", "answer": "AC", "category": "object_classification"},
        {"index": 2, "image_path": "x.tif", "question": "Which objects are present?", "A": "ship",
         "B": "harbor", "C": "plane", "D": "car", "answer": "A,C", "category": "object_classification"},
        {"index": 3, "image_path": "x.tif", "question": "Which objects are present?",
         "options": ["(A) ship", "(B) harbor", "(C) plane"], "answer": "B", "category": "counting"},
    ]
    ann = _write(tmp_path / "xlrs.jsonl", rows, jsonl=True)
    items = load_items(ann)
    assert [it.answer for it in items] == ["AC", "AC", "B"]
    assert items[0].options == ["ship", "harbor", "plane", "car"]
    assert items[2].options == ["ship", "harbor", "plane"]
    replies = {"1": "A and C", "2": "A", "3": "(B) harbor"}  # second: subset only -> wrong
    res = evaluate(items, _predictor(replies, []), tmp_path / "o")
    # officially (lmms-eval) "A and C" is A, C and the a, d of "and": wrong; leniently right
    assert res["correct"] == 1 and res["per_category"]["object_classification"]["correct"] == 0
    assert res["lenient"]["correct"] == 2 and res["lenient"]["per_category"]["object_classification"]["correct"] == 1
    assert res["no_letter_found"] == 0
    res = evaluate(items, _predictor({"1": "no idea", "2": "A", "3": "B"}, []), tmp_path / "o2")
    assert res["no_letter_found"] == 1 and "1 multiple-choice replies named no option" in (
        tmp_path / "o2" / "results.md").read_text()


def test_lrsvqa_open_ended(tmp_path):
    rows = [
        {"question_id": "q1", "image": "c.tif", "text": "Is there a bridge?", "ground_truth": "yes", "category": "existence"},
        {"question_id": "q2", "image": "c.tif", "text": "What colour is the ship?", "ground_truth": "white", "category": "color"},
        {"question_id": "q3", "image": "c.tif", "text": "How many tanks?", "ground_truth": "4", "category": "count"},
    ]
    ann = _write(tmp_path / "lrs.jsonl", rows, jsonl=True)
    items = load_items(ann)
    assert not any(it.multiple_choice for it in items)
    replies = {"q1": "Yes, there is one.", "q2": "The white.", "q3": "5"}
    res = evaluate(items, _predictor(replies, []), tmp_path / "o", synonyms=None)
    assert res["correct"] == 0  # officially: none equals its answer
    assert res["lenient"]["correct"] == 2 and res["lenient"]["per_category"]["count"]["correct"] == 0


def test_an_open_ended_item_without_an_answer_is_refused_not_scored_against_nothing(tmp_path):
    """An answer under a name the reader does not know (or none at all) loaded as "", and an
    empty reply then scored correct."""
    rows = [{"question_id": i, "image": "c.tif", "text": "How many ships?", "gt_answer": "3",
             "category": "count"} for i in range(3)]
    ann = _write(tmp_path / "lrs.jsonl", rows, jsonl=True)
    with pytest.raises(EvalError, match=r"annotation 0 \(id 0\) in .*lrs.jsonl has no answer .*--field answer=NAME"):
        load_items(ann)
    items = load_items(ann, field_map={"answer": "gt_answer"})  # the hint's way out
    assert [it.answer for it in items] == ["3", "3", "3"]
    assert evaluate(items, lambda item, prompt: "", tmp_path / "o")["correct"] == 0
    for answer in (None, "", "  ", "?"):  # also with the format's own field empty or wordless
        rows = [{"question_id": "q9", "image": "c.tif", "text": "Is there a bridge?", "ground_truth": answer,
                 "category": "existence"}]
        with pytest.raises(EvalError, match=r"annotation 0 \(id q9\) .* has (no answer|an answer with no words)"):
            load_items(_write(tmp_path / "one.json", rows))
    mapped_null = [{"qid": 1, "image": "c.tif", "question": "Is there a bridge?", "gt": None}]
    with pytest.raises(EvalError, match="has no answer"):  # not the text "None"
        load_items(_write(tmp_path / "g.json", mapped_null), field_map={"id": "qid", "answer": "gt"})


def test_prompt_layout():
    items_prompt = build_prompt(load_items_from_rows([MME[0]])[0])
    lines = items_prompt.splitlines()
    assert lines[0] == "What colour is the roof? The choices are listed below: "
    assert lines[1:6] == ["(A) red", "(B) blue", "(C) green", "(D) white", "(E) none"]
    assert "letter" in lines[6]


XLRS_SINGLE = {"index": 101, "image": ["p1.tif"], "question": "What is the color of the largest ship?",
               "multi-choice options": ["(A) white", "(B) red", "(C) black", "(D) blue"],
               "answer": "B", "category": "Object properties/Object color", "l2-category": "color"}
XLRS_MULTI = {"index": 102, "image": ["p1.tif"], "question": "Which land-use classes appear in the image?",
              "multi-choice options": ["(A) farmland", "(B) forest", "(C) water", "(D) urban"],
              "answer": "AC", "category": "Land use classification/Overall Land use classification",
              "l2-category": "land use"}
MME_RS = {"Question_id": "perception/remote_sensing/count/0007", "Question Type": "Multiple Choice",
          "Image": "remote_sensing/00001.png", "Text": "How many planes are parked on the apron?",
          "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) The image does not feature planes."],
          "Ground truth": "C", "Task": "Perception", "Subtask": "Remote Sensing", "Category": "count",
          "Dataset": "dota_v2"}


@pytest.mark.parametrize("row, expected", [
    # lmms-eval xlrs-lite (mcq_utils.xlrs_doc_to_text)
    (XLRS_SINGLE, "What is the color of the largest ship?The choices are listed below:\n(A) white\n(B) red\n"
     "(C) black\n(D) blue\n\nSelect the best answer for the multiple-choice question based on the image. "
     "Only respond with the letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"),
    (XLRS_MULTI, "Which land-use classes appear in the image?The choices are listed below:\n(A) farmland\n"
     "(B) forest\n(C) water\n(D) urban\n\nSelect the best answer(s) for the multiple-choice question based "
     "on the image. There may be more than one correct option. Only respond with the letter(s) corresponding "
     "to the correct answer(s) (A, B, C, D), with multiple choices separated by spaces.The answer(s) is(are):"),
    # MME-RealWorld evaluation/model_vqa_mme_real_world.py, default --test-prompt
    (MME_RS, "How many planes are parked on the apron? The choices are listed below: \n(A) 1\n(B) 2\n(C) 3\n"
     "(D) 4\n(E) The image does not feature planes.\nSelect the best answer to the above multiple-choice "
     "question based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
     "The best answer is:"),
], ids=["xlrs", "xlrs-multilabel", "mme-rs"])
def test_the_prompt_is_the_official_one_ending_with_its_answer_cue_line(tmp_path, row, expected):
    """lmms-eval's xlrs-lite prompt and MME-RealWorld's prompt end with a line that opens the
    answer ("The answer is:", "The best answer is:"); GeoLLaVA-8K's XLRS-Bench-lite numbers were
    made with that prompt. Ours ended with our own instruction and no cue."""
    item = load_items(_write(tmp_path / "a.json", [row]))[0]
    assert build_prompt(item) == expected
    last = build_prompt(item).splitlines()[-1]
    assert last.endswith(":") and "answer" in last.lower()
    # --instruction still replaces the instruction (and the cue) as the last line
    tail = "\n\nReply with one letter." if "index" in row else "planes.\nReply with one letter."
    assert build_prompt(item, "Reply with one letter.").endswith(tail)


def load_items_from_rows(rows, tmp=None):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    return load_items(_write(d / "a.json", rows))


def test_limit_and_resume(tmp_path):
    ann = _write(tmp_path / "mme.json", MME)
    calls = []
    out = tmp_path / "run"
    r1 = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out, limit=2)
    assert r1["total"] == 2 and calls == ["rs/color/0001", "rs/count/0002"]
    # an interrupted write leaves a broken last line: that item is redone, not lost
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "rs/count/00')
    r2 = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out)
    assert calls[2:] == ["rs/count/0003", "rs/position/0004"]  # the first two were not rerun
    assert r2["total"] == 4 and r2["correct"] == 3
    # the redone item went on a line of its own, not onto the cut one: a third run asks nothing
    r3 = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out)
    assert len(calls) == 4 and r3["total"] == 4 and r3["correct"] == 3


# Line ends of str.splitlines() that JSON keeps raw inside a string (json.dumps(ensure_ascii=False)
# writes them so): a JSON Lines reader that split at them read such a record as two broken lines.
UNICODE_LINE_ENDS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("end", UNICODE_LINE_ENDS)
def test_a_stored_answer_with_a_unicode_line_separator_is_read_back(tmp_path, end):
    from engine.evaluate import _read_done

    pred = tmp_path / "predictions.jsonl"
    rec = {"id": "q1", "prediction": f"two ships{end}one boat", "correct": True}
    pred.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")  # as evaluate writes it
    assert _read_done(pred) == {"q1": rec}


def test_an_answer_with_a_unicode_line_separator_is_not_asked_again_on_every_run(tmp_path):
    """Its predictions.jsonl line read as two broken ones: the item counted as not done, and every
    rerun asked it again (and the one-line-per-item rewrite dropped it)."""
    ann = _write(tmp_path / "mme.json", MME[:2])
    replies = dict(MME_REPLIES, **{"rs/color/0001": "The answer is B.\u2028The roof is blue."})
    calls = []
    out = tmp_path / "run"
    evaluate(load_items(ann), _predictor(replies, calls), out)
    r2 = evaluate(load_items(ann), _predictor(replies, calls), out)
    assert calls == ["rs/color/0001", "rs/count/0002"] and r2["total"] == 2 and r2["correct"] == 2
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 3 and lines[2] == ""


def test_a_json_lines_question_with_a_unicode_line_separator_is_one_item(tmp_path):
    ann = tmp_path / "a.jsonl"
    rows = [dict(MME[0], Text=f"What colour is the roof?{end}Look closely.") for end in UNICODE_LINE_ENDS]
    rows = [dict(row, Question_id=f"rs/color/{i}") for i, row in enumerate(rows)]
    ann.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items = load_items(ann)
    assert [it.id for it in items] == ["rs/color/0", "rs/color/1", "rs/color/2"]
    assert [it.question for it in items] == [r["Text"] for r in rows]


def test_generic_mapping_and_errors(tmp_path):
    rows = [{"qid": 7, "pic": "z.png", "ask": "Which?", "opts": ["x", "y"], "gt": "(b)", "kind": "k"}]
    ann = _write(tmp_path / "g.json", rows)
    with pytest.raises(EvalError, match="no question"):
        load_items(ann)
    items = load_items(ann, field_map={"id": "qid", "image": "pic", "question": "ask", "options": "opts",
                                       "answer": "gt", "category": "kind"})
    assert items[0].answer == "B" and items[0].image == "z.png" and items[0].id == "7"
    dup = _write(tmp_path / "d.json", [MME[0], MME[0]])
    with pytest.raises(EvalError, match="twice"):
        load_items(dup)


def test_run_eval_cli_with_injected_predictor(tmp_path, capsys):
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "cli"), "--limit", "3"])
    assert run_eval(args, predict=_predictor(MME_REPLIES, [])) == 0
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert res["total"] == 3 and res["correct"] == 2
    assert "micro" in capsys.readouterr().out


def test_resume_refuses_other_settings(tmp_path):
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = str(tmp_path / "o")
    run_eval(parser.parse_args([str(ann), "--out", out, "--limit", "1"]), predict=_predictor(MME_REPLIES, []))
    with pytest.raises(EvalError, match="strategy"):
        run_eval(parser.parse_args([str(ann), "--out", out, "--strategy", "none"]),
                 predict=_predictor(MME_REPLIES, []))
    # other images, or other fields read as the question or answer, give other predictions
    (tmp_path / "imgs").mkdir()
    with pytest.raises(EvalError, match="image_root"):
        run_eval(parser.parse_args([str(ann), "--out", out, "--image-root", str(tmp_path / "imgs")]),
                 predict=_predictor(MME_REPLIES, []))
    with pytest.raises(EvalError, match="field: None -> 'category=Subtask'"):
        run_eval(parser.parse_args([str(ann), "--out", out, "--format", "mme", "--field", "category=Subtask"]),
                 predict=_predictor(MME_REPLIES, []))
    # the annotation file's folder named explicitly is the default folder
    run_eval(parser.parse_args([str(ann), "--out", out, "--image-root", str(tmp_path)]),
             predict=_predictor(MME_REPLIES, []))


def test_a_rerun_after_nothing_was_answered_may_change_the_settings(tmp_path):
    """The first item ran out of memory: predictions.jsonl is empty, so a retry with the smaller
    budget the message suggests is no resume of other settings."""
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "o"

    def oom(item, prompt):
        raise EvalError(f"item {item.id}: The GPU ran out of memory; retry with --budget 512")

    with pytest.raises(EvalError, match="ran out of memory"):
        run_eval(parser.parse_args([str(ann), "--out", str(out), "--budget", "4096"]), predict=oom)
    assert (out / "predictions.jsonl").read_text() == ""
    assert run_eval(parser.parse_args([str(ann), "--out", str(out), "--budget", "1024", "--on-error", "skip"]),
                    predict=oom) == 0  # every item failed: recorded, but nothing answered
    assert run_eval(parser.parse_args([str(ann), "--out", str(out), "--budget", "512"]),
                    predict=_predictor(MME_REPLIES, [])) == 0
    assert json.loads((out / "run_settings.json").read_text())["budget"] == "512"
    # now answers exist: another budget is refused
    with pytest.raises(EvalError, match="holds predictions made with other settings.*budget"):
        run_eval(parser.parse_args([str(ann), "--out", str(out), "--budget", "4096"]),
                 predict=_predictor(MME_REPLIES, []))


def test_rerun_compares_field_maps_not_flag_order(tmp_path):
    """--field flags given in another order map the same fields; a settings file written before
    --field and --image-root were recorded is read as having the current ones."""
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "o"
    flags = ["--format", "mme", "--field", "category=Subtask", "--field", "question=Text"]
    run_eval(parser.parse_args([str(ann), "--out", str(out), "--limit", "1", *flags]),
             predict=_predictor(MME_REPLIES, []))
    assert json.loads((out / "run_settings.json").read_text())["field"] == "category=Subtask,question=Text"
    swapped = flags[:2] + flags[4:] + flags[2:4]
    run_eval(parser.parse_args([str(ann), "--out", str(out), "--limit", "2", *swapped]),
             predict=_predictor(MME_REPLIES, []))
    with pytest.raises(EvalError, match="field"):
        run_eval(parser.parse_args([str(ann), "--out", str(out), *flags[:4]]), predict=_predictor(MME_REPLIES, []))
    old = json.loads((out / "run_settings.json").read_text())
    del old["field"], old["image_root"]
    (out / "run_settings.json").write_text(json.dumps(old))
    run_eval(parser.parse_args([str(ann), "--out", str(out), *flags[:4]]), predict=_predictor(MME_REPLIES, []))


def test_a_rerun_compares_the_resolved_quantization_not_auto_as_typed(tmp_path, monkeypatch):
    """--quantization auto is nf4 on a GPU and fp32 on the CPU: run_settings.json records the
    format it gave, so a rerun on the other machine is refused instead of mixing predictions."""
    import engine.devices as devices

    def gpu_here(gpu):
        monkeypatch.setattr(devices, "cuda_available", lambda: gpu)
        monkeypatch.setattr(devices, "bitsandbytes_usable", lambda: True)
        monkeypatch.setattr(devices, "flash_attn_usable", lambda: False)

    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "o"

    def run(*flags):
        return run_eval(parser.parse_args([str(ann), "--out", str(out), "--limit", "1", *flags]),
                        predict=_predictor(MME_REPLIES, []))

    gpu_here(True)
    run()
    assert json.loads((out / "run_settings.json").read_text())["quantization"] == "nf4"
    run("--device", "cuda", "--quantization", "nf4")  # what auto gave: the same run
    gpu_here(False)
    with pytest.raises(EvalError, match="quantization: 'nf4' -> 'fp32'"):
        run()
    # a settings file of an older version holds "auto" as typed: it counts as what auto gives now
    old = json.loads((out / "run_settings.json").read_text())
    (out / "run_settings.json").write_text(json.dumps({**old, "quantization": "auto"}))
    run()
    assert json.loads((out / "run_settings.json").read_text())["quantization"] == "fp32"


def test_eval_through_the_engine_on_the_tiny_model(tmp_path, tiny_checkpoint):
    """The real predictor: `Engine.ask` on the tiny random model (answers are meaningless, the
    point is that every item gets a reply, is scored and stored)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((300, 400, 3), 160, np.uint8)).save(tmp_path / "b.png")
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "e"), "--weights", str(tiny_checkpoint),
                              "--device", "cpu", "--quantization", "fp32", "--tokens-per-tile", "4",
                              "--max-new-tokens", "4", "--limit", "2"])
    assert run_eval(args) == 0
    preds = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["rs/color/0001", "rs/count/0002"]
    assert all(isinstance(p["reply"], str) for p in preds)
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["total"] == 2 and res["correct"] == sum(p["correct"] for p in preds)
    assert not (tmp_path / "e" / "heatmaps").exists()  # not kept unless asked, nor an empty folder for them


def test_an_image_too_thin_for_any_patch_is_a_failed_item_with_its_reason(tmp_path, tiny_checkpoint):
    """Data in one column of three among tagged nodata: `uniform` keeps no visual token. Eval
    asks through `Engine.ask`, which refuses it (no_valid_pixels): the item is a failed one with
    that reason (stop, or recorded and counted wrong under --on-error skip, asked again on a rerun
    as every failed item), never scored on a reply made without the image."""
    import numpy as np
    from PIL import Image

    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:  # pragma: no cover
        from rasters import write_geotiff

    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(tmp_path / "a.png")
    arr = np.random.default_rng(0).integers(1, 255, (3, 500, 700)).astype(np.uint8)
    arr[:, :, np.arange(700) % 3 != 0] = 0
    write_geotiff(tmp_path / "thin.tif", arr, nodata=0)
    ann = _write(tmp_path / "mme.json", [MME[0], {**MME[1], "Image": "thin.tif"}])

    def run(out, *extra):
        parser = argparse.ArgumentParser()
        add_eval_arguments(parser)
        return run_eval(parser.parse_args([
            str(ann), "--out", str(tmp_path / out), "--weights", str(tiny_checkpoint), "--device", "cpu",
            "--quantization", "fp32", "--tokens-per-tile", "4", "--max-new-tokens", "2",
            "--strategy", "uniform", *extra]))

    with pytest.raises(EvalError, match=r"item rs/count/0002: No patch .*'uniform' kept no visual token"):
        run("stop")
    assert run("skip", "--on-error", "skip") == 0
    preds = {p["id"]: p for p in map(json.loads, (tmp_path / "skip" / "predictions.jsonl").read_text().splitlines())}
    assert "error" not in preds["rs/color/0001"]
    thin = preds["rs/count/0002"]
    assert "kept no visual token" in thin["error"] and thin["correct"] is False and thin["reply"] == ""
    res = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert res["failed"] == 1 and res["total"] == 2
    assert "1 items failed" in (tmp_path / "skip" / "results.md").read_text()
    # a rerun asks the failed item again (as any failed item), and keeps one line an item
    assert run("skip", "--on-error", "skip") == 0
    lines = (tmp_path / "skip" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["rs/color/0001", "rs/count/0002"]
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["failed"] == 1


def test_pretty_printed_object_file_and_custom_instruction(tmp_path):
    ann = tmp_path / "wrapped.json"
    ann.write_text(json.dumps({"data": MME[:2]}, indent=2))
    items = load_items(ann)
    assert [it.id for it in items] == ["rs/color/0001", "rs/count/0002"]
    assert build_prompt(items[0], "Reply with one letter.").endswith("\n(E) none\nReply with one letter.")
    with pytest.raises(EvalError, match="neither JSON"):
        (tmp_path / "bad.json").write_text("{not json")
        load_items(tmp_path / "bad.json")


def test_a_broken_json_lines_record_is_named_by_its_line_in_the_file(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps(MME[0]) + "\n\n" + json.dumps(MME[1]) + "\n" + "{broken\n")
    with pytest.raises(EvalError, match=r"neither JSON nor JSON Lines \(line 4 column 2: "):
        load_items(ann)
    # a pretty-printed JSON file with a mistake: the whole text's position, not its first line
    ann = tmp_path / "b.json"
    ann.write_text(json.dumps(MME[:2], indent=2).replace('"Image"', "Image", 1))
    with pytest.raises(EvalError, match=r"neither JSON nor JSON Lines \(.*line 4 column 5"):
        load_items(ann)


def test_xlrs_lmms_layout_prompt_and_task_totals(tmp_path):
    rows = [
        {"index": 10, "image": ["x.tif"], "question": "Which land-use classes appear?",
         "multi-choice options": ["(A) farmland", "(B) forest", "(C) water", "(D) urban"],
         "answer": "A C", "category": "Land use classification/Overall Land use classification",
         "l2-category": "land use"},
        {"index": 11, "image": ["x.tif"], "question": "How many planes?",
         "multi-choice options": ["(A) 1", "(B) 2", "(C) 3", "(D) 4"], "answer": "B",
         "category": "Counting/Overall counting", "l2-category": "count"},
        {"index": 12, "image": ["x.tif"], "question": "How many ships in the port?",
         "multi-choice options": ["(A) 5", "(B) 6", "(C) 7", "(D) 8"], "answer": "D",
         "category": "Counting/Regional counting", "l2-category": "count"},
    ]
    ann = _write(tmp_path / "xlrs_lite.json", rows)
    items = load_items(ann)
    assert items[0].answer == "AC" and items[0].options[0] == "farmland" and items[0].image == "x.tif"
    p_multi, p_single = build_prompt(items[0]), build_prompt(items[1])
    assert "There may be more than one correct option" in p_multi
    assert "more than one" not in p_single and p_single.endswith("(A, B, C, D).\nThe answer is:")
    res = evaluate(items, _predictor({"10": "A C", "11": "B", "12": "(C)"}, []), tmp_path / "o")
    assert res["correct"] == 2
    assert res["macro_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert res["per_task"]["Counting"] == {"correct": 1, "total": 2, "accuracy": 0.5}


def test_missing_images_are_reported_before_the_model_loads(tmp_path):
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    with pytest.raises(EvalError, match=r"4 of 4 items have no image file \(rs/color/0001: "):
        run_eval(parser.parse_args([str(ann), "--out", str(tmp_path / "o")]))


def test_failed_items_stop_or_are_recorded_and_retried(tmp_path):
    ann = _write(tmp_path / "mme.json", MME)
    failing = "rs/count/0003"

    def flaky(item, prompt):
        if item.id == failing:
            raise EvalError(f"item {item.id}: out of memory while encoding image tiles")
        return MME_REPLIES[item.id]

    with pytest.raises(EvalError, match="out of memory.*--on-error skip"):
        evaluate(load_items(ann), flaky, tmp_path / "stop")

    def unreadable(item, prompt):  # the engine raises (not an error event): the item is named
        raise ValueError("Could not open 'b.png' as a raster")

    with pytest.raises(EvalError, match=r"^item rs/color/0001: Could not open 'b.png' as a raster \(--on"):
        evaluate(load_items(ann), unreadable, tmp_path / "stop2")
    # the items before it are kept: a rerun does not redo them
    assert [json.loads(x)["id"] for x in (tmp_path / "stop" / "predictions.jsonl").read_text().splitlines()] \
        == ["rs/color/0001", "rs/count/0002"]

    out = tmp_path / "skip"
    res = evaluate(load_items(ann), flaky, out, on_error="skip")
    assert res["failed"] == 1 and res["total"] == 4 and res["correct"] == 3  # 0003 was wrong anyway
    assert res["no_letter_found"] == 0
    rows = {json.loads(x)["id"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    assert "out of memory" in rows[failing]["error"] and rows[failing]["correct"] is False
    assert "1 items failed" in (out / "results.md").read_text()

    calls = []
    fixed = {**MME_REPLIES, failing: "A"}  # now answered, and right
    res = evaluate(load_items(ann), _predictor(fixed, calls), out, on_error="skip")
    assert calls == [failing]  # only the failed item is tried again
    assert res["failed"] == 0 and res["correct"] == 4


def test_a_failed_item_asked_again_leaves_one_line_per_item(tmp_path):
    """The retried item's answer replaced its error line (it was appended after it), also when
    the rerun is interrupted after it; nothing answered is lost."""
    ann = _write(tmp_path / "mme.json", MME)
    failing = "rs/count/0003"

    def flaky(item, prompt):
        if item.id == failing:
            raise EvalError("out of memory")
        return MME_REPLIES[item.id]

    def lines(out):
        return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]

    out = tmp_path / "skip"
    evaluate(load_items(ann), flaky, out, on_error="skip")
    assert [r["id"] for r in lines(out)] == [r["Question_id"] for r in MME] and "error" in lines(out)[2]
    res = evaluate(load_items(ann), _predictor(MME_REPLIES, []), out, on_error="skip")
    assert [r["id"] for r in lines(out)] == [r["Question_id"] for r in MME]
    assert "error" not in lines(out)[2] and lines(out)[2]["reply"] == "B" and res["failed"] == 0

    out = tmp_path / "cut"
    evaluate(load_items(ann), flaky, out, limit=3, on_error="skip")
    calls = []

    def then_ctrl_c(item, prompt):
        if item.id == "rs/position/0004":
            raise KeyboardInterrupt
        return _predictor(MME_REPLIES, calls)(item, prompt)

    with pytest.raises(KeyboardInterrupt):
        evaluate(load_items(ann), then_ctrl_c, out, on_error="skip")
    assert calls == [failing]
    assert [(r["id"], "error" in r) for r in lines(out)] == [(r["Question_id"], False) for r in MME[:3]]
    assert not list(out.glob("*.tmp"))
    res = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out, on_error="skip")
    assert calls == [failing, "rs/position/0004"] and res["total"] == 4 and res["correct"] == 3
    assert len(lines(out)) == 4


def test_resumed_progress_bar_counts_only_the_items_asked(tmp_path, monkeypatch):
    """Items answered by an earlier run start the bar (initial), so its rate and ETA are those
    of the items this run asks; before, 200 skipped items made the rate ~100x too high."""
    import tqdm

    from engine.eval_items import EvalItem

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)
            self.updates = []

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    items = [EvalItem(str(i), "a.png", "Is there a ship?", [], "yes") for i in range(205)]
    out = tmp_path / "o"
    evaluate(items[:200], lambda it, p: "yes", out)
    seen = []

    def predict(item, prompt):
        seen.append((bars[-1].n, bars[-1].format_dict["initial"]))
        return "yes"

    res = evaluate(items, predict, out, progress=True)
    bar = bars[-1]
    assert res["total"] == 205 and bar.total == 205 and bar.n == 205
    assert seen[0] == (200, 200) and bar.updates == [1] * 5


def test_on_error_option(tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert parser.parse_args(["a.json"]).on_error == "stop"
    assert parser.parse_args(["a.json", "--on-error", "skip"]).on_error == "skip"
    with pytest.raises(ValueError, match="on_error"):
        evaluate([], _predictor({}, []), tmp_path / "o", on_error="ignore")


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_utf8_byte_order_mark_is_ignored(tmp_path, jsonl):
    ann = _write(tmp_path / ("mme.jsonl" if jsonl else "mme.json"), MME, jsonl=jsonl)
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    assert [it.id for it in load_items(ann)] == [r["Question_id"] for r in MME]


def test_an_answer_given_as_option_text_is_its_letter_and_a_foreign_answer_is_refused(tmp_path):
    def row(answer, idx=1):
        return {"index": idx, "image": "x.tif", "question": "Which facility?",
                "multi-choice options": ["(A) harbour", "(B) airport", "(C) farm", "(D) quarry"],
                "answer": answer, "category": "Task/Sub"}

    for answer, letters in (("(B) airport", "B"), ("airport", "B"), ("Airport", "B"), ("b", "B"),
                            ("A, C", "AC"), ("AC", "AC"), (["a", "c"], "AC")):
        assert load_items(_write(tmp_path / "ok.json", [row(answer)]))[0].answer == letters, answer
    mme = [{**MME[0], "Ground truth": "(B) blue"}]
    assert load_items(_write(tmp_path / "mme.json", mme))[0].answer == "B"

    for answer, why in (("E", "E, not among the options"), ("harbor", "neither option letters"),
                        ("(C) airport", "other text than that option"),
                        ("(E) pier", "outside the options")):
        with pytest.raises(EvalError, match=rf"annotation 1 \(id 7\) in .*bad.json: its answer .*{why}"):
            load_items(_write(tmp_path / "bad.json", [row("A"), row(answer, idx=7)]))


def test_field_mapping_keeps_an_explicit_format(tmp_path):
    """--field on top of --format mme / xlrs renames fields only: the format's instruction and
    xlrs's multi-label subtask stay (before, the mapping silently switched to generic)."""
    mme = [{("Prompt" if k == "Text" else k): v for k, v in MME[0].items()}]
    ann = _write(tmp_path / "mme.json", mme)
    item = load_items(ann, "mme", {"question": "Prompt"})[0]
    assert item.question == "What colour is the roof?" and item.answer == "B"
    assert item.category == "Perception/Remote Sensing/color"
    assert build_prompt(item).endswith("of the correct option.\nThe best answer is:")

    rows = [{"index": 10, "image": ["x.tif"], "question": "Which land-use classes appear?",
             "multi-choice options": ["(A) farmland", "(B) forest", "(C) water", "(D) urban"],
             "gt": "A C", "category": "Land use classification/Overall Land use classification"}]
    item = load_items(_write(tmp_path / "x.json", rows), "xlrs", {"answer": "gt"})[0]
    assert item.answer == "AC" and item.extra == {"format": "xlrs", "multi_label": True}
    assert "There may be more than one correct option" in build_prompt(item)

    lrs = [{"question_id": "q1", "image": "c.tif", "ask": "Is there a bridge?", "ground_truth": "yes"}]
    assert load_items(_write(tmp_path / "l.json", lrs), "lrsvqa", {"question": "ask"})[0].question == \
        "Is there a bridge?"
    with pytest.raises(EvalError, match="open-ended"):
        load_items(_write(tmp_path / "l.json", lrs), "lrsvqa", {"options": "ask"})
    # with --format auto a mapping still means the generic layout
    assert load_items(ann, "auto", {"question": "Prompt"})[0].extra == {}


@pytest.mark.parametrize("gt, reply, correct", [
    ("3.5", "3.5 meters", True),
    ("3.5", "3.50", True),
    ("3.5", "35", False),
    ("3.5", "3", False),
    ("-5", "5", False),
    ("-5", "-5 degrees", True),
    ("4", "4.", True),
    ("yes", "Yes, there is one.", True),
    # thousands separators and number words are the same number
    ("1000", "1,000", True),
    ("1,000", "1000 square meters", True),
    ("12345678", "12,345,678", True),
    ("1,2", "12", False),
    ("3", "Three.", True),
    ("three", "3 ships", True),
    ("two", "Twelve", False),
])
def test_open_ended_numbers_keep_decimals_and_sign(gt, reply, correct):
    from engine.eval_items import EvalItem
    from engine.eval_scoring import score_item

    assert score_item(EvalItem(id="1", image="x.tif", question="How far?", options=[], answer=gt), reply)[1] \
        is correct


def test_resume_compares_annotation_paths_as_files_not_text(tmp_path, monkeypatch):
    """'./mme.json' and 'mme.json' are the same file; 'mme.json' in another folder is not."""
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _write(tmp_path / "one" / "mme.json", MME)
    _write(tmp_path / "two" / "mme.json", MME[:2])
    out = str(tmp_path / "o")
    monkeypatch.chdir(tmp_path / "one")
    run_eval(parser.parse_args(["mme.json", "--out", out, "--limit", "1"]), predict=_predictor(MME_REPLIES, []))
    run_eval(parser.parse_args(["./mme.json", "--out", out, "--limit", "2"]), predict=_predictor(MME_REPLIES, []))
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(EvalError, match="annotations"):
        run_eval(parser.parse_args(["mme.json", "--out", out]), predict=_predictor(MME_REPLIES, []))
    # settings saved by an older version hold the path as typed: taken relative to the current folder
    saved = json.loads((tmp_path / "o" / "run_settings.json").read_text())
    assert saved["annotations"] == str(tmp_path / "one" / "mme.json")
    saved["annotations"] = "mme.json"
    (tmp_path / "o" / "run_settings.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path / "one")
    run_eval(parser.parse_args([str(tmp_path / "one" / "mme.json"), "--out", out, "--limit", "2"]),
             predict=_predictor(MME_REPLIES, []))


def test_eval_with_an_adapter_asks_with_the_visual_tokens_it_was_trained_on(tmp_path):
    """An adapter trained with --strategy anchored --tokens-per-tile 4 was evaluated with the
    default geollava tokens (eval sent an explicit strategy): the settings left out now take the
    adapter's training settings, recorded in run_settings.json; given ones are kept."""
    from engine.adapter_settings import write_training_settings

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    ann = _write(tmp_path / "mme.json", MME)
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    write_training_settings(adapter, {"format": 1, "strategy": "anchored", "budget": 512, "tokens_per_tile": 4,
                                      "faithful_empty_slots": False, "bands": None, "records_with_own_bands": 0})
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "a"), "--adapter", str(adapter), "--limit", "1"])
    run_eval(args, predict=_predictor(MME_REPLIES, []))
    saved = json.loads((tmp_path / "a" / "run_settings.json").read_text())
    assert (saved["strategy"], saved["budget"], saved["tokens_per_tile"]) == ("anchored", "512", "4")
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "b"), "--adapter", str(adapter), "--limit", "1",
                              "--strategy", "geollava", "--tokens-per-tile", "24"])
    run_eval(args, predict=_predictor(MME_REPLIES, []))
    saved = json.loads((tmp_path / "b" / "run_settings.json").read_text())
    assert (saved["strategy"], saved["budget"], saved["tokens_per_tile"]) == ("geollava", "512", "24")
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "c"), "--limit", "1"])  # no adapter: as before
    run_eval(args, predict=_predictor(MME_REPLIES, []))
    assert json.loads((tmp_path / "c" / "run_settings.json").read_text())["strategy"] == "geollava"
    (adapter / "geovqa_training.json").write_text("{")
    with pytest.raises(EvalError, match="cannot be read"):
        run_eval(parser.parse_args([str(ann), "--out", str(tmp_path / "d"), "--adapter", str(adapter)]),
                 predict=_predictor(MME_REPLIES, []))


def test_a_rerun_on_another_model_is_refused_before_it_loads(tmp_path, monkeypatch, tiny_checkpoint):
    """--weights left out both times: the model GEOVQA_WEIGHTS, the default folder or the demo gave
    each run is what is compared, not the None typed."""
    from conftest import demo_and_real

    import engine.evaluate as E

    real = demo_and_real(tmp_path, monkeypatch, tiny_checkpoint)
    loads = []
    monkeypatch.setattr(E, "engine_predictor",
                        lambda args, weights=None: loads.append(weights) or _predictor(MME_REPLIES, []))
    for image in ("a.png", "b.png"):
        (tmp_path / image).write_bytes(b"png")
    ann = _write(tmp_path / "mme.json", MME)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "o"
    run = lambda *extra: run_eval(parser.parse_args([str(ann), "--out", str(out), *extra]))  # noqa: E731

    run("--limit", "1")  # the demo model
    saved = json.loads((out / "run_settings.json").read_text())
    assert saved["demo_model"] is True and saved["weights"] == str(tiny_checkpoint.resolve())
    assert loads == [str(tiny_checkpoint.resolve())]  # the engine loads the folder recorded
    monkeypatch.setenv("GEOVQA_WEIGHTS", str(real))
    with pytest.raises(EvalError, match=r"weights: .* -> '.*real', demo_model: True -> False"):
        run("--limit", "2")
    assert len(loads) == 1  # refused before loading
    run("--limit", "2", "--weights", str(tmp_path / "cache" / "tiny-geollava"))  # the same demo folder, named
    # a settings file of an older version (--weights as typed: None, no demo_model): unchanged
    saved = json.loads((out / "run_settings.json").read_text())
    del saved["demo_model"]
    saved["weights"] = None
    (out / "run_settings.json").write_text(json.dumps(saved))
    run("--limit", "3")
    assert json.loads((out / "run_settings.json").read_text())["weights"] == str(real.resolve())


def test_kept_heatmaps_are_not_pruned_by_a_later_rerun(tmp_path, tiny_checkpoint):
    """--keep-heatmaps keeps them as the run's results: a rerun weeks later (the engine prunes its
    working files after GEOVQA_OUTPUT_RETENTION_DAYS) must not delete them."""
    import os
    import time

    import numpy as np
    from PIL import Image

    from engine.pipeline import _output_stem

    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(tmp_path / "a.png")
    ann = _write(tmp_path / "mme.json", MME[:1])
    old = tmp_path / "e" / "heatmaps" / f"{_output_stem('What colour is the roof?')}_heatmap.tif"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"kept a month ago")
    past = time.time() - 30 * 86400
    os.utime(old, (past, past))
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(ann), "--out", str(tmp_path / "e"), "--weights", str(tiny_checkpoint),
                              "--device", "cpu", "--quantization", "fp32", "--tokens-per-tile", "4",
                              "--max-new-tokens", "2", "--keep-heatmaps"])
    assert run_eval(args) == 0
    assert old.read_bytes() == b"kept a month ago"
    assert len(list(old.parent.glob("*_heatmap.tif"))) == 2  # and this run's own


def test_the_selection_is_steered_by_the_question_and_options_not_the_instruction(tmp_path, monkeypatch):
    """The LM reads the whole prompt; the question-guided strategies (pyramid, budget) score the
    image against the question and its options only: the answer instruction every item shares
    made them rank the image alike for every question."""
    from engine.eval_items import EvalItem
    from engine.evaluate import engine_predictor

    asked = _recording_engine(monkeypatch)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a.json"), "--out", str(tmp_path / "o"), "--strategy", "budget"])
    item = EvalItem("1", "a.tif", "How many ships are docked?", ["one", "two"], "B")
    prompt = build_prompt(item)
    assert engine_predictor(args, weights=str(tmp_path))(item, prompt) == "B"
    req = asked[0]
    assert req.question == prompt
    assert req.selection_text == "How many ships are docked?\none\ntwo"
    assert prompt.splitlines()[-1] not in req.selection_text  # the instruction


CHANGE_DETECTION = {"index": 201, "image": ["t2015.tif", "t2019.tif"],
                    "question": "How many new buildings appear between the two images?",
                    "multi-choice options": ["(A) 3", "(B) 5", "(C) 8", "(D) 12"], "answer": "B",
                    "category": "Counting/Counting with changing detection", "l2-category": "change"}


def test_an_xlrs_item_with_two_images_is_skipped_with_its_reason_not_asked_about_the_first(tmp_path, capsys):
    """XLRS-Bench-lite's change-detection items hold two images (two dates); lmms-eval gives the
    model both. The loader kept image[0] and dropped the other date without a word, so "how many
    buildings were added?" was asked, and scored, about one date. The engine answers about one
    raster: such an item is not asked, and is counted apart from the figures, reason given."""
    ann = _write(tmp_path / "cd.json", [CHANGE_DETECTION, XLRS_SINGLE])
    items = load_items(ann)
    assert items[0].extra["images"] == ["t2015.tif", "t2019.tif"]
    asked = []
    res = evaluate(items, lambda it, p: asked.append(it.id) or "B", tmp_path / "o")
    assert asked == ["101"]
    assert res["total"] == 1 and res["correct"] == 1 and res["skipped"] == 1
    assert res["skipped_reasons"] == {"needs 2 images; the engine answers about one": 1}
    assert "Counting/Counting with changing detection" not in res["per_category"]
    line = json.loads((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["skipped"] == "needs 2 images; the engine answers about one" and "correct" not in line
    assert line["image"] == ["t2015.tif", "t2019.tif"]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["skipped"] == 1
    assert "1 items skipped (needs 2 images; the engine answers about one)" in (tmp_path / "o" / "results.md").read_text()
    # a folder an older version filled (the item answered about its first image): skipped on resume
    out = tmp_path / "old"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps(
        {"id": "201", "category": CHANGE_DETECTION["category"], "image": "t2015.tif", "reply": "B",
         "prediction": "B", "answer": "B", "correct": True, "multiple_choice": True, "seconds": 1.0}) + "\n")
    res = evaluate(items, lambda it, p: "B", out)
    assert res["skipped"] == 1 and res["total"] == 1
    assert [json.loads(x).get("skipped") is not None for x in (out / "predictions.jsonl").read_text().splitlines()] \
        == [True, False]
    # the CLI says so; its images need not exist
    (tmp_path / "p1.tif").write_bytes(b"x")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    from engine.evaluate import _check_images

    args = parser.parse_args([str(ann), "--out", str(tmp_path / "cli")])
    _check_images(args, items)
    run_eval(args, predict=lambda it, p: "B")
    assert "1 items skipped (needs 2 images; the engine answers about one)" in capsys.readouterr().out


# ----------------------------------------------------------- official rules (the headline figure)

@pytest.mark.parametrize("reply, official_correct, lenient_correct", [
    ("B", True, True),
    ("(B) red", True, True),
    ("The answer is B.", True, True),
    # lmms-eval's xlrs extract_characters_regex collects every a-e/A-E letter of a reply that has
    # no "(X)" form, including those inside words, so these are wrong there
    ("B. The ship hull is painted red.", False, True),
    ("Answer: B", False, True),
    # no capital A-E at all: "" there
    ("b", False, True),
    ("The best answer is (B)", True, True),
])
def test_xlrs_letters_are_extracted_as_lmms_eval_extracts_them(tmp_path, reply, official_correct, lenient_correct):
    from engine.eval_scoring import score_item, scores

    item = load_items(_write(tmp_path / "x.json", [XLRS_SINGLE]))[0]
    pred, ok = score_item(item, reply)
    assert ok == official_correct, f"{reply!r}: ours {pred!r} -> {ok}, xlrs-lite -> {official_correct}"
    assert scores(item, reply)["lenient_correct"] == lenient_correct


@pytest.mark.parametrize("reply, official_correct, lenient_correct", [
    ("C", True, True),
    # MME-RealWorld's extract_characters_regex keeps the first capital A-E of the reply: a reply
    # naming several letters is scored by its first one
    ("C, D", True, False),
    ("C or D", True, False),
    # ... and that first capital may be inside a word ("Based"): B, wrong
    ("Based on the image, the answer is C", False, True),
    ("The best answer is C", True, True),
    # no capital, up to 10 words: the first choice that contains the reply
    ("3", True, True),
    ("planes", False, False),  # "(E) The image does not feature planes."
])
def test_mme_letters_are_extracted_as_the_official_script_extracts_them(tmp_path, reply, official_correct,
                                                                         lenient_correct):
    from engine.eval_scoring import score_item, scores

    item = load_items(_write(tmp_path / "m.json", [MME_RS]))[0]
    pred, ok = score_item(item, reply)
    assert ok == official_correct, f"{reply!r}: ours {pred!r} -> {ok}, MME-RealWorld -> {official_correct}"
    assert scores(item, reply)["lenient_correct"] == lenient_correct


def test_both_figures_are_reported_official_first_and_old_lines_are_rescored_on_resume(tmp_path, capsys):
    """The headline figure is the official one; the lenient reading is kept as a second, labelled
    figure in predictions.jsonl, results.json and results.md. Lines an older version wrote (no
    lenient fields) are rescored from their stored reply, not asked again."""
    rows = [XLRS_SINGLE, dict(XLRS_SINGLE, index=103), dict(XLRS_SINGLE, index=104)]
    ann = _write(tmp_path / "x.json", rows)
    out = tmp_path / "o"
    out.mkdir()
    # an older version's line: its "correct" was the lenient verdict
    (out / "predictions.jsonl").write_text(json.dumps(
        {"id": "101", "category": XLRS_SINGLE["category"], "image": "p1.tif", "reply": "Answer: B",
         "prediction": "B", "answer": "B", "correct": True, "multiple_choice": True, "seconds": 1.0}) + "\n")
    asked = []
    replies = {"103": "B", "104": "B. The hull is red."}
    res = evaluate(load_items(ann), lambda it, p: asked.append(it.id) or replies[it.id], out)
    assert asked == ["103", "104"]
    assert (res["correct"], res["total"]) == (1, 3) and res["lenient"]["correct"] == 3
    assert res["lenient"]["micro_accuracy"] == 1.0 and res["micro_accuracy"] == pytest.approx(1 / 3)
    lines = {json.loads(x)["id"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    assert lines["101"]["correct"] is False and lines["101"]["lenient_correct"] is True
    assert lines["101"]["prediction"] == "ABE" and lines["101"]["lenient_prediction"] == "B"
    saved = json.loads((out / "results.json").read_text())
    assert saved["correct"] == 1 and saved["lenient"]["correct"] == 3 and "lmms-eval" in saved["official_rule"]["xlrs"]
    md = (out / "results.md").read_text()
    assert "| Object properties/Object color | 1 | 3 | 33.33 | 100.00 |" in md
    assert "accuracy (%) | lenient (%)" in md and "official rule" in md
    # that old answer was asked with the old prompt wording: said, not hidden
    assert saved["older_prompt_answers"] == 1 and "1 answers were made by an older version" in md
    assert lines["101"]["older_prompt"] is True and "older_prompt" not in lines["103"]
    assert evaluate(load_items(ann), lambda it, p: "B", out)["older_prompt_answers"] == 1  # and stays said
    assert "older_prompt_answers" not in evaluate(load_items(ann), lambda it, p: "B", tmp_path / "new")


def test_mme_categories_are_keyed_by_task_subtask_and_category_as_the_official_table(tmp_path):
    """eval_your_results.py counts per Task / Subtask / Category (lowercased, the "attribute"
    categories merged); the same Category name ("diagram") under Perception and under Reasoning is
    two rows of its table. Ours keyed by Category alone and pooled them (the macro average too)."""
    rows = [dict(MME_RS, Question_id="perception/diagram_and_table/diagram/0001", Task="Perception",
                 Subtask="Diagram and Table", Category="diagram", **{"Ground truth": "A"}),
            dict(MME_RS, Question_id="reasoning/diagram_and_table/diagram/0001", Task="Reasoning",
                 Subtask="Diagram and Table", Category="diagram", **{"Ground truth": "A"}),
            dict(MME_RS, Question_id="ad/1", Task="Perception", Subtask="Autonomous_Driving",
                 Category="Vehicle/attribute/color", **{"Ground truth": "A"}),
            dict(MME_RS, Question_id="ad/2", Task="Perception", Subtask="Autonomous_Driving",
                 Category="vehicle/Attribute/orientation", **{"Ground truth": "A"})]
    items = load_items(_write(tmp_path / "mme.json", rows))
    replies = {rows[0]["Question_id"]: "A", rows[1]["Question_id"]: "B", "ad/1": "A", "ad/2": "B"}
    res = evaluate(items, lambda it, p: replies[it.id], tmp_path / "o")
    assert res["per_category"] == {
        "Perception/Autonomous_Driving/vehicle/attribute": {"correct": 1, "total": 2, "accuracy": 0.5},
        "Perception/Diagram and Table/diagram": {"correct": 1, "total": 1, "accuracy": 1.0},
        "Reasoning/Diagram and Table/diagram": {"correct": 0, "total": 1, "accuracy": 0.0}}
    assert res["per_task"]["Perception"]["total"] == 3


# LRS-VQA's synonym test stands in for WordNet here (nltk's data is a separate download)
SYNSETS = [{"grey", "gray"}, {"plane", "airplane", "aeroplane"}]


def _fake_synonyms(a, b):
    return any(a in group and b in group for group in SYNSETS)


LRS_ROW = {"question_id": "STAR_1", "image": "LRS_VQA/image/1.tif", "category": "object color",
           "text": "What is the color of the tank?\n Answer the question using a single word or phrase."}


@pytest.mark.parametrize("gt, reply, official_correct, lenient_correct", [
    ("white", "white", True, True),
    ("white", "White", True, True),
    # evaluation_LRSVQA.py: equal after lower(), else WordNet synonyms (a shared synset)
    ("grey", "gray", True, False),
    ("plane", "airplane", True, False),
    # ... and nothing else: no first-word or number-prefix rule
    ("yes", "Yes, there is one.", False, True),
    ("3", "3 ships", False, True),
    ("white", "white.", False, True),
])
def test_lrsvqa_answers_are_judged_as_the_official_script_judges_them(tmp_path, gt, reply, official_correct,
                                                                      lenient_correct):
    from engine.eval_scoring import score_item, scores

    item = load_items(_write(tmp_path / "l.jsonl", [dict(LRS_ROW, ground_truth=gt)], jsonl=True))[0]
    pred, ok = score_item(item, reply, synonyms=_fake_synonyms)
    assert ok == official_correct, f"gt {gt!r}, reply {reply!r}: ours {ok}, LRS-VQA {official_correct}"
    assert scores(item, reply, _fake_synonyms)["lenient_correct"] == lenient_correct


def test_without_wordnet_the_lrsvqa_figure_says_it_lacks_synonyms(tmp_path, monkeypatch, capsys):
    """nltk and its wordnet data are optional: without them the official figure counts exact
    matches only, and results.json, results.md and the CLI say so; with them (here a stand-in)
    synonyms count and nothing is said."""
    import engine.eval_scoring as E

    rows = [dict(LRS_ROW, ground_truth="grey"), dict(LRS_ROW, question_id="STAR_2", ground_truth="white")]
    ann = _write(tmp_path / "l.jsonl", rows, jsonl=True)
    replies = {"STAR_1": "gray", "STAR_2": "white"}
    monkeypatch.setattr(E, "wordnet_synonyms", lambda: None)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    run_eval(parser.parse_args([str(ann), "--out", str(tmp_path / "no")]), predict=_predictor(replies, []))
    note = "official rule without WordNet synonyms: install nltk and its wordnet data for the exact rule"
    assert note in capsys.readouterr().out
    saved = json.loads((tmp_path / "no" / "results.json").read_text())
    assert saved["correct"] == 1 and note in saved["official_note"]
    assert note in (tmp_path / "no" / "results.md").read_text()

    monkeypatch.setattr(E, "wordnet_synonyms", lambda: _fake_synonyms)
    res = evaluate(load_items(ann), _predictor(replies, []), tmp_path / "yes")
    assert res["correct"] == 2 and "official_note" not in res
    # a multiple-choice file needs no WordNet: nothing said
    res = evaluate(load_items(_write(tmp_path / "x.json", [XLRS_SINGLE])), lambda it, p: "B", tmp_path / "x",
                   synonyms=None)
    assert "official_note" not in res


def test_wordnet_synonyms_share_a_synset_and_are_none_without_nltk_or_its_data(monkeypatch):
    import sys
    import types

    import engine.eval_scoring as E

    class WordNet:
        def __init__(self, data):
            self.data = data

        def synsets(self, word):
            if self.data is None:
                raise LookupError("Resource wordnet not found.")
            return [f"{group}.n.01" for group, words in self.data.items() if word in words]

    def with_wordnet(data):
        corpus = types.ModuleType("nltk.corpus")
        corpus.wordnet = WordNet(data)
        nltk = types.ModuleType("nltk")
        nltk.corpus = corpus
        monkeypatch.setitem(sys.modules, "nltk", nltk)
        monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
        monkeypatch.setattr(E, "_wordnet_cache", [])
        return E.wordnet_synonyms()

    fn = with_wordnet({"gray": {"grey", "gray", "dog"}, "airplane": {"plane", "airplane"}, "dog": {"dog"}})
    assert fn("grey", "gray") and fn("plane", "airplane") and not fn("grey", "plane") and not fn("x", "x")
    assert with_wordnet(None) is None  # nltk without its data
    monkeypatch.setitem(sys.modules, "nltk", None)  # no nltk at all
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    monkeypatch.setattr(E, "_wordnet_cache", [])
    assert E.wordnet_synonyms() is None


def test_lrsvqa_is_reported_per_source_dataset_as_the_official_tables_are(tmp_path):
    """evaluation_LRSVQA.py splits the results by the id's prefix (FAIR / GLH-Bridge / STAR) and
    prints OA and AA (mean of category accuracies) for each; the LRS-VQA tables are LRS-FAIR,
    LRS-Bridge and LRS-STAR. Ours pooled the three, so its micro/macro was none of those numbers."""
    q = "\n Answer the question using a single word or phrase."
    rows = [
        {"question_id": "FAIR_1", "image": "i/1.tif", "category": "count", "text": "How many planes?" + q, "ground_truth": "2"},
        {"question_id": "GLH-Bridge_1", "image": "i/3.tif", "category": "count", "text": "How many bridges?" + q, "ground_truth": "1"},
        {"question_id": "STAR_1", "image": "i/2.tif", "category": "count", "text": "How many tanks?" + q, "ground_truth": "4"},
        {"question_id": "STAR_2", "image": "i/2.tif", "category": "count", "text": "How many ships?" + q, "ground_truth": "3"},
        {"question_id": "STAR_3", "image": "i/2.tif", "category": "count", "text": "How many cars?" + q, "ground_truth": "9"},
        {"question_id": "STAR_4", "image": "i/2.tif", "category": "object color", "text": "Colour of the roof?" + q, "ground_truth": "red"},
    ]
    items = load_items(_write(tmp_path / "lrs.jsonl", rows, jsonl=True))
    replies = {"FAIR_1": "2", "GLH-Bridge_1": "1 bridge", "STAR_1": "5", "STAR_2": "5", "STAR_3": "5", "STAR_4": "red"}
    evaluate(items, lambda it, p: replies[it.id], tmp_path / "o", synonyms=None)
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    per = saved["per_dataset"]
    assert list(per) == ["FAIR", "GLH-Bridge", "STAR"]
    # official: FAIR OA 1/1, AA 1.0; STAR OA 1/4, AA (0/3 + 1/1) / 2 = 0.5; Bridge "1 bridge" is wrong
    assert (per["FAIR"]["OA"], per["FAIR"]["AA"]) == (1.0, 1.0)
    assert (per["STAR"]["correct"], per["STAR"]["total"], per["STAR"]["OA"], per["STAR"]["AA"]) == (1, 4, 0.25, 0.5)
    assert per["STAR"]["per_category"]["count"] == {"correct": 0, "total": 3, "accuracy": 0.0}
    assert per["GLH-Bridge"]["OA"] == 0.0 and saved["lenient"]["per_dataset"]["GLH-Bridge"]["OA"] == 1.0
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| STAR | count | 0 | 3 | 0.00 | 0.00 |" in md and "| **STAR** | **OA** | 1 | 4 | 25.00 | 25.00 |" in md
    assert "| **STAR** | **AA** | | | 50.00 | 50.00 |" in md
    # ids without a prefix: no such block
    plain = [dict(r, question_id=str(k)) for k, r in enumerate(rows)]
    res = evaluate(load_items(_write(tmp_path / "p.jsonl", plain, jsonl=True)), lambda it, p: "2", tmp_path / "p",
                   synonyms=None)
    assert "per_dataset" not in res


def test_each_benchmark_is_asked_with_its_official_number_of_new_tokens(tmp_path, monkeypatch):
    """Every format was generated with at most 64 new tokens; LRS-VQA's official inference script
    generates up to 128. Each format now has its benchmark's cap; --max-new-tokens still sets one
    for every item, and the run's settings record the cap used."""
    from engine.evaluate import engine_predictor

    asked = _recording_engine(monkeypatch)
    lrs = load_items(_write(tmp_path / "lrs.jsonl", [{"question_id": "FAIR_1", "image": "a.tif", "category": "count",
                                                      "text": "How many ships?", "ground_truth": "3"}]))[0]
    xlrs = load_items(_write(tmp_path / "x.json", [XLRS_SINGLE]))[0]
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(tmp_path / "lrs.jsonl"), "--out", str(tmp_path / "o")])
    predict = engine_predictor(args, weights=str(tmp_path))
    predict(lrs, build_prompt(lrs))
    predict(xlrs, build_prompt(xlrs))
    assert [r.max_new_tokens for r in asked] == [128, 64]
    args = parser.parse_args([str(tmp_path / "lrs.jsonl"), "--out", str(tmp_path / "o"), "--max-new-tokens", "10"])
    engine_predictor(args, weights=str(tmp_path))(lrs, build_prompt(lrs))
    assert asked[-1].max_new_tokens == 10
    # recorded in the run's settings: a folder of answers cut at 64 tokens is not resumed at 128
    out = str(tmp_path / "r")
    run_eval(parser.parse_args([str(tmp_path / "lrs.jsonl"), "--out", out]), predict=lambda it, p: "3")
    assert json.loads((tmp_path / "r" / "run_settings.json").read_text())["max_new_tokens"] == "128"
    with pytest.raises(EvalError, match="max_new_tokens: '128' -> '64'"):
        run_eval(parser.parse_args([str(tmp_path / "lrs.jsonl"), "--out", out, "--max-new-tokens", "64"]),
                 predict=lambda it, p: "3")


def test_a_limited_run_says_its_macro_covers_only_the_categories_asked(tmp_path):
    """--limit keeps the first N items: the macro average is the mean over the categories those
    items have, not over the file's. The figure stays; the results say what it covers."""
    ann = _write(tmp_path / "mme.json", MME)
    res = evaluate(load_items(ann), _predictor(MME_REPLIES, []), tmp_path / "l", limit=2)
    assert "2 categories these items have only" in res["macro_note"] and "--limit 2, of 4 items" in res["macro_note"]
    assert res["macro_note"] in (tmp_path / "l" / "results.md").read_text()
    assert json.loads((tmp_path / "l" / "results.json").read_text())["macro_note"] == res["macro_note"]
    full = evaluate(load_items(ann), _predictor(MME_REPLIES, []), tmp_path / "f")
    assert "macro_note" not in full and "limited run" not in (tmp_path / "f" / "results.md").read_text()
    assert "macro_note" not in evaluate(load_items(ann), _predictor(MME_REPLIES, []), tmp_path / "g", limit=9)


def test_eval_records_the_bands_of_its_adapter_with_its_other_training_settings(tmp_path):
    """The engine applies an --adapter's bands to every image that has them, as it applies its
    strategy, budget and tokens a tile; run_settings.json recorded those but not the bands, so a
    rerun with an adapter trained on other bands resumed answers made on other colours."""
    from engine.adapter_settings import write_training_settings

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    ann = _write(tmp_path / "mme.json", MME)
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    settings = {"format": 1, "strategy": "anchored", "budget": None, "tokens_per_tile": 4,
                "faithful_empty_slots": False, "bands": [4, 3, 2], "records_with_own_bands": 0}
    write_training_settings(adapter, settings)
    out = tmp_path / "a"
    run = lambda *extra: run_eval(parser.parse_args([str(ann), "--out", str(out), *extra]),  # noqa: E731
                                  predict=_predictor(MME_REPLIES, []))
    run("--adapter", str(adapter), "--limit", "1")
    assert json.loads((out / "run_settings.json").read_text())["bands"] == "4,3,2"
    write_training_settings(adapter, {**settings, "bands": [1, 2, 3]})
    with pytest.raises(EvalError, match="bands: '4,3,2' -> '1,2,3'"):
        run("--adapter", str(adapter), "--limit", "2")
    # a settings file of an older version, without bands: assumed unchanged
    saved = json.loads((out / "run_settings.json").read_text())
    del saved["bands"]
    (out / "run_settings.json").write_text(json.dumps(saved))
    run("--adapter", str(adapter), "--limit", "2")
    assert json.loads((out / "run_settings.json").read_text())["bands"] == "1,2,3"
    run_eval(parser.parse_args([str(ann), "--out", str(tmp_path / "b"), "--limit", "1"]),
             predict=_predictor(MME_REPLIES, []))
    assert json.loads((tmp_path / "b" / "run_settings.json").read_text())["bands"] is None  # no adapter


def test_option_text_fallback_prefers_the_longest_option_named():
    opts = ["harbor", "harbor with ships", "plane", "car"]
    assert extract_letters("a harbor with ships", opts) == "B"


def test_mme_letter_rules_after_the_cue_phrases_are_deleted():
    from engine.eval_scoring import mme_official_letter

    opts = [o.split(") ", 1)[1] for o in MME_RS["Answer choices"]]
    # "The answer is" is deleted first, so the reply is "3": the first choice containing it
    assert mme_official_letter("The answer is 3", opts) == "C"
    # an empty reply is contained in every choice: A, as the official script reads it
    assert mme_official_letter("", opts) == "A"
    long_opt = ["one two three four five six seven eight nine ten eleven", "x"]
    # up to 10 words without a capital A-E: looked up in the choices; more: no letter
    assert mme_official_letter("two three four five six seven eight nine ten eleven", long_opt) == "A"
    assert mme_official_letter("one two three four five six seven eight nine ten eleven", long_opt) == ""


def test_an_empty_field_gives_way_to_the_next_name_of_it():
    (item,) = load_items_from_rows([{"id": 7, "image": "a.png", "question": "", "text": "How many ships?",
                                     "answer": "3"}])
    assert (item.id, item.question, item.answer) == ("7", "How many ships?", "3")


def test_an_answer_two_options_share_is_refused_not_read_as_the_first():
    from engine.eval_items import choice_answer

    with pytest.raises(EvalError, match="neither option letters"):
        choice_answer("airport", ["airport", "the airport", "harbor"])
    assert choice_answer("harbor", ["airport", "the airport", "harbor"]) == "C"


def test_a_record_with_a_question_and_choices_is_xlrs():
    from engine.eval_items import detect_format

    assert detect_format({"question": "Which?", "choices": ["ship", "car"], "answer": "A"}) == "xlrs"
    assert detect_format({"question": "How many?", "answer": "3"}) == "generic"


def test_answer_text_normalisation_details():
    from engine.eval_items import norm_text

    assert norm_text("An airport") == norm_text("the airport") == norm_text("airport") == "airport"
    assert norm_text("1,000 ships") == "1000 ships"
    assert norm_text("1,2345") == "1 2345"  # not a thousands separator


def test_letters_named_twice_are_one_letter():
    from engine.eval_items import choice_answer, normalize_letters

    assert normalize_letters("A, a") == "A" and normalize_letters(["C", "A", "c"]) == "AC"
    assert choice_answer("A and A", ["ship", "car"]) == "A"


def test_only_an_options_own_letter_is_stripped_from_its_text():
    (item,) = load_items_from_rows([{"id": 1, "image": "a.png", "question": "Which?",
                                     "options": ["(A) ship", "A. harbor", "(C) plane"], "answer": "C"}])
    assert item.options == ["ship", "A. harbor", "plane"]


def test_a_stored_open_ended_answer_is_not_marked_as_an_older_prompts(tmp_path):
    """Only xlrs and mme changed their prompt wording; a generic answer without the lenient fields
    is rescored but is not said to come from an older prompt."""
    items = load_items_from_rows([{"id": 1, "image": "a.png", "question": "How many ships?", "answer": "3"}])
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps({"id": "1", "category": "all", "image": "a.png",
                                                       "reply": "3", "prediction": "3", "correct": True,
                                                       "answer": "3", "multiple_choice": False}) + "\n")

    def must_not_ask(item, prompt):
        raise AssertionError("a stored answer was asked again")

    res = evaluate(items, must_not_ask, out)
    assert res["correct"] == 1 and "older_prompt_answers" not in res
    (line,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert "older_prompt" not in line


def test_a_limit_of_every_item_is_no_limited_run(tmp_path):
    ann = _write(tmp_path / "mme.json", MME)
    res = evaluate(load_items(ann), _predictor(MME_REPLIES, []), tmp_path / "l", limit=len(MME))
    assert "macro_note" not in res


# ---------------------------------------------------------------------------------------------
# The figures and their table, from scored records (no model)

SCORED = [
    {"id": "FAIR_1", "category": "A/x", "multiple_choice": True, "correct": True, "lenient_correct": True,
     "prediction": "A", "lenient_prediction": "A"},
    {"id": "FAIR_2", "category": "A/x", "multiple_choice": True, "correct": False, "lenient_correct": True,
     "prediction": "", "lenient_prediction": "B"},  # no letter by the official rule
    {"id": "FAIR_3", "category": "A/x", "multiple_choice": True, "correct": False, "lenient_correct": False,
     "prediction": "C", "lenient_prediction": "C"},
    {"id": "FAIR_4", "category": "B/y", "multiple_choice": True, "correct": False, "lenient_correct": False,
     "prediction": "", "error": "boom"},  # failed: counted wrong, not as "no letter"
    {"id": "STAR_1", "category": "A/z", "multiple_choice": True, "correct": True, "lenient_correct": True,
     "prediction": "D", "lenient_prediction": "D"},
    {"id": "STAR_2", "skipped": "needs 2 images; the engine answers about one"},
]


def test_the_figures_of_scored_records():
    from engine.eval_report import summarize

    res = summarize(SCORED, formats=["lrsvqa"], wordnet=True)
    assert (res["correct"], res["total"], res["failed"], res["skipped"], res["no_letter_found"]) == (2, 5, 1, 1, 1)
    assert res["skipped_reasons"] == {"needs 2 images; the engine answers about one": 1}
    assert res["micro_accuracy"] == pytest.approx(2 / 5)
    assert res["macro_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert res["lenient"]["macro_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert res["per_task"] == {"A": {"correct": 2, "total": 4, "accuracy": 0.5},
                               "B": {"correct": 0, "total": 1, "accuracy": 0.0}}
    fair = res["per_dataset"]["FAIR"]
    assert (fair["OA"], fair["AA"]) == (pytest.approx(1 / 4), pytest.approx((1 / 3 + 0) / 2))
    assert "official_note" not in res
    assert "official_note" not in summarize(SCORED, formats=["xlrs"], wordnet=False)
    assert "official_note" in summarize(SCORED, formats=["lrsvqa"], wordnet=False)
    # categories not all "Task/Subtask": no task totals
    mixed = [dict(r, category="plain") if r["id"] == "STAR_1" else r for r in SCORED]
    assert "per_task" not in summarize(mixed)


def test_the_table_of_scored_records():
    from engine.eval_report import markdown_table, summarize

    md = markdown_table(summarize(SCORED, formats=["lrsvqa"]), title="t").splitlines()
    for row in ("| A/x | 1 | 3 | 33.33 | 66.67 |",
                "| *A (task)* | 2 | 4 | 50.00 | 75.00 |",
                "| **micro (overall)** | 2 | 5 | 40.00 | 60.00 |",
                "| **macro (mean of categories)** | | | 44.44 | 55.56 |",
                "| FAIR | A/x | 1 | 3 | 33.33 | 66.67 |",
                "| **FAIR** | **OA** | 1 | 4 | 25.00 | 50.00 |",
                "| **FAIR** | **AA** | | | 16.67 | 33.33 |",
                "1 multiple-choice replies named no option by the official rule (counted wrong).",
                "1 items skipped (needs 2 images; the engine answers about one): not asked, and in none of the figures above.",
                "1 items failed (counted wrong; their errors are in predictions.jsonl, and a rerun into the same "
                "folder tries them again)."):
        assert row in md, row


def test_resumed_runs_compare_their_settings_as_the_engine_resolves_them(tmp_path, monkeypatch):
    """Shared by `eval` into an existing --out and `finetune --resume` (engine/run_settings.py)."""
    import argparse

    from engine.run_settings import (absolute_path, changed_settings, resolve_tokens_per_tile,
                                     with_model_choice, with_resolved_quantization)

    monkeypatch.chdir(tmp_path)
    assert absolute_path("") is None and absolute_path(None) is None
    assert absolute_path("data") == str(tmp_path / "data")
    assert changed_settings({"img": ""}, {"img": None}, ["img"], paths=["img"]) == ""
    assert changed_settings({"img": "data"}, {"img": str(tmp_path / "data")}, ["img"], paths=["img"]) == ""
    # a setting an older version did not record counts as its default
    assert changed_settings({}, {"seed": 0}, ["seed"], defaults={"seed": 0}) == ""
    assert changed_settings({}, {"seed": 1}, ["seed"], defaults={"seed": 0}) == "seed: 0 -> 1"
    current = {"weights": "/w/real", "demo_model": False, "quantization": "nf4"}
    assert with_model_choice({"weights": None}, current)["weights"] == "/w/real"
    assert with_model_choice({"weights": "/w/other"}, current)["weights"] == "/w/other"
    assert with_resolved_quantization({"quantization": None}, current)["quantization"] == "nf4"
    assert with_resolved_quantization({"quantization": "auto"}, current)["quantization"] == "nf4"
    assert with_resolved_quantization({"quantization": "bf16"}, current)["quantization"] == "bf16"
    args = argparse.Namespace(tokens_per_tile=7)
    resolve_tokens_per_tile(args, {"weights": str(tmp_path / "not-read")})
    assert args.tokens_per_tile == 7


def test_prompt_pieces_of_open_and_several_image_items():
    from engine.eval_items import EvalItem
    from engine.eval_prompts import selection_text, skip_reason

    open_ended = EvalItem("1", "a.tif", "What is the road made of? Answer with a short phrase.", [], "asphalt")
    assert build_prompt(open_ended) == open_ended.question  # it carries its own instruction
    plain = EvalItem("2", "a.tif", "What is the road made of?", [], "asphalt")
    assert build_prompt(plain) == "What is the road made of?\nAnswer the question using a single word or phrase."
    two = EvalItem("3", "a.tif", "Which changed?", ["x", "y"], "A", extra={"images": ["a.tif", "b.tif"]})
    one = EvalItem("4", "a.tif", "Which changed?", ["x", "y"], "A", extra={"images": ["a.tif"]})
    assert skip_reason(two) == "needs 2 images; the engine answers about one" and skip_reason(one) is None
    assert selection_text(one) == "Which changed?\nx\ny"


# --- found by property-based testing of the annotation readers ----------------------------------

@pytest.mark.parametrize("text, message", [
    ("null\n", "annotation 0 .* is not a JSON object"),                      # TypeError: list(None)
    ('[{"question": "q?", "options": false, "answer": "A"}]', "not a list of option texts"),
    ('[{"question": "q?", "options": 5, "answer": "A"}]', "not a list of option texts"),
    (json.dumps([{"question": "q?", "options": [str(k) for k in range(27)], "answer": "A"}]),
     "27 options"),                                                          # IndexError at the 27th
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),                      # RecursionError
    ('{"question": "q?", "answer": 1' + "0" * 5000 + "}\n", "neither JSON nor JSON Lines"),
    ('{"question": "q?", "answer": "yes", "id": "\\ud800"}\n', "not valid Unicode"),  # a write error later
])
def test_annotations_json_or_the_options_reader_could_not_take_are_eval_errors(tmp_path, text, message):
    """Each raised TypeError, IndexError, RecursionError or ValueError instead of an EvalError
    naming the annotation (the lone surrogate only once its prediction line was written)."""
    p = tmp_path / "ann.jsonl"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(EvalError, match=message):
        load_items(p)


def test_an_annotation_file_that_is_not_utf8_is_an_eval_error(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"question": "où?", "answer": "oui"}]'.encode("latin-1"))
    with pytest.raises(EvalError, match="cannot be read as UTF-8"):
        load_items(p)


def test_a_line_cut_inside_a_utf8_character_is_redone_on_resume(tmp_path):
    """An interruption can cut predictions.jsonl's last line inside a multi-byte character: the
    resumed run raised UnicodeDecodeError instead of asking that item again."""
    ann = _write(tmp_path / "mme.json", MME)
    calls = []
    out = tmp_path / "run"
    evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out, limit=2)
    with (out / "predictions.jsonl").open("ab") as f:
        f.write('{"id": "rs/count/0003", "reply": "é'.encode("utf-8")[:-1])  # half of "é"
    r = evaluate(load_items(ann), _predictor(MME_REPLIES, calls), out)
    assert calls[2:] == ["rs/count/0003", "rs/position/0004"] and r["total"] == 4
    assert len((out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 4
