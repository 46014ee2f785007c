"""The line under an answer says its visual tokens so that it never reads as more kept than
there were: ``visual_candidates`` is the unreduced path's count (every tile pooled 2 x 2, 144 a
tile; engine/selection/common.py unreduced_tokens), and a strategy that keeps single patches
(tokens_per_tile 100) sends more. Exports keep both numbers as they came."""

from __future__ import annotations

from conftest import wait_for_tasks, wait_until


def test_more_sent_than_the_unreduced_count_is_not_said_as_kept():
    from geovqa.tasks import visual_tokens_text

    assert visual_tokens_text({"visual_kept": 600, "visual_candidates": 288}) == \
        "600 visual tokens (unreduced: 288)"
    assert visual_tokens_text({"visual_kept": 24, "visual_candidates": 288}) == "24/288 visual tokens kept"
    assert visual_tokens_text({"visual_kept": 288, "visual_candidates": 288}) == "288/288 visual tokens kept"
    assert visual_tokens_text({}) == "?/? visual tokens kept"
    assert visual_tokens_text({"visual_kept": [1], "visual_candidates": 288}) == "[1]/288 visual tokens kept"


def test_the_docks_line_and_the_export_of_a_random_answer_with_600_of_288(plugin, raster_layer, stub_engine):
    """The dock said 'Random: 600/288 visual tokens kept'."""
    from geovqa.results_io import flat_row
    from stub_engine import StubEngine

    def events(req):
        for ev in StubEngine.events(stub_engine, req):
            if ev.get("type") == "result":
                ev = dict(ev, strategy="random", tokens=dict(ev["tokens"], visual_kept=600, visual_candidates=288))
            yield ev

    stub_engine.events = events
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("what?")
    wait_until(lambda: dock.turns(layer) and dock.turns(layer)[-1]["done"], 30, "the answer")
    turn = dock.turns(layer)[-1]
    assert turn.get("error") is None, turn
    assert "600 visual tokens (unreduced: 288)" in turn["meta"] and "600/288" not in turn["meta"], turn["meta"]
    out = flat_row({"tokens": turn["result"]["tokens"]})
    assert (out["visual_kept"], out["visual_candidates"]) == (600, 288)
    wait_for_tasks()
