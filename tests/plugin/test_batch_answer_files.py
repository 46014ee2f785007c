"""Where the batch answers go and what the log says about them: temporary outputs of
"Batch questions" kept in the results folder (qgis_process deletes its temporary folder when it
exits: see test_headless_processing for the run through qgis_process), the answers file named
before the first question and again when a run is cancelled or fails, JSON / JSON Lines
written as UTF-8 text, and the CSV as UTF-8 with a byte-order mark (what Excel on Windows needs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import recording_feedback, run_batch_dialog

ANSWER = "The area is 64 x 48 pixels with 3 bands."


def _rows(path):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def test_temporary_answers_are_written_to_new_files_in_the_results_folder(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    """OUTPUT defaulted to TEMPORARY_OUTPUT, a file in QGIS's temporary folder (/tmp/processing_*),
    which qgis_process deletes when it exits: the answers were lost. However the temporary output
    is given, the answers now go to a new answers_<date>_<time>.csv in the results folder, which is
    the OUTPUT; OUTPUT_JSON asked for as a temporary output likewise (same name, .json)."""
    import processing
    from qgis.core import QgsProcessing, QgsProcessingOutputLayerDefinition, QgsProcessingUtils

    layer = raster_layer("a")
    results = tmp_path / "results"
    temporary = {"left out": None, "TEMPORARY_OUTPUT": QgsProcessing.TEMPORARY_OUTPUT,
                 "the toolbox's definition": QgsProcessingOutputLayerDefinition(QgsProcessing.TEMPORARY_OUTPUT),
                 "empty": ""}
    outputs = []
    for how, value in temporary.items():
        params = {"LAYERS": [layer], "QUESTIONS": f"q {how}"}
        if value is not None:
            params["OUTPUT"] = value
        res = processing.run("geovqa:batch_questions", params)
        out = Path(res["OUTPUT"])
        assert out.parent == results and out.name.startswith("answers_") and out.suffix == ".csv", (how, out)
        assert not str(out).startswith(QgsProcessingUtils.tempFolder())
        assert [(r["question"], r["answer"]) for r in _rows(out)] == [(f"q {how}", ANSWER)], how
        outputs.append(out)
    assert len(set(outputs)) == len(temporary)  # a new file each run, none overwritten

    res = processing.run("geovqa:batch_questions", {"LAYERS": [layer], "QUESTIONS": "q", "OUTPUT_JSON": "TEMPORARY_OUTPUT"})
    csv_out, json_out = Path(res["OUTPUT"]), Path(res["OUTPUT_JSON"])
    assert json_out.parent == results and json_out == csv_out.with_suffix(".json")
    assert [r["answer"] for r in json.loads(json_out.read_text(encoding="utf-8"))["results"]] == [ANSWER]
    # a file the user named stays where it was asked for, beside a temporary JSON in the results folder
    res = processing.run("geovqa:batch_questions", {"LAYERS": [layer], "QUESTIONS": "q",
                                                    "OUTPUT": str(tmp_path / "mine.csv"),
                                                    "OUTPUT_JSON": "TEMPORARY_OUTPUT"})
    assert res["OUTPUT"] == str(tmp_path / "mine.csv") and Path(res["OUTPUT_JSON"]).parent == results
    assert len(_rows(tmp_path / "mine.csv")) == 1


def test_an_answers_file_already_there_is_never_overwritten(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, monkeypatch):
    import processing
    from geovqa import results_io

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(results_io.time, "strftime", lambda fmt, *a: "20250101_120000")
    (results / "answers_20250101_120000.csv").write_text("an earlier run\n")
    (results / "answers_20250101_120000_2.json").write_text("another one\n")  # the .json of the next name
    res = processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("a")], "QUESTIONS": "q",
                                                    "OUTPUT_JSON": "TEMPORARY_OUTPUT"})
    assert Path(res["OUTPUT"]) == results / "answers_20250101_120000_3.csv"
    assert Path(res["OUTPUT_JSON"]) == results / "answers_20250101_120000_3.json"
    assert (results / "answers_20250101_120000.csv").read_text() == "an earlier run\n"
    assert (results / "answers_20250101_120000_2.json").read_text() == "another one\n"
    assert not (results / "answers_20250101_120000_2.csv").exists()



def test_no_empty_answers_file_is_left_when_the_next_cannot_be_made(tmp_path, monkeypatch, qgis_app):
    """The .csv is made, then the .json fails (not because it exists): the .csv goes too."""
    import builtins

    from geovqa import results_io

    real_open = builtins.open

    def refusing_json(path, mode="r", *args, **kwargs):
        if str(path).endswith(".json") and "x" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_json)
    with pytest.raises(PermissionError):
        results_io.new_answers_files(tmp_path, (".csv", ".json"))
    assert list(tmp_path.iterdir()) == []

def test_temporary_answers_with_an_unwritable_results_folder_say_they_do_not_last(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    import processing
    from conftest import set_settings
    from qgis.core import QgsProcessingUtils

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    fb = recording_feedback()
    res = processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("a")], "QUESTIONS": "q"}, feedback=fb)
    assert res["OUTPUT"].startswith(QgsProcessingUtils.tempFolder()) and len(_rows(res["OUTPUT"])) == 1
    assert any("deleted when QGIS (or qgis_process) exits" in e for e in fb.of("error")), fb.of("error")


def test_the_log_names_the_answers_file_before_the_first_question(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    """The toolbox's log showed 'OUTPUT': 'TEMPORARY_OUTPUT' and never the file the answers went to."""
    import processing

    fb = recording_feedback()
    res = processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("a")], "QUESTIONS": "q",
                                                    "OUTPUT_JSON": str(tmp_path / "a.json")}, feedback=fb)
    said = [i for i, (k, v) in enumerate(fb.log) if k == "info" and res["OUTPUT"] in v and str(tmp_path / "a.json") in v]
    first_stage = next(i for i, (k, _) in enumerate(fb.log) if k == "text")
    assert said and said[0] < first_stage, fb.log


def test_a_cancelled_processing_batch_says_where_its_answers_are(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, monkeypatch):
    """Cancelled in the toolbox, the run ends as "Execution failed" without its outputs: the log
    must say where the answers it finished are."""
    import processing
    from geovqa import results_io

    fb = recording_feedback()
    write = results_io.CsvRows.write
    monkeypatch.setattr(results_io.CsvRows, "write",  # cancelled as the first answer's row is written
                        lambda self, row: write(self, row) or fb.cancel())
    res = processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2\nq3",
                                                    "OUTPUT_JSON": "TEMPORARY_OUTPUT"}, feedback=fb)
    csv_out, json_out = res["OUTPUT"], res["OUTPUT_JSON"]
    assert [r["question"] for r in _rows(csv_out)] == ["q1"]
    assert [r["question"] for r in json.loads(Path(json_out).read_text(encoding="utf-8"))["results"]] == ["q1"]
    (said,) = [i for i in fb.of("info") if i.startswith("Cancelled")]
    assert said.startswith("Cancelled after 1 answer of 3") and csv_out in said and json_out in said, fb.of("info")


def test_a_failed_processing_batch_says_where_its_answers_are(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, monkeypatch):
    import processing
    from geovqa import results_io
    from qgis.core import QgsProcessingException

    fb = recording_feedback()
    write, written = results_io.CsvRows.write, []

    def write_once(self, row):  # the disk is full at the second row
        if written:
            raise OSError(28, "No space left on device")
        written.append(write(self, row))

    monkeypatch.setattr(results_io.CsvRows, "write", write_once)
    with pytest.raises(QgsProcessingException):
        processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2\nq3",
                                                  "OUTPUT_JSON": str(tmp_path / "a.json")}, feedback=fb)
    (said,) = [i for i in fb.of("info") if i.startswith("The run failed")]
    assert said.startswith("The run failed after 2 answers") and str(tmp_path / "a.json") in said, fb.of("info")
    csv_out = next(p for p in (tmp_path / "results").glob("answers_*.csv"))
    assert str(csv_out) in said and [r["question"] for r in _rows(csv_out)] == ["q1"]  # q2's row failed
    # the JSON, written at the end otherwise, holds the answers so far too
    rows = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))["results"]
    assert [(r["question"], r["answer"]) for r in rows] == [("q1", ANSWER), ("q2", ANSWER)]


QUESTION = "Où passe la rivière ? Ω ≥ 3"
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def test_the_processing_json_is_utf8_text(plugin, raster_layer, stub_engine, tmp_path, qgis_processing):
    """Non-ASCII was written as \\u00f9 escapes."""
    import processing

    res = processing.run("geovqa:batch_questions", {"LAYERS": [raster_layer("été")], "QUESTIONS": QUESTION,
                                                    "OUTPUT": str(tmp_path / "a.csv"),
                                                    "OUTPUT_JSON": str(tmp_path / "a.json")})
    raw = Path(res["OUTPUT_JSON"]).read_bytes()
    assert QUESTION.encode("utf-8") in raw and b'"layer": "\xc3\xa9t\xc3\xa9"' in raw and b"\\u" not in raw
    (row,) = json.loads(raw.decode("utf-8"))["results"]
    assert row["question"] == QUESTION and row["layer"] == "été"
    # the CSV, written row by row, has the byte-order mark at its start and only there
    raw = Path(res["OUTPUT"]).read_bytes()
    assert raw.startswith(BOM) and raw.count(BOM) == 1, raw[:20]
    (row,) = _rows(res["OUTPUT"])
    assert list(row)[0] == "index" and row["question"] == QUESTION and row["layer"] == "été"


def test_the_answers_csv_opens_as_utf8_in_windows_spreadsheets(tmp_path, qgis_app):
    """Excel on Windows reads a CSV without a byte-order mark in the ANSI code page (cp1252):
    'Wie groß ist das Becken?' showed as 'Wie groÃŸ ist das Becken?'. The CSV now starts with
    the UTF-8 mark (once, also when an earlier file is overwritten), and what reads it back
    still gets the column "index" and the text: Python's csv, GDAL/OGR and QGIS's delimited-text
    provider."""
    from geovqa.results_io import write_csv
    from qgis.core import QgsVectorLayer

    row = {"index": 0, "layer": "Hafen Süd", "raster_path": str(tmp_path / "hafen_süd.tif"),
           "question": "Wie groß ist das Becken?", "answer": "Etwa 300 m²."}
    path = tmp_path / "answers.csv"
    write_csv([dict(row, answer="earlier")], str(path))
    write_csv([row], str(path))  # overwrites it: one mark, at the start
    data = path.read_bytes()
    assert data.startswith(BOM) and data.count(BOM) == 1, data.decode("cp1252", errors="replace")[:200]
    (read,) = _rows(path)
    assert list(read)[0] == "index"
    assert (read["layer"], read["question"], read["answer"]) == ("Hafen Süd", row["question"], row["answer"])
    uri = f"{path.as_uri()}?type=csv&detectTypes=no&geomType=none"
    for layer in (QgsVectorLayer(uri, "answers", "delimitedtext"), QgsVectorLayer(str(path), "answers", "ogr")):
        assert layer.isValid(), layer.providerType()
        assert layer.fields().names()[0] == "index", (layer.providerType(), layer.fields().names())
        (feature,) = layer.getFeatures()
        assert (feature["layer"], feature["question"]) == ("Hafen Süd", row["question"]), layer.providerType()


def test_the_batch_dialogs_autosave_and_json_export_are_utf8_text(plugin, raster_layer, stub_engine, tmp_path):
    from geovqa.results_io import append_json_line

    layer = raster_layer("été")
    dlg, _ = run_batch_dialog(plugin, [layer], QUESTION)
    raw = Path(dlg.autosave_path).read_bytes()
    assert QUESTION.encode("utf-8") in raw and b"\\u" not in raw and raw.count(b"\n") == 1
    (row,) = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert row["question"] == QUESTION and row["layer"] == "été" and row["answer"] == ANSWER
    raw = Path(dlg.export(str(tmp_path / "answers.json"))).read_bytes()
    assert QUESTION.encode("utf-8") in raw and b"\\u" not in raw
    assert json.loads(raw.decode("utf-8"))["results"][0]["question"] == QUESTION
    # the CSV export names the strategy that answered, as the Processing batch's does (it was empty)
    csv_path = dlg.export(str(tmp_path / "answers.csv"))
    assert Path(csv_path).read_bytes().startswith(BOM + b"index,")  # Excel on Windows reads it as UTF-8
    (csv_row,) = _rows(csv_path)
    assert csv_row["question"] == QUESTION and csv_row["layer"] == "été"
    assert csv_row["strategy"] == stub_engine.requests[-1]["strategy"] and csv_row["strategy"]
    # one object a line, also for an answer holding the line breaks JSON leaves unescaped
    path = tmp_path / "breaks.jsonl"
    append_json_line(path, {"answer": "a\u2028b\u0085c"})
    append_json_line(path, {"answer": "é"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["answer"] for line in lines] == ["a\u2028b\u0085c", "é"]


def test_cancelled_and_failed_rows_are_told_apart_and_only_answers_carry_a_files_note():
    """A row stopped by Cancel is no failure (the batch's error count and the dialog's summary
    leave it out); a failed row's error is its failure, not a note about missing result files,
    which only an answered row has."""
    from geovqa.results_io import CANCELLED, files_note, is_cancelled, is_failure

    cancelled = {"question": "q", "answer": None, "error": CANCELLED}
    failed = {"question": "q", "answer": None, "error": "The engine ran out of memory."}
    kept = {"question": "q", "answer": "Two boats.", "error": "The answer is kept, but its heatmap could not be saved."}
    whole = {"question": "q", "answer": "Two boats.", "error": None}
    assert [is_cancelled(r) for r in (cancelled, failed, kept, whole)] == [True, False, False, False]
    assert [is_failure(r) for r in (cancelled, failed, kept, whole)] == [False, True, False, False]
    assert [files_note(r) for r in (cancelled, failed, kept, whole)] == [
        "", "", "The answer is kept, but its heatmap could not be saved.", ""]


def test_the_csv_row_takes_the_token_counts_and_the_total_time_from_the_answer(tmp_path):
    """The CSV's visual_kept / visual_candidates come from the answer's ``tokens`` and its
    total_s from ``timings["total"]`` (the engine's field names), bands in their cell form."""
    from geovqa.results_io import write_csv

    row = {"index": 1, "layer": "scene", "question": "q", "answer": "Two boats.", "error": None,
           "tokens": {"visual_kept": 180, "visual_candidates": 576},
           "timings": {"total": 12.5, "generate": 9.0}, "bands": [3, 2, 1]}
    path = write_csv([row], str(tmp_path / "answers.csv"))
    with open(path, encoding="utf-8-sig", newline="") as fh:
        (out,) = list(csv.DictReader(fh))
    assert (out["visual_kept"], out["visual_candidates"], out["total_s"], out["bands"]) == (
        "180", "576", "12.5", "3,2,1")
