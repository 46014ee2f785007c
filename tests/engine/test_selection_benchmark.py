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
