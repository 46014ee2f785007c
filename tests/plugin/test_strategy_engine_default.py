"""The strategy choice "Engine's default": the request leaves strategy and faithful_empty_slots
out (null), so an engine running a fine-tuned adapter uses the settings it was trained with
(engine/pipeline.py Engine.resolve_visual) instead of answering with a mismatch note."""

from __future__ import annotations

from conftest import set_settings, wait_for_tasks, wait_until


def test_the_setting_round_trips_and_sends_neither_field(qgis_app):
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import ENGINE_DEFAULT_STRATEGY, PREFIX, STRATEGIES, Settings
    from qgis.core import QgsSettings

    assert ENGINE_DEFAULT_STRATEGY not in STRATEGIES  # not an engine strategy: never sent
    assert Settings().strategy == "geollava"  # new installs keep the default
    set_settings(strategy=ENGINE_DEFAULT_STRATEGY, faithful_empty_slots=True)
    s = Settings.load()
    assert s.strategy == ENGINE_DEFAULT_STRATEGY  # it fell back to geollava
    opts = s.request_options()
    assert opts["strategy"] is None and opts["faithful_empty_slots"] is None
    body = build_ask_request("What is here?", "/data/x.tif", **opts)
    assert body["strategy"] is None and body["faithful_empty_slots"] is None
    assert body["budget"] is None and body["tokens_per_tile"] is None
    # an explicit strategy (the dock's, an algorithm's) still sends both
    opts = s.request_options(strategy="pyramid")
    assert opts["strategy"] == "pyramid" and opts["faithful_empty_slots"] is True
    # any other stored value still falls back to the default
    QgsSettings().setValue(PREFIX + "strategy", "bogus")
    assert Settings.load().strategy == "geollava"


def test_the_options_page_offers_and_saves_it(plugin):
    from geovqa.settings import ENGINE_DEFAULT_STRATEGY, Settings
    from geovqa.settings_page import SettingsForm

    page = SettingsForm()
    i = page.strategy.findData(ENGINE_DEFAULT_STRATEGY)
    assert i == page.strategy.count() - 1, "appended last"
    assert page.strategy.itemText(i).startswith("Engine's default")
    assert "adapter" in page.strategy.itemData(i, 3)  # 3: ToolTipRole says what it does
    page.strategy.setCurrentIndex(i)
    page.apply()
    assert Settings.load().strategy == ENGINE_DEFAULT_STRATEGY
    assert SettingsForm().strategy.currentData() == ENGINE_DEFAULT_STRATEGY


def test_the_dock_sends_neither_and_names_the_strategy_the_engine_used(plugin, raster_layer, stub_engine):
    from geovqa.settings import ENGINE_DEFAULT_STRATEGY

    set_settings(faithful_empty_slots=True)
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    combo = dock.strategy_combo
    i = combo.findData(ENGINE_DEFAULT_STRATEGY)
    assert combo.itemText(i) == "Engine's default" and "adapter" in combo.itemData(i, 3)
    combo.setCurrentIndex(i)
    assert "adapter" in combo.toolTip()
    stub_engine.default_strategy = "anchored"  # as an engine running an adapter trained with it
    dock.ask("What is here?")
    wait_until(lambda: any(t.get("done") for t in dock.conversations.get(layer.id(), [])), 30, "the answer")
    wait_for_tasks()
    req = stub_engine.requests[-1]
    assert req["strategy"] is None and req["faithful_empty_slots"] is None
    meta = dock.turns(layer)[-1]["meta"]
    assert meta.startswith("Anchored selection: 4/576 visual tokens kept"), meta


def test_the_dock_takes_it_as_the_default_from_the_options(plugin):
    from geovqa.settings import ENGINE_DEFAULT_STRATEGY, notifier

    set_settings(strategy=ENGINE_DEFAULT_STRATEGY)
    notifier.saved.emit()
    assert plugin.dock.strategy_combo.currentData() == ENGINE_DEFAULT_STRATEGY
    assert plugin.dock.options()["strategy"] is None
    text = plugin.dock.diagnostics_text()
    assert "strategy: engine default (not sent)" in text and "empty cluster slots: engine default" in text


def test_processing_engine_default_by_name_and_by_number(plugin, raster_layer, stub_engine, tmp_path,
                                                         qgis_processing):
    import processing
    from geovqa.processing.common import strategy_options, with_strategy_names
    from geovqa.settings import STRATEGIES

    # appended last: the numbers models and scripts stored before keep their meaning
    assert strategy_options()[:len(STRATEGIES)] == list(STRATEGIES)
    assert strategy_options()[-1] == "engine"
    assert with_strategy_names({"S": 3}, "S") == {"S": "pyramid"}
    assert with_strategy_names({"S": "8"}, "S") == {"S": "engine"}
    a = raster_layer("a")
    for value, sent in (("engine", None), (8, None), ("8", None), (3, "pyramid"), ("pyramid", "pyramid"),
                        (0, "geollava")):
        res = processing.run("geovqa:ask_raster", {
            "INPUT": a, "QUESTION": "How big?", "STRATEGY": value, "BUDGET": 0,
            "HEATMAP": str(tmp_path / "h.tif"), "ANCHORS": str(tmp_path / "a.geojson")})
        assert res["ANSWER"], value
        req = stub_engine.requests[-1]
        assert req["strategy"] == sent, value
        assert (req["faithful_empty_slots"] is None) == (sent is None), value
    for value in ("engine", 8):
        res = processing.run("geovqa:batch_questions", {
            "LAYERS": [a], "QUESTIONS": "How big?", "STRATEGY": value, "BUDGET": 0,
            "OUTPUT": str(tmp_path / f"batch{value}.csv")})
        assert res["ANSWERED"] == 1, value
        req = stub_engine.requests[-1]
        assert req["strategy"] is None and req["faithful_empty_slots"] is None, value
    wait_for_tasks()


def test_a_strategy_number_out_of_the_list_is_no_strategy():
    """A model saved when STRATEGY was a number gives one of the list's numbers; any other value
    (one past the end, negative, a bool, a name) is not taken as a number."""
    from geovqa.processing.common import strategy_index
    from geovqa.settings import STRATEGY_CHOICES

    last = len(STRATEGY_CHOICES) - 1
    assert [strategy_index(v) for v in (0, last, str(last), f" {last} ")] == [0, last, last, last]
    assert [strategy_index(v) for v in (last + 1, str(last + 1), -1, True, "geollava", None)] == [None] * 6
