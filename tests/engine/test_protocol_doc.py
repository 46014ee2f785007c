"""engine/protocol.py against the engine's request type and docs/protocol.md (the one page that
explains the protocol): a field added on one side must be added on the other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import protocol
from engine.pipeline import AskRequest
from engine.request_checks import validate_common

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_ask_request_takes_exactly_the_protocol_fields():
    from engine.pipeline import SERVER_ONLY_FIELDS, RequestError

    assert set(AskRequest.__dataclass_fields__) - set(SERVER_ONLY_FIELDS) == set(protocol.ASK_FIELDS)
    with pytest.raises(RequestError, match="Unknown request fields: raster_identity"):
        AskRequest.from_json({"raster_path": "a.tif", "question": "q?", "raster_identity": "sha256:0"})
    with pytest.raises(RequestError, match="Unknown request fields: selection_text"):
        AskRequest.from_json({"raster_path": "a.tif", "question": "q?", "selection_text": "boats"})


def test_shared_model_settings_are_ask_and_batch_fields():
    common = set(validate_common({}, protocol.STRATEGIES))
    assert common <= set(protocol.ASK_FIELDS)
    assert common <= set(protocol.BATCH_FIELDS)
    assert "faithful_empty_slots" in common


@pytest.mark.parametrize("name, fields", [
    ("ASK_FIELDS", protocol.ASK_FIELDS),
    ("BATCH_FIELDS", protocol.BATCH_FIELDS),
    ("BATCH_ITEM_FIELDS", protocol.BATCH_ITEM_FIELDS),
    ("result event", protocol.EVENT_TYPES["result"]),
    ("batch result", protocol.BATCH_RESULT_FIELDS),
])
def test_doc_names_every_field(name, fields):
    missing = [k for k in fields if not re.search(rf'"{k}"|`{k}`', DOC)]
    assert not missing, f"docs/protocol.md does not mention {name} {missing}"


def engine_sources() -> str:
    """The engine's code, protocol.py (where every code is declared) left out."""
    root = Path(__file__).resolve().parents[2] / "engine"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))
                     if p.name != "protocol.py")


def test_codes_the_engine_never_sends_are_documented_as_reserved():
    """The docs listed model_loading / no_weights as what a not-ready engine answers, but serve
    loads the model before it listens: such codes must be marked reserved, not promised."""
    source = engine_sources()
    sent = {code for code in protocol.ERROR_CODES if re.search(rf'\b{code}\b', source)}
    assert set(protocol.ERROR_CODES) - sent == set(protocol.RESERVED_ERROR_CODES)
    row = next(line for line in DOC.splitlines() if line.startswith("| `model_loading`"))
    assert "reserved, not sent by this version" in row
    assert "'loading' is reserved" in protocol.HEALTH_FIELDS["status"]
    assert "`loading` is reserved" in DOC


def test_the_budget_refusal_of_none_is_documented_with_its_code():
    """`none` refuses a budget below its token count only in the stream (the tile count needs
    the model's tiling); README said every strategy honours --budget, the docs that all input
    is checked before queueing. Both must say so, with the code the client really gets."""
    torch = pytest.importorskip("torch")
    from engine.jobs import error_for_exception
    from engine.selection.base import SelectionError
    from engine.selection.none import NoneStrategy

    features = type("Features", (), {"patches": torch.zeros(2, 576, 4)})()
    with pytest.raises(SelectionError) as refused:
        NoneStrategy().select(features, None, "q", 7, model=None)
    code = error_for_exception(refused.value, budget=7).code
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for name, text in [("README.md", readme), ("docs/protocol.md", DOC)]:
        paragraph = next((p for p in text.split("\n\n") if "`none`" in p and "budget" in p
                          and f"`{code}`" in p), None)
        assert paragraph, f"{name} does not say that `none` refuses a small budget with {code}"
        assert "stream" in paragraph


def test_the_geojson_aoi_kinds_the_checks_take_are_documented():
    """The checks take a geometry, a Feature or a FeatureCollection (engine/area_of_interest.py
    geojson_area); protocol.py and the docs said a Polygon/MultiPolygon geometry only."""
    paragraph = next(p for p in DOC.split("\n\n") if '{"geojson": {' in p)
    for kind in ("Polygon", "MultiPolygon", "Feature", "FeatureCollection"):
        assert kind in protocol.AOI_FIELDS["geojson"], kind
        assert kind in paragraph, kind
    assert "union" in protocol.AOI_FIELDS["geojson"] and "joined" in paragraph


@pytest.fixture(scope="module")
def tiny_result(tiny_checkpoint, tmp_path_factory):
    """A real result event of the tiny engine."""
    import numpy as np

    from engine.pipeline import Engine
    from tests.engine.rasters import write_geotiff

    folder = tmp_path_factory.mktemp("doc_result")
    path = write_geotiff(folder / "rgb.tif", np.random.default_rng(3).integers(0, 255, (3, 60, 80), dtype=np.uint8))
    events = list(Engine(tiny_checkpoint, output_dir=folder / "out").ask(
        AskRequest(str(path), "What is here?", max_new_tokens=2)))
    assert events[-1]["type"] == "result", events[-1]
    return events[-1]


def test_every_field_of_a_result_event_is_documented(tiny_result):
    """The engine sent `stopped` and the `write` timing, which neither protocol.py nor the
    protocol page named: a client written from them did not know them."""
    undocumented = sorted(set(tiny_result) - {"type", "request_id"} - set(protocol.EVENT_TYPES["result"]))
    assert not undocumented, f"result fields missing from engine/protocol.py: {undocumented}"
    start = DOC.index("timings in seconds")
    sentence = DOC[start:DOC.index("cache hits", start)]
    for key in tiny_result["timings"]:
        assert f"`{key}`" in sentence and key in protocol.EVENT_TYPES["result"]["timings"], key
