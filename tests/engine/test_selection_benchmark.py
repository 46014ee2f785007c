"""The strategy benchmark writes its table, CSV and plot (a tiny smoke run, not a timing)."""

import csv

import pytest


def test_benchmark_smoke(tmp_path, tiny_checkpoint, monkeypatch):
    from engine.benchmarks import strategies as B

    monkeypatch.setenv("GEOVQA_TEST_CACHE", str(tiny_checkpoint.parent))
    rows = B.run(tmp_path / "bench", sizes=(700,), strategies=("none", "geollava", "budget"),
                 scene_dir=tmp_path / "scenes", log=lambda *_: None)
    assert [r["strategy"] for r in rows] == ["none", "geollava", "budget"]
    for name in ("strategies.md", "strategies.csv", "strategies.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    with open(tmp_path / "bench" / "strategies.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and set(B.FIELDS) == set(got[0])
    none, geo, bud = rows
    assert geo["visual_tokens"] <= geo["tiles"] * 24 and bud["visual_tokens"] <= bud["budget"]
    assert none["visual_tokens"] == none["tiles"] * 144
    assert 0 <= geo["recall"] <= 1 and geo["ttft_s"] > 0
    B.rewrite_from_csv(tmp_path / "bench")
    assert "| size |" in (tmp_path / "bench" / "strategies.md").read_text()


def test_gpu_benchmark_needs_cuda(tmp_path):
    import torch

    from engine.benchmarks import strategies as B

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the full-size run is for `make bench`")
    with pytest.raises(RuntimeError, match="no CUDA"):
        B.run(tmp_path, sizes=(700,), device="cuda")


def test_the_benchmarks_figures_are_those_of_the_selections_it_made(tmp_path, tiny_checkpoint, monkeypatch):
    """Tokens, recall and recall_sharp of each row are the strategy's selection's own, also on a
    second run that reads the object boxes back from the scene file it wrote; the budget is
    tiles x 24 and ttft_s the sum of the stages."""
    from engine.benchmarks import strategies as B
    from engine.selection import get_strategy
    from engine.synth import object_recall, place_objects

    monkeypatch.setenv("GEOVQA_TEST_CACHE", str(tiny_checkpoint.parent))
    kw = dict(sizes=(700,), strategies=("none", "geollava", "anchored"), scene_dir=tmp_path / "scenes", log=lambda *_: None)
    rows = B.run(tmp_path / "first", **kw)
    again = B.run(tmp_path / "again", **kw)  # the scene exists now: its boxes are read back
    path = tmp_path / "scenes" / "synth_700_s0_o8.tif"
    objects = [box for _, box in place_objects(700, 700, 8, 0)]
    model, _ = B.tiny_model()
    geometry, feats, _, _ = B._prepare(model, str(path), 16)
    for row, row2 in zip(rows, again):
        budget = None if row["strategy"] == "none" else row["tiles"] * 24
        assert row["budget"] == ("" if budget is None else budget)
        sel = get_strategy(row["strategy"]).select(feats, geometry, B.QUESTION, budget, model=model)
        assert (row["visual_tokens"], row["candidates"]) == (sel.n_tokens, sel.candidates)
        assert row["recall"] == round(object_recall(sel, geometry, objects), 4)
        assert row["recall_sharp"] == round(object_recall(sel, geometry, objects, max_token_patches=4), 4)
        assert (row2["recall"], row2["recall_sharp"]) == (row["recall"], row["recall_sharp"])
        stages = row["read_s"] + row["vision_s"] + row["select_s"] + row["prefill_s"]
        assert row["ttft_s"] == pytest.approx(stages, abs=0.003)
        assert row["peak_mem_mb"] > row["mem_delta_mb"]  # the peak includes what was in use before
