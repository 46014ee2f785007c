"""Property tests of the request checks (engine/request_checks.py, engine/json_body.py): whatever
JSON a client sends, the checks answer with the checked fields or a protocol error (JobError with
a 4xx code and a sentence), never another exception, which the server answers with 500.

Small and deterministic (derandomized, at most 60 examples each); the heavier fuzzing of the
running server is not part of the suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import write_geotiff  # noqa: E402

from engine import protocol  # noqa: E402
from engine.jobs import JobError  # noqa: E402
from engine.json_body import parse_json  # noqa: E402
from engine.request_checks import request_factory, validate_aoi, validate_ask  # noqa: E402
from engine.uploads import check_raster_file  # noqa: E402

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# the test raster: 64 x 48 one-metre pixels, west 500000, north 4500000 (server_rasters)
WEST, SOUTH, EAST, NORTH = 500000, 4499952, 500064, 4500000

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)

# corners in and around the raster: random rings cross themselves, touch its edge, miss it
coordinate = st.tuples(st.integers(WEST - 20, EAST + 20), st.integers(SOUTH - 20, NORTH + 20))
ring = st.lists(coordinate, min_size=3, max_size=6).map(
    lambda pts: [list(p) for p in pts] + [list(pts[0])])
area = st.one_of(
    st.builds(lambda w: {"window": w}, st.lists(st.integers(-80, 80), min_size=4, max_size=4)),
    st.builds(lambda r: {"polygon_wkt": "POLYGON((" + ", ".join(f"{x} {y}" for x, y in r) + "))"}, ring),
    st.builds(lambda r: {"geojson": {"type": "Polygon", "coordinates": [r]}}, ring),
    st.builds(lambda rs: {"geojson": {"type": "MultiPolygon", "coordinates": [[r] for r in rs]}},
              st.lists(ring, min_size=1, max_size=3)),
    st.builds(lambda v: {"geojson": v}, json_value),
    json_value,
)
field_value = {
    "question": st.one_of(st.text(max_size=30), json_value),
    "aoi": area,
    "bands": st.one_of(st.lists(st.integers(-1, 4), max_size=4), json_value),
    "strategy": st.one_of(st.sampled_from(protocol.STRATEGIES), json_value),
    "budget": st.one_of(st.integers(-5, 2**64), json_value),
    "tokens_per_tile": st.one_of(st.integers(-5, 600), json_value),
    "max_new_tokens": st.one_of(st.integers(-5, 5000), json_value),
    "seed": st.one_of(st.integers(-5, 2**64), json_value),
    "request_id": st.one_of(st.text(max_size=210), json_value),
    "faithful_empty_slots": json_value,
}


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    return str(write_geotiff(tmp_path_factory.mktemp("property") / "scene.tif"))


def answered(call):
    """The call's value, or None when it raised a protocol error (4xx); anything else fails."""
    try:
        return call()
    except JobError as err:
        assert protocol.ERROR_CODES[err.code] < 500, (err.code, err.message)
        assert isinstance(err.message, str) and err.message.strip()
        return None


@FAST
@given(changes=st.dictionaries(st.sampled_from(sorted(field_value)), st.none(), max_size=4)
       .flatmap(lambda keys: st.fixed_dictionaries({k: field_value[k] for k in keys})))
def test_an_ask_body_is_checked_or_refused_in_words(raster, changes):
    body = {"raster_path": raster, "question": "What is here?", **changes}
    fields = answered(lambda: validate_ask(body, protocol.STRATEGIES))
    if fields is not None:  # what passes becomes the engine's request
        request = request_factory(None)(fields)
        assert request.raster_path == raster and request.question == body["question"].strip()


@FAST
@given(aoi=area)
def test_an_area_of_interest_is_checked_or_refused_in_words(raster, aoi):
    """Random rings cross themselves (a bow-tie made GEOS raise: a 500), touch the raster's edge
    or miss it; each either passes, unchanged, or is a bad_aoi / aoi_outside_raster."""
    info = check_raster_file(raster)
    checked = answered(lambda: validate_aoi(aoi, info))
    assert checked is None or checked == aoi


@FAST
@given(text=st.one_of(json_value.map(json.dumps), st.text(max_size=40),
                      st.integers(0, 20).map(lambda n: "[" * n + "9" * 4400 + "]" * n)))
def test_a_json_body_is_read_or_refused_in_words(text):
    answered(lambda: parse_json(text.encode("utf-8", "surrogatepass")))
