"""Settings: values round-trip through QgsSettings, and the one place request options are built."""

from __future__ import annotations

import pytest
from conftest import fake_engine_python


def test_bool_setting_round_trips_and_reads_strings(qgis_app):
    from geovqa.settings import PREFIX, Settings
    from qgis.core import QgsSettings

    assert Settings.load().faithful_empty_slots is False
    s = Settings.load()
    s.faithful_empty_slots = True
    s.save()
    assert Settings.load().faithful_empty_slots is True
    # settings files written by hand or by another Qt hold strings
    for stored, expected in (("false", False), ("true", True), ("True", True), ("0", False),
                             ("garbage", False)):
        QgsSettings().setValue(PREFIX + "faithful_empty_slots", stored)
        assert Settings.load().faithful_empty_slots is expected, stored
    # ints still parse as ints, not as bools
    QgsSettings().setValue(PREFIX + "tokens_per_tile", "12")
    assert Settings.load().tokens_per_tile == 12


def test_request_options_from_settings_with_overrides(qgis_app):
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import Settings

    s = Settings.load()
    s.strategy, s.budget, s.tokens_per_tile, s.max_new_tokens = "budget", 0, 8, 99
    s.faithful_empty_slots = True
    assert s.request_options() == {"strategy": "budget", "budget": None, "tokens_per_tile": 8,
                                   "max_new_tokens": 99, "faithful_empty_slots": True}
    opts = s.request_options(strategy="geollava", budget=512)
    assert (opts["strategy"], opts["budget"], opts["tokens_per_tile"]) == ("geollava", 512, 8)
    body = build_ask_request("How many ships?", "/data/x.tif", **opts)
    assert body["faithful_empty_slots"] is True and body["budget"] == 512
    with pytest.raises(TypeError, match="bugdet"):
        s.request_options(bugdet=3)


def test_dock_options_use_the_dock_widgets_and_the_saved_setting(plugin):
    from conftest import set_settings

    set_settings(faithful_empty_slots=True, tokens_per_tile=24)
    dock = plugin.dock
    dock.tpt_spin.setValue(6)
    dock.budget_spin.setValue(300)
    opts = dock.options()
    assert opts["tokens_per_tile"] == 6 and opts["budget"] == 300
    assert opts["faithful_empty_slots"] is True


def test_diagnostics_report_the_empty_slot_setting(plugin):
    from conftest import set_settings

    assert "empty cluster slots: dropped" in plugin.dock.diagnostics_text()
    set_settings(faithful_empty_slots=True)
    assert "empty cluster slots: sent" in plugin.dock.diagnostics_text()


def test_paths_typed_with_a_tilde_are_expanded_wherever_they_are_used(qgis_app, tmp_path, monkeypatch):
    """'~/token' typed in the settings is the token file in the home folder, not a file named
    '~' (reported as "does not exist"); the same for every path setting."""
    from geovqa.engine_process import engine_command
    from geovqa.settings import Settings, make_client

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "token").write_text("s3cret\n")
    py = fake_engine_python(tmp_path / "repo" / ".venv" / "bin" / "python")
    s = Settings(engine_url="http://10.0.0.5:8765", token_file=" ~/token ", ca_cert="~/engine.pem",
                 python="~/repo/.venv/bin/python", weights_dir="~/weights", output_dir="~/results")
    assert s.resolved_token() == "s3cret"
    assert make_client(s).ca_file == str(tmp_path / "engine.pem")
    assert s.results_dir() == tmp_path / "results"
    s.engine_url = "http://127.0.0.1:9911"
    program, args, workdir = engine_command(s)
    assert program == str(py) and workdir == str(tmp_path / "repo")
    assert args[args.index("--weights") + 1] == str(tmp_path / "weights")
    s.python, s.engine_dir = "", "~/repo"
    program, _, workdir = engine_command(s)
    assert program == str(py) and workdir == str(tmp_path / "repo")


def test_a_ca_file_typed_with_a_tilde_is_read_from_the_home_folder(tmp_path, monkeypatch):
    import pytest
    from geovqa.engine_errors import EngineError
    from geovqa.tls import context

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(EngineError, match="does not exist"):
        context("~/missing.pem")
    assert context("  ") is not None


def test_settings_written_by_hand_are_read_or_fall_back_to_their_defaults(qgis_app):
    """A settings file edited by hand or by another Qt: "1" is true, a number that is no number
    is the setting's default (not 0: a render size of 0 px), a choice that is not one of the
    choices is the default choice."""
    from geovqa.settings import PREFIX, Settings
    from qgis.core import QgsSettings

    QgsSettings().setValue(PREFIX + "faithful_empty_slots", "1")
    QgsSettings().setValue(PREFIX + "render_max_px", "big")
    QgsSettings().setValue(PREFIX + "max_new_tokens", "")
    QgsSettings().setValue(PREFIX + "send_rasters", "sometimes")
    s = Settings.load()
    assert s.faithful_empty_slots is True
    assert (s.render_max_px, s.max_new_tokens) == (Settings().render_max_px, Settings().max_new_tokens) == (2048, 256)
    assert s.send_rasters == "auto"
