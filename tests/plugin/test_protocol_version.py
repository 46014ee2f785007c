"""An engine whose /health reports another protocol version than the plugin's, or one that is
no whole number, is asked nothing: the dock's status line names both versions, and the dock, the
batch dialog and Processing refuse their questions with that sentence (docs/protocol.md,
*Versioning*). An engine of the plugin's version is used whatever fields it adds."""

from __future__ import annotations

import pytest
from conftest import run_batch_dialog, wait_for_tasks, wait_until
from test_processing_aoi import _errors_of_a_failed_run


def _speaking(stub_engine, version):
    """``stub_engine`` with its /health reporting ``version`` as its protocol."""
    from stub_engine import StubEngine

    stub_engine.health = lambda: dict(StubEngine.health(stub_engine), protocol=version)


@pytest.mark.parametrize("version, update", [(2, "Update the GeoVQA plugin"), (0, "Update the engine")])
def test_another_version_names_both_and_what_to_update(version, update):
    from geovqa.engine_protocol import PROTOCOL_VERSION, protocol_error

    assert PROTOCOL_VERSION == 1
    err = protocol_error({"protocol": version}, "http://gpu:8765")
    assert err.code == "wrong_protocol"
    assert f"speaks protocol version {version}; this plugin speaks version 1" in err.message
    assert update in err.hint
    assert protocol_error({"protocol": 1, "a_field_added_later": [1]}, "http://gpu:8765") is None


@pytest.mark.parametrize("version", ["1", 1.0, 1.5, True, None, [1], {"major": 1}])
def test_a_version_that_is_no_whole_number_is_not_taken_for_ours(version):
    """A protocol of "1", 1.0, true or null was used as if it were ours."""
    from geovqa.engine_protocol import protocol_error

    err = protocol_error({"protocol": version}, "http://gpu:8765")
    assert err is not None and err.code == "wrong_protocol", version
    assert "not a whole number" in err.message and "version 1" in err.message


def test_the_client_refuses_an_engine_of_another_version(stub_engine):
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineUnavailable

    _speaking(stub_engine, 2)
    client = EngineClient(stub_engine.url, stub_engine.token)
    with pytest.raises(EngineUnavailable, match="protocol version 2") as info:
        client.health()
    assert info.value.code == "wrong_protocol"
    with pytest.raises(EngineUnavailable, match="protocol version 2"):
        client.check_protocol()
    _speaking(stub_engine, 1)
    client = EngineClient(stub_engine.url, stub_engine.token)
    client.check_protocol()
    assert client.health()["protocol"] == 1


def test_the_dock_shows_it_and_asks_nothing_until_the_engine_speaks_ours(plugin, raster_layer, stub_engine):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    _speaking(stub_engine, 2)
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None and dock.status_level == "down", 20, "the health check")
    assert "speaks protocol version 2; this plugin speaks version 1" in dock.status_label.text()
    assert "Update the GeoVQA plugin" in dock.status_label.toolTip()
    dock.question_edit.setText("what is here?")
    assert dock.ask() is None
    assert "protocol version 2" in dock.progress_label.text()
    assert dock.turns(layer) == [] and not stub_engine.requests
    assert dock.question_edit.text() == "what is here?"
    _speaking(stub_engine, 1)
    wait_until(lambda: dock._health_task is None and dock.status_level != "down", 20, "the health check")
    assert dock.ask() is not None
    wait_until(lambda: dock.turns(layer) and dock.turns(layer)[-1]["done"], 30, "the answer")
    assert dock.turns(layer)[-1].get("error") is None and len(stub_engine.requests) == 1
    wait_for_tasks()


def test_the_batch_and_processing_ask_nothing(plugin, raster_layer, stub_engine, qgis_processing):
    layer = raster_layer()
    _speaking(stub_engine, "2.0")
    _dlg, rows = run_batch_dialog(plugin, [layer], "q1\nq2")
    assert len(rows) == 2 and all(r["answer"] is None and "not a whole number" in r["error"] for r in rows), rows
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?"})
    assert "not a whole number" in said, said
    assert not stub_engine.requests
