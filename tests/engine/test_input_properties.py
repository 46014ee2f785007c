"""Property-based tests of the engine's input readers (hypothesis; fast and deterministic).

Whatever a raster, an area of interest, a band choice, a training record or an annotation holds,
the reader gives a usable result or its own error with a sentence for a person (RasterError,
AOIError, BadSample, EvalError), never another exception; extracted letters are the options'
and accuracies stay in [0, 1] with per-category counts that add up. The readers' properties found
such bugs (their regression tests are in test_raster.py, test_request_checks.py, test_data.py
and test_eval.py); the `@example`s keep those inputs in every run.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
from affine import Affine
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.area_of_interest import aoi_geometry, pixel_window, polygonal_area
from engine.data import BadSample, Sample, load_dataset, validate_record
from engine.eval_items import LETTERS, EvalError, EvalItem, load_items
from engine.eval_report import summarize
from engine.eval_scoring import extract_letters, scores
from engine.raster import read_raster
from engine.raster_errors import AOIError, RasterError

try:
    from tests.engine.rasters import write_geotiff
except ImportError:  # rootdir-relative import when tests/ is not a package
    from rasters import write_geotiff

# deterministic and small: the whole file runs in a few seconds
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _is_a_sentence(message: str) -> bool:
    """Starts as a sentence does (a capital, or the quoted file it is about) and ends with one."""
    return bool(message) and (message[0].isupper() or message[0] == "'") and message.rstrip().endswith(".")


# --- rasters --------------------------------------------------------------------------------------

NUMBERS = st.one_of(st.floats(-40, 80), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
TRANSFORMS = {"map": Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
              "rotated": Affine(8.66, -5.0, 500000.0, 5.0, 8.66, 5000000.0),
              "zero_height": Affine(10.0, 0.0, 500000.0, 0.0, 0.0, 5000000.0),
              "none": None}


@st.composite
def aois(draw):
    """None, a pixel window, or a polygon in pixel coordinates (moved to map coordinates for a
    georeferenced raster): boxes, lines folded into rings, bowties, partly or wholly outside."""
    kind = draw(st.sampled_from(["none", "window", "box", "folded", "bowtie", "geojson"]))
    if kind == "none":
        return None
    x0, y0, x1, y1 = (draw(NUMBERS) for _ in range(4))
    if kind == "window":
        return [x0, y0, x1, y1]
    ring = {"box": [(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
            "folded": [(x0, y0), (x1, y1), (x0, y0)],
            "bowtie": [(x0, y0), (x1, y1), (x1, y0), (x0, y1)],
            "geojson": [(x0, y0), (x1, y0), (x1, y1)]}[kind]
    return kind, ring + [ring[0]]


def _aoi_for(aoi, transform):
    if not isinstance(aoi, tuple):
        return aoi
    kind, ring = aoi
    t = transform or Affine.identity()
    ring = [t @ p for p in ring]
    if kind == "geojson":
        return {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
    return "POLYGON((" + ", ".join(f"{x!r} {y!r}" for x, y in ring) + "))"


@FAST
@given(dtype=st.sampled_from(["uint8", "uint16", "int16", "float32", "float64", "complex64"]),
       count=st.integers(1, 4), height=st.integers(1, 24), width=st.integers(1, 24),
       content=st.sampled_from(["random", "constant", "nan_some", "all_nodata"]),
       nodata=st.sampled_from([None, 0]), georef=st.sampled_from(sorted(TRANSFORMS)),
       aoi=st.one_of(st.none(), aois()),
       bands=st.one_of(st.none(), st.lists(NUMBERS, max_size=4), st.sampled_from([[1], [1, 1, 1]]),
                       st.lists(st.integers(-1, 5), min_size=1, max_size=3)),
       max_pixels=st.sampled_from([None, 1, 50]), seed=st.integers(0, 9))
@example(dtype="uint8", count=1, height=8, width=8, content="random", nodata=None, georef="zero_height",
         aoi=None, bands=None, max_pixels=None, seed=0)
@example(dtype="uint8", count=3, height=20, width=24, content="random", nodata=None, georef="map",
         aoi=None, bands=None, max_pixels=50, seed=0)
@example(dtype="uint8", count=1, height=8, width=8, content="random", nodata=None, georef="none",
         aoi=None, bands=[float("inf")], max_pixels=None, seed=0)
def test_read_raster_gives_an_rgb_image_of_its_window_or_a_raster_error(
        tmp_path_factory, dtype, count, height, width, content, nodata, georef, aoi, bands,
        max_pixels, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal((count, height, width)) * 300 + 1000).astype(dtype)
    if content == "constant":
        arr[:] = arr.flat[0]
    elif content == "nan_some" and arr.dtype.kind in "fc":
        arr[rng.random(arr.shape) < 0.3] = np.nan
    elif content == "all_nodata":
        arr[:] = 0
        nodata = 0
    if arr.dtype.kind == "c":
        nodata = None
    transform = TRANSFORMS[georef]
    path = write_geotiff(tmp_path_factory.mktemp("r") / "r.tif", arr, nodata=nodata,
                         crs=None if transform is None else "EPSG:32633", transform=transform)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shapely's "invalid value" on NaN coordinates
            im = read_raster(path, aoi=_aoi_for(aoi, transform), bands=bands, max_pixels=max_pixels)
    except RasterError as exc:
        assert _is_a_sentence(str(exc)), str(exc)
        return
    h, w = im.pixels.shape[:2]
    assert im.pixels.dtype == np.uint8 and im.pixels.shape == (h, w, 3)
    assert im.valid.shape == (h, w) and im.valid.any() and not im.pixels[~im.valid].any()
    assert max_pixels is None or w * h <= max_pixels
    col, row, ww, wh = im.window
    assert 0 <= col and 0 <= row and ww >= 1 and wh >= 1 and col + ww <= width and row + wh <= height
    # the image's corners are the window's, on the source grid and on the map
    np.testing.assert_allclose(im.image_to_source @ (0, 0), (col, row), atol=1e-9)
    np.testing.assert_allclose(im.image_to_source @ (w, h), (col + ww, row + wh), atol=1e-9)
    assert im.source_transform == (transform or Affine.identity())
    det = im.image_to_map.determinant  # every image pixel covers an area of the map
    assert math.isfinite(det) and det != 0
    assert (im.crs_wkt is None) == (transform is None)
    assert len(im.bands) == 3 and all(1 <= b <= count for b in im.bands)
    if im.stretch is not None:
        assert all(math.isfinite(lo) and math.isfinite(hi) for lo, hi in im.stretch)


@settings(FAST, max_examples=60)
@given(aoi=st.one_of(st.tuples(NUMBERS, NUMBERS, NUMBERS, NUMBERS).map(list),
                     st.lists(st.one_of(NUMBERS, st.integers(-10 ** 400, 10 ** 400), st.text(max_size=3)),
                              max_size=5),
                     st.text(max_size=40),
                     st.builds(lambda k, r: _aoi_for((k, r), None), st.sampled_from(["box", "folded", "bowtie"]),
                               st.lists(st.tuples(NUMBERS, NUMBERS), min_size=4, max_size=6)
                               .map(lambda r: r + r[:1]))))
@example(aoi=[float("nan"), 0.0, 10.0, 10.0])
@example(aoi=[0.0, 0.0, 10 ** 400, 10.0])
@example(aoi="POLYGON((1 1, 5 5, 9 9, 1 1))")
@example(aoi="POLYGON((0 0, 10 10, 10 0, 0 10, 0 0))")
@example(aoi="POLYGON((0 0, inf 0, 10 10, 0 10, 0 0))")
@example(aoi="GEOMETRYCOLLECTION(POLYGON((0 0, 10 0, 10 10, 0 0)), LINESTRING(0 0, 25 25))")
def test_an_area_of_interest_is_read_or_an_aoi_error(aoi):
    """Pixel windows, WKT: a finite window of positive size, polygons (only) with an area, or
    AOIError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            geom = aoi_geometry(aoi)
            if geom is None:
                window = pixel_window(aoi)
                assert all(math.isfinite(v) for v in window) and window[2] > 0 and window[3] > 0
            elif not geom.is_empty and geom.geom_type in ("Polygon", "MultiPolygon", "GeometryCollection"):
                area = polygonal_area(geom)
                assert area.is_valid and area.area > 0 and area.geom_type in ("Polygon", "MultiPolygon")
                assert np.isfinite(area.bounds).all()
    except AOIError as exc:
        assert str(exc).endswith(".")


# --- training data --------------------------------------------------------------------------------

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=8)),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
                    max_leaves=8)
GOOD_RECORD = {"id": 1, "image": "ok.tif", "conversations": [
    {"from": "human", "value": "<image>\nHow many ships?"}, {"from": "gpt", "value": "B"}]}
ODD_FIELDS = {
    "conversations": st.sampled_from([[], [{"from": "gpt", "value": "B"}], [{"from": "human"}],
                                      [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "B"}],
                                      [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": " "}]]) | JSON,
    "image": st.sampled_from([["ok.tif"], ["a", "b"], [], "", "none.tif", "x" * 300, "\ud800.tif", "."]) | JSON,
    "id": st.just("\ud800") | JSON,
    "bands": st.sampled_from([[1], [1, 2, 3], [0], [9], [1.5], [True]]) | JSON,
}
RECORD = st.one_of(JSON, st.sampled_from(sorted(ODD_FIELDS)).flatmap(
    lambda key: st.one_of(st.just({k: v for k, v in GOOD_RECORD.items() if k != key}),
                          ODD_FIELDS[key].map(lambda value: {**GOOD_RECORD, key: value}))))


@FAST
@given(records=st.lists(RECORD, max_size=5), line_end=st.sampled_from(["\n", "\r\n"]),
       junk_line=st.sampled_from(["", "{broken", "[" * 3000 + "]" * 3000, "1" * 5000]))
@example(records=[{**GOOD_RECORD, "image": "x" * 300}, {**GOOD_RECORD, "id": "\ud800"}], line_end="\n",
         junk_line="[" * 3000 + "]" * 3000)
def test_every_training_record_is_a_sample_or_a_bad_sample_named_by_its_index(
        tmp_path_factory, records, line_end, junk_line):
    d = tmp_path_factory.mktemp("data")
    write_geotiff(d / "ok.tif", np.ones((3, 4, 4), np.uint8))
    # (a first line that is a JSON list makes it a JSON list file, refused whole when it is not
    # one: the first line is an object)
    lines = ['{"conversations": []}'] + [json.dumps(r) for r in records] + [junk_line]
    (d / "train.jsonl").write_text(line_end.join(lines) + line_end, encoding="utf-8")
    samples, report = load_dataset(d / "train.jsonl", on_bad="skip", report_path=d / "bad.jsonl")
    indexes = sorted([s.index for s in samples] + [b.index for b in report.bad])
    assert indexes == list(range(report.total)) and report.kept == len(samples)  # nothing lost
    written = [json.loads(x) for x in (d / "bad.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["index"] for x in written] == [b.index for b in report.bad]
    for k, record in enumerate(records):
        result = validate_record(record, k, data_dir=d)
        assert isinstance(result, (Sample, BadSample)) and result.index == k
        assert isinstance(result, Sample) or f"sample {k}" in result.describe()


# --- evaluation -----------------------------------------------------------------------------------

OPTIONS = st.one_of(st.lists(st.text(max_size=6), min_size=26, max_size=28), st.text(max_size=20), JSON)
ANSWER = st.sampled_from(["A", "(B)", "a, c", "AC", "Z", "", "yes", "3.5"]) | st.text(max_size=8) | JSON
GOOD_ANNOTATIONS = [  # mme, lrsvqa, xlrs
    {"Question_id": "q1", "Image": "a.tif", "Text": "Colour?", "Answer choices": ["(A) red", "(B) blue"],
     "Ground truth": "B", "Category": "color"},
    {"question_id": "FAIR_1", "image": "a.tif", "text": "How many?", "ground_truth": "3", "category": "count"},
    {"index": 1, "image": "a.tif", "question": "Which?", "multi-choice options": ["(A) x", "(B) y"],
     "answer": "A", "category": "T/S"},
]
ODD_VALUES = {"options": OPTIONS, "answer": ANSWER, "id": st.just("\ud800") | JSON, "other": JSON}


@st.composite
def annotations(draw):
    good = dict(draw(st.sampled_from(GOOD_ANNOTATIONS)))
    key = draw(st.sampled_from(sorted(good)))
    kind = draw(st.sampled_from(["options", "answer", "id", "other", "drop"]))
    if kind == "drop":
        del good[key]
    elif kind in ("options", "answer", "id"):  # the field of that role in this format
        role = {"options": ("Answer choices", "multi-choice options"),
                "answer": ("Ground truth", "ground_truth", "answer"),
                "id": ("Question_id", "question_id", "index")}[kind]
        good[next((k for k in role if k in good), role[-1])] = draw(ODD_VALUES[kind])
    else:
        good[key] = draw(JSON)
    return good


ANNOTATION = st.one_of(JSON, annotations())


@FAST
@given(annotations=st.lists(ANNOTATION, min_size=1, max_size=4),
       fmt=st.sampled_from(["auto", "xlrs", "mme", "lrsvqa", "generic"]), as_list=st.booleans(),
       line_end=st.sampled_from(["\n", "\r\n", "\u2028\n"]))
@example(annotations=[{**GOOD_ANNOTATIONS[0], "Answer choices": [str(k) for k in range(27)]}], fmt="auto",
         as_list=True, line_end="\n")
@example(annotations=[{**GOOD_ANNOTATIONS[1], "question_id": "\ud800"}], fmt="auto", as_list=False,
         line_end="\n")
@example(annotations=[None], fmt="auto", as_list=False, line_end="\n")
def test_an_annotation_file_gives_items_or_an_eval_error(tmp_path_factory, annotations, fmt, as_list, line_end):
    p = tmp_path_factory.mktemp("ann") / "ann.jsonl"
    text = (json.dumps(annotations) if as_list
            else line_end.join(json.dumps(a) for a in annotations) + line_end)
    p.write_text(text, encoding="utf-8")
    try:
        items = load_items(p, fmt)
    except EvalError as exc:
        assert str(exc)
        return
    for item in items:
        assert item.question and item.answer
        if item.multiple_choice:
            assert len(item.options) <= len(LETTERS)
            assert set(item.answer) <= set(LETTERS[:len(item.options)])
        line = {**vars(item), **scores(item, "The answer is (B)", synonyms=None)}
        json.dumps(line, ensure_ascii=False).encode("utf-8")  # as predictions.jsonl is written


REPLY = st.one_of(st.text(max_size=120),
                  st.sampled_from(["(B)", "B.", "The answer is B", "Answer: b", "Ｂ", "Β", "A", "AC",
                                   "A large harbour", "answer: (a) and (c)", ""]))


@settings(FAST, max_examples=60)
@given(reply=REPLY, options=st.lists(st.text(max_size=8), max_size=6),
       fmt=st.sampled_from(["xlrs", "mme", "lrsvqa", "generic"]))
def test_extracted_letters_are_sorted_letters_of_the_options(reply, options, fmt):
    letters = extract_letters(reply, options)
    assert letters == "".join(sorted(set(letters)))
    assert set(letters) <= set(LETTERS[:len(options)] if options else LETTERS)
    item = EvalItem(id="1", image="x", question="q", options=options, answer="A" if options else "yes",
                    extra={"format": fmt})
    got = scores(item, reply, synonyms=None)
    assert isinstance(got["correct"], bool) and isinstance(got["lenient_correct"], bool)


@settings(FAST, max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["t/a", "t/b", "u/c", "d"]), st.booleans(), st.booleans(),
                          st.sampled_from(["ok", "error", "skipped"])), max_size=12))
def test_summaries_stay_within_0_and_1_and_their_categories_add_up(rows):
    records = []
    for i, (category, correct, lenient, state) in enumerate(rows):
        r = {"id": str(i), "category": category, "correct": correct, "lenient_correct": lenient,
             "prediction": "A" if correct else "", "lenient_prediction": "A", "multiple_choice": True}
        if state == "error":
            r["error"] = "out of memory"
        elif state == "skipped":
            r = {"id": str(i), "category": category, "skipped": "needs 2 images"}
        records.append(r)
    summary = summarize(records, {"xlrs"})
    asked = [r for r in records if "skipped" not in r]
    for block in (summary, summary["lenient"]):
        per = block["per_category"]
        assert sum(c["total"] for c in per.values()) == block["total"] == len(asked)
        assert sum(c["correct"] for c in per.values()) == block["correct"] <= block["total"]
        for figure in [block["micro_accuracy"], block["macro_accuracy"], *(c["accuracy"] for c in per.values())]:
            assert figure is None if not asked else 0.0 <= figure <= 1.0
    assert summary["skipped"] == len(records) - len(asked)
    assert summary["failed"] == sum(1 for r in asked if "error" in r)

