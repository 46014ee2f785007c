"""Download the wheels a lent GPU machine lacks into .whl/ (run here, before a GPU session).

The GPU machines of this workplace start bare from an image that has CUDA torch, accelerate,
safetensors, numpy, pytest and matplotlib, but transformers 5 / huggingface_hub 1 (the engine pins
transformers 4.57) and no bitsandbytes, rasterio or shapely; nothing can be fetched there. This
script downloads the engine's own pinned versions (read from this machine's engine venv, so the GPU
runs use what CI tested) as wheels for the GPU machine's Python, and trims the bitsandbytes wheel to
the CUDA builds that machine can use, so everything fits in one carried folder (< 64 MiB with the
repo). `scripts/gpu_checks.sh` installs them there.

    .venv/bin/python scripts/gpu_wheels.py [--python-version 3.12] [--cuda 130,132] [--dest .whl]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the GPU checks import that the machine's image lacks or has in an incompatible version
PACKAGES = ("transformers", "tokenizers", "huggingface_hub", "peft", "bitsandbytes", "rasterio",
            "affine", "cligj", "click-plugins", "shapely")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT = 64 * 1024**2  # the device tool's limit for the working tree plus carried folders


def pinned(name: str) -> str:
    """`name==version` as installed in the running interpreter (the engine venv)."""
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed in {sys.executable}: run `make setup` first.")


def download(spec: str, dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest), spec]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)


def trim_bitsandbytes(wheel: Path, keep_cuda: list[str]) -> int:
    """Drop the native libraries for CUDA/ROCm/XPU versions not in `keep_cuda` (the CPU one
    stays). A wheel is a zip; the files are unpacked as they are, so RECORD keeps the dropped
    names, which nothing reads at import. Returns the bytes saved."""
    keep = {f"libbitsandbytes_cuda{v}.so" for v in keep_cuda} | {"libbitsandbytes_cpu.so"}
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            base = item.filename.rsplit("/", 1)[-1]
            if re.fullmatch(r"libbitsandbytes_\w+\.so", base) and base not in keep:
                continue
            dst.writestr(item, src.read(item.filename))
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def tree_bytes() -> int:
    """Bytes of the files that travel with the working tree (tracked + untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, check=True, capture_output=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".whl")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (image: 3.12)")
    ap.add_argument("--cuda", default="130,132",
                    help="bitsandbytes CUDA builds to keep (the image's torch is cu130)")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # an earlier run's wheels; nothing else in the folder is touched
        old.unlink()
    for name in PACKAGES:
        spec = pinned(name)
        print(f"downloading {spec}", flush=True)
        download(spec, args.dest, args.python_version)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        saved = trim_bitsandbytes(wheel, [v.strip() for v in args.cuda.split(",") if v.strip()])
        print(f"trimmed {wheel.name}: {saved / 1e6:.0f} MB of other GPU builds dropped")
    wheels = sum(p.stat().st_size for p in args.dest.iterdir())
    total = wheels + tree_bytes()
    print(f"{args.dest}: {wheels / 2**20:.1f} MiB of wheels; with the working tree "
          f"{total / 2**20:.1f} MiB of the device tool's 64 MiB")
    if total > CARRY_LIMIT:
        print("too large to carry in one call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
