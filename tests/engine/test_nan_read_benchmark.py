"""engine/benchmarks/nan_read.py runs (small sizes) and writes its table: it is a benchmark, so
nothing is asserted about the times, only that it still works and reads what it says."""

import json


def test_the_nan_read_benchmark_writes_its_table(tmp_path):
    from engine.benchmarks.nan_read import run

    rows = run(tmp_path, size=300, max_pixels=100 * 100, repeat=1)
    assert [(r["case"], r["overviews"]) for r in rows] == [
        (case, overviews) for case in ("no NaN", "collar", "collar, tagged -9999", "stripes")
        for overviews in (False, True)]
    by = {(r["case"], r["overviews"]): r["valid_fraction"] for r in rows}
    assert by[("no NaN", False)] == by[("stripes", True)] == 1.0  # the gaps' pixels all have data
    assert 0.5 < by[("collar", True)] < 0.7
    saved = json.loads((tmp_path / "nan_read.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["size"] == 300
    assert "| collar | yes |" in (tmp_path / "nan_read.md").read_text()
