"""LLaVA conversation data: per-sample validation with index-bearing reports, skip/stop, split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.data import DataError, load_dataset, split_train_val


def _img(path, w=40, h=30):
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)
    return path


def _row(i, image="ok.png", q="<image>\nHow many ships?", a="B"):
    return {"id": i, "image": [image] if image is not None else None,
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


@pytest.fixture
def data_file(tmp_path):
    _img(tmp_path / "ok.png")
    _img(tmp_path / "big.png", 200, 100)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    rows = [
        _row(0),                                                          # good
        _row(1, image="nope.png"),                                        # missing image
        _row(2, image="broken.png"),                                      # unreadable
        _row(3, image="big.png"),                                         # too large
        _row(4, q="How many ships?"),                                     # no <image>
        {"id": 5, "image": "ok.png", "conversations": [{"from": "gpt", "value": "x"}]},  # malformed
        {"id": 6, "image": "ok.png", "conversations": [                  # multi-turn, good
            {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"id": 7, "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},  # no answer
        "just a string",                                                  # not an object
        _row(9, q="<image>\n<image>\nQ"),                                 # two image tokens
    ]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    return p


def test_skip_reports_every_bad_sample_with_index(data_file, tmp_path):
    report_path = tmp_path / "skipped.jsonl"
    samples, report = load_dataset(data_file, max_pixels=10_000, on_bad="skip", report_path=report_path)
    assert [s.index for s in samples] == [0, 6]
    assert samples[0].image_size == (40, 30) and samples[0].first_question == "How many ships?"
    assert len(samples[1].turns) == 4
    by_index = {b.index: b.reason for b in report.bad}
    assert by_index == {1: "missing_image", 2: "unreadable_image", 3: "too_large", 4: "no_image_token",
                        5: "malformed", 7: "malformed", 8: "malformed", 9: "no_image_token",
                        10: "malformed"}
    assert report.total == 11 and report.kept == 2
    lines = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert [x["index"] for x in lines] == sorted(by_index)  # nothing silently dropped
    assert "200 x 100" in next(x["message"] for x in lines if x["index"] == 3)
    assert "skipped 9" in report.summary()


def test_stop_names_the_index(data_file):
    with pytest.raises(DataError, match=r"sample 1 \(id 1\).*not found"):
        load_dataset(data_file, on_bad="stop")


def test_json_list_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "a.png")
    p = tmp_path / "d" / "train.json"
    p.parent.mkdir()
    p.write_text(json.dumps([_row(0, image="a.png")]))
    samples, report = load_dataset(p, image_root=tmp_path / "imgs")
    assert len(samples) == 1 and not report.bad
    samples, report = load_dataset(p)  # without the root the image is missing
    assert not samples and report.bad[0].reason == "missing_image"


def test_split_is_seeded_and_disjoint(tmp_path):
    _img(tmp_path / "ok.png")
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_row(i) for i in range(20)]))
    samples, _ = load_dataset(p)
    tr, va = split_train_val(samples, 0.2, seed=3)
    tr2, va2 = split_train_val(samples, 0.2, seed=3)
    assert len(va) == 4 and len(tr) == 16
    assert [s.index for s in va] == [s.index for s in va2]
    assert not {s.index for s in tr} & {s.index for s in va}
    assert split_train_val(samples, 0.0)[1] == []


def test_the_validation_split_keeps_each_raster_on_one_side(tmp_path):
    """VQA data asks several questions about each scene. Split by record, validation questions
    were about scenes the adapter trains on: the validation loss measured recall of those scenes.
    Whole rasters are held out now; the one-raster data above still splits by record."""
    from engine.data import split_is_by_raster

    rows = []
    for k in range(4):
        _img(tmp_path / f"scene{k}.png")
        rows += [_row(f"{k}-{q}", image=f"scene{k}.png", q=f"<image>\nQuestion {q}?") for q in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    samples, _ = load_dataset(tmp_path / "d.json")
    assert split_is_by_raster(samples, 0.25)
    train, val = split_train_val(samples, 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15  # one raster of four, all its questions
    assert not {str(s.image) for s in train} & {str(s.image) for s in val}
    assert [s.index for s in train] == sorted(s.index for s in train)  # file order kept
    # a tiny fraction still holds out one raster, never all of them
    assert len({str(s.image) for s in split_train_val(samples, 0.01, seed=0)[1]}) == 1
    assert len({str(s.image) for s in split_train_val(samples, 0.99, seed=0)[1]}) == 3
    # by record on request
    _, val = split_train_val(samples, 0.25, seed=0, by="record")
    assert len(val) == 5 and len({str(s.image) for s in val}) > 1


def test_a_record_may_choose_its_bands_and_carry_other_keys(tmp_path):
    """A record's "bands" is checked like the rest (one band or three, 1-based, present in the
    image: `bad_bands`); --bands (load_dataset's `bands`) applies where a record gives none. Keys
    beyond the known ones (LLaVA data carries some) are accepted without a word."""
    _img(tmp_path / "ok.png")  # 3 bands
    rows = [dict(_row(0), bands=[3, 2, 1], source="HighRS-VQA", width=40),
            _row(1),
            dict(_row(2), bands=[4, 3, 2]),
            dict(_row(3), bands=[1, 2]),
            dict(_row(4), bands="1,2,3"),
            dict(_row(5), bands=[0, 1, 2])]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(rows))
    samples, report = load_dataset(p, bands=[2])
    assert [(s.id, s.bands, s.bands_from_record) for s in samples] == [("0", [3, 2, 1], True), ("1", [2], False)]
    assert [(b.index, b.reason) for b in report.bad] == [(2, "bad_bands"), (3, "bad_bands"), (4, "bad_bands"),
                                                         (5, "bad_bands")]
    assert "has 3 band(s)" in report.bad[0].message and "[4]" in report.bad[0].message
    # --bands naming a band the image lacks: every record without its own is a bad sample
    samples, report = load_dataset(p, bands=[5])
    assert [s.id for s in samples] == ["0"] and report.bad[0].index == 1 and "--bands" in report.bad[0].message
    assert [s.bands for s in load_dataset(p)[0]] == [[3, 2, 1], None]


def test_training_time_reasons_are_listed_reasons():
    from engine.data import BAD_REASONS
    from engine.finetune_loop import TRAINING_TIME_REASONS

    assert set(TRAINING_TIME_REASONS) <= set(BAD_REASONS)


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_utf8_byte_order_mark_is_ignored(tmp_path, jsonl):
    """Editors on Windows start UTF-8 files with a BOM; the file still reads (list and JSONL)."""
    _img(tmp_path / "ok.png")
    rows = [_row(0), _row(1)]
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows)
    p = tmp_path / ("train.jsonl" if jsonl else "train.json")
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    samples, report = load_dataset(p, on_bad="stop")
    assert [s.index for s in samples] == [0, 1] and not report.bad


@pytest.mark.parametrize("name", ["train.jsonl", "TRAIN.JSONL"])
def test_a_jsonl_file_whose_first_line_is_an_array_is_read_line_by_line(tmp_path, name):
    """A .jsonl file starting with "[" was read whole as one JSON list and refused ("Extra
    data"), its good records with it. It is read as JSON Lines: the array line is a bad record
    (malformed) with its index and line, the other records train."""
    _img(tmp_path / "ok.png")
    p = tmp_path / name
    p.write_text(json.dumps([_row(0)]) + "\n" + json.dumps(_row(1)) + "\n\n" + "[1, 2]\n" + json.dumps(_row(3)) + "\n")
    samples, report = load_dataset(p, on_bad="skip")
    assert [s.id for s in samples] == ["1", "3"]
    assert [(b.index, b.reason) for b in report.bad] == [(0, "malformed"), (2, "malformed")]
    assert "line 4 is a JSON array, not a JSON object" in report.bad[1].message
    assert ".json file" in report.bad[0].message
    with pytest.raises(DataError, match=r"sample 0: line 1 is a JSON array"):
        load_dataset(p, on_bad="stop")


def test_a_file_not_named_jsonl_that_starts_with_a_bracket_is_one_json_list(tmp_path):
    """The documented rule for other names is kept: "[" starts one JSON list (a list file with an
    extra line is refused whole, a list file is its records)."""
    _img(tmp_path / "ok.png")
    p = tmp_path / "train.json"
    p.write_text(json.dumps([_row(0), _row(1)], indent=2))
    samples, report = load_dataset(p, on_bad="stop")
    assert [s.id for s in samples] == ["0", "1"] and not report.bad
    p = tmp_path / "train.txt"
    p.write_text(json.dumps([_row(0)]) + "\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(DataError, match="not valid JSON: Extra data"):
        load_dataset(p, on_bad="skip")


@pytest.mark.parametrize("end", ["\u2028", "\u2029", "\u0085"])
def test_a_json_lines_answer_with_a_unicode_line_separator_is_one_sample(tmp_path, end):
    """JSON keeps U+2028, U+2029 and U+0085 raw inside a string (json.dumps(ensure_ascii=False)
    writes them so); the JSON Lines reader ended a line at them (str.splitlines), and such a
    sample was reported as two broken lines."""
    _img(tmp_path / "ok.png")
    rows = [_row(0, a=f"Two ships.{end}One boat."), _row(1)]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    samples, report = load_dataset(p, on_bad="stop")
    assert [s.index for s in samples] == [0, 1] and not report.bad
    assert samples[0].turns[-1].text == f"Two ships.{end}One boat."


def test_bands_naming_an_images_alpha_band_are_bad_bands(tmp_path):
    """finetune --bands 4,3,2 (or a record's bands) on an RGBA image trained the model on its
    alpha mask as red: such a sample is bad_bands, the band named, before training starts."""
    Image.fromarray(np.full((30, 40, 4), 120, np.uint8), "RGBA").save(tmp_path / "ok.png")
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_row(0), dict(_row(1), bands=[1, 2, 3])]))
    samples, report = load_dataset(p, bands=[4, 3, 2])
    assert [s.id for s in samples] == ["1"]
    assert [(b.index, b.reason) for b in report.bad] == [(0, "bad_bands")]
    assert "--bands: band 4 is the raster's alpha band" in report.bad[0].message


def test_conversation_rules_a_system_turn_first_only_and_no_empty_answer(tmp_path):
    _img(tmp_path / "ok.png")
    system = {"from": "system", "value": "You count ships."}
    q, a = {"from": "human", "value": "<image>\nHow many ships?"}, {"from": "gpt", "value": "3"}
    rows = [{"id": 0, "image": "ok.png", "conversations": [system, q, a]},             # good
            {"id": 1, "image": "ok.png", "conversations": [q, system, a]},             # system later
            {"id": 2, "image": "ok.png", "conversations": [q, {"from": "gpt", "value": "  "}]},  # empty answer
            {"id": 3, "image": [], "conversations": [q, a]},                           # no image listed
            {"id": 4, "image": ["ok.png", "ok.png"], "conversations": [q, a]}]         # two images
    p = tmp_path / "t.json"
    p.write_text(json.dumps(rows))
    samples, report = load_dataset(p)
    assert [(s.index, s.system) for s in samples] == [(0, "You count ships.")]
    assert [(b.index, b.reason) for b in report.bad] == [(1, "malformed"), (2, "malformed"),
                                                         (3, "malformed"), (4, "malformed")]
    assert "unknown role 'system'" in report.bad[0].message
    assert "empty answer" in report.bad[1].message
    assert "lists 0 images" in report.bad[2].message and "lists 2 images" in report.bad[3].message


def test_max_pixels_is_the_largest_size_allowed(tmp_path):
    _img(tmp_path / "ok.png", 40, 30)
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_row(0)]))
    assert len(load_dataset(p, max_pixels=1200)[0]) == 1
    samples, report = load_dataset(p, max_pixels=1199)
    assert not samples and report.bad[0].reason == "too_large"


def test_bands_must_be_numbers_not_true_or_false(tmp_path):
    _img(tmp_path / "ok.png")
    p = tmp_path / "t.json"
    p.write_text(json.dumps([dict(_row(0), bands=[True]), dict(_row(1), bands=[1, True, 2])]))
    samples, report = load_dataset(p)
    assert not samples
    assert [(b.index, b.reason) for b in report.bad] == [(0, "bad_bands"), (1, "bad_bands")]


def test_the_image_root_is_looked_in_before_the_data_files_folder(tmp_path):
    (tmp_path / "root").mkdir()
    _img(tmp_path / "root" / "a.png", 40, 30)
    _img(tmp_path / "a.png", 20, 10)  # beside the data file: found only without a root
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_row(0, image="a.png")]))
    assert load_dataset(p, image_root=tmp_path / "root")[0][0].image == tmp_path / "root" / "a.png"
    assert load_dataset(p)[0][0].image == tmp_path / "a.png"


def test_a_validation_fraction_of_1_is_refused(tmp_path):
    _img(tmp_path / "ok.png")
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_row(i) for i in range(3)]))
    samples, _ = load_dataset(p)
    for fraction in (1.0, -0.1):
        with pytest.raises(DataError, match=r"validation fraction must be in \[0, 1\)"):
            split_train_val(samples, fraction)


@pytest.mark.parametrize("key", ["data", "samples", "annotations"])
def test_a_json_object_wrapping_the_records_is_read(tmp_path, key):
    _img(tmp_path / "ok.png")
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"version": 1, key: [_row(0), _row(1)]}))
    samples, report = load_dataset(p, on_bad="stop")
    assert [s.index for s in samples] == [0, 1] and report.total == 2


def test_blank_lines_of_a_json_lines_file_are_no_samples(tmp_path):
    _img(tmp_path / "ok.png")
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(_row(0)) + "\n   \n\t\n" + json.dumps(_row(1)) + "\n\n")
    samples, report = load_dataset(p, on_bad="stop")
    assert [s.id for s in samples] == ["0", "1"] and report.total == 2


# --- found by property-based testing of the data reader ------------------------------------------

def test_lines_that_json_cannot_take_are_reported_with_their_index(tmp_path):
    """A line nested too deeply (RecursionError), an integer of more than 4,300 digits
    (ValueError, not JSONDecodeError), a lone surrogate in an id or a path ("\\ud800", which
    the report could not write: UnicodeEncodeError) and an image name longer than the file
    system takes (OSError from is_file) each ended the whole load with a traceback."""
    _img(tmp_path / "ok.png")
    lines = [json.dumps(_row(0)),
             "[" * 50_000 + "]" * 50_000,
             "1" * 5000,
             json.dumps({**_row(3), "id": "\ud800"}),
             json.dumps(_row(4, image="\udcff.png")),
             json.dumps(_row(5, image="x" * 300 + ".png")),
             json.dumps(_row(6))]
    p = tmp_path / "odd.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report_path = tmp_path / "skipped.jsonl"
    samples, report = load_dataset(p, on_bad="skip", report_path=report_path)
    assert [s.index for s in samples] == [0, 6]
    assert {b.index: b.reason for b in report.bad} == {
        1: "malformed", 2: "malformed", 3: "malformed", 4: "malformed", 5: "missing_image"}
    assert "nested too deeply" in report.bad[0].message
    assert "lone UTF-16 surrogate" in report.bad[2].message and report.bad[2].id == "\\ud800"
    written = [json.loads(x) for x in report_path.read_text(encoding="utf-8").splitlines()]
    assert [x["index"] for x in written] == [1, 2, 3, 4, 5]
    with pytest.raises(DataError, match=r"sample 1: line 2 is not valid JSON \(nested too deeply\)"):
        load_dataset(p, on_bad="stop")


@pytest.mark.parametrize("text, message", [("[" * 50_000 + "]" * 50_000, "nested too deeply"),
                                           ("[" + "1" * 5000 + "]", "not valid JSON")])
def test_a_json_list_file_json_cannot_take_is_a_data_error(tmp_path, text, message):
    p = tmp_path / "odd.json"
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(p)
