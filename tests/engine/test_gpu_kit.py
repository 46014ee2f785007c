"""The kit that runs the GPU checks on a lent machine (scripts/gpu_wheels.py, scripts/gpu_checks.sh)
works on this CPU machine as far as it can: wheel trimming, part dispatch and clean failures."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trim_bitsandbytes_keeps_only_the_named_cuda_builds(tmp_path):
    gw = _load_gpu_wheels()
    wheel = tmp_path / "bitsandbytes-0.0-py3-none-any.whl"
    libs = ["cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025", "cpu"]
    with zipfile.ZipFile(wheel, "w") as z:
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0" * 4096)
        z.writestr("bitsandbytes/__init__.py", "x = 1\n")
        z.writestr("bitsandbytes-0.0.dist-info/RECORD", "")
    saved = gw.trim_bitsandbytes(wheel, ["130", "132"])
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names == {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so",
                     "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/__init__.py",
                     "bitsandbytes-0.0.dist-info/RECORD"}
    assert saved > 0
    assert zipfile.ZipFile(wheel).read("bitsandbytes/__init__.py") == b"x = 1\n"


def test_pinned_versions_come_from_this_interpreter():
    gw = _load_gpu_wheels()
    import transformers

    assert gw.pinned("transformers") == f"transformers=={transformers.__version__}"
    assert "bitsandbytes" in gw.PACKAGES and "rasterio" in gw.PACKAGES


def test_gpu_wheels_replaces_only_wheels_in_its_folder(tmp_path, monkeypatch, capsys):
    """--dest used to be deleted whole; an earlier run's wheels are replaced, other files stay."""
    gw = _load_gpu_wheels()
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "old-0.1-py3-none-any.whl").write_bytes(b"stale")
    (dest / "notes.txt").write_text("mine")
    fetched = []

    def fake_download(spec, where, python_version):
        fetched.append(spec)
        with zipfile.ZipFile(where / f"{spec.split('==')[0]}-1.0-py3-none-any.whl", "w") as z:
            z.writestr("METADATA", spec)

    monkeypatch.setattr(gw, "download", fake_download)
    gw.main(["--dest", str(dest)])
    assert len(fetched) == len(gw.PACKAGES)
    assert (dest / "notes.txt").read_text() == "mine"
    assert not (dest / "old-0.1-py3-none-any.whl").exists()
    assert len(list(dest.glob("*.whl"))) == len(gw.PACKAGES)


def _checks(*parts, tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"),
           "WHEELS": str(tmp_path / "no-wheels"), "GEOVQA_BIG_TMP": str(tmp_path / "big")}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_checks.sh"), *parts], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_checks_without_a_gpu_fail_clearly_and_record_nothing(tmp_path):
    before = set((REPO / "docs" / "benchmarks").iterdir())
    # GEOVQA_BIG_TMP is the parent of the random checkpoint: only that checkpoint is removed
    (tmp_path / "big" / "geollava-7b-random").mkdir(parents=True)
    (tmp_path / "big" / "keep.txt").write_text("someone else's")
    r = _checks("env", "semantics", "nonsense", tmp_path=tmp_path)
    # env fails (no CUDA), semantics measures the CPU and records nothing, nonsense is refused
    assert r.returncode == 2, r.stdout + r.stderr
    log = (tmp_path / "out" / "gpu_checks.log").read_text()
    assert "torch sees no CUDA GPU" in log
    assert "== semantics: exit 0" in log and "only the CPU side was measured" in log
    assert "unknown part 'nonsense'" in log
    assert set((REPO / "docs" / "benchmarks").iterdir()) == before
    assert not (tmp_path / "big" / "geollava-7b-random").exists()
    assert (tmp_path / "big" / "keep.txt").read_text() == "someone else's"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU behaviour")
def test_make_bench_skips_the_gpu_only_benchmarks_without_a_gpu(tmp_path, capsys):
    from engine import bench

    assert bench.GPU_ONLY <= set(bench.BENCHMARKS)
    assert bench.main(["--only", "gpu_load", "--only", "cuda_semantics", "--only", "qlora_gpu",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"{name} skipped" in out for name in bench.GPU_ONLY)
    assert not list(tmp_path.iterdir())
