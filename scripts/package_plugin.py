#!/usr/bin/env python3
"""Package the QGIS plugin: ``qgis_plugin/`` -> ``dist/geovqa-<version>.zip`` with a top folder
``geovqa/`` (a valid Python module name) holding metadata.txt; ``--install`` also copies the
plugin into a QGIS profile's python/plugins folder (default profile unless ``--profile-dir``).

Standard library only, so any Python can run it (``make package``, ``make install-plugin``).
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "qgis_plugin"
# qgis_plugin/metadata.txt is a link to this file (one metadata for the repo and the plugin); the
# zip gets the file itself, so packaging works on checkouts without links (Windows' default)
METADATA = ROOT / "metadata.txt"
PACKAGE = "geovqa"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp"}


def version() -> str:
    cp = configparser.ConfigParser()
    cp.read(METADATA, encoding="utf-8")
    return cp.get("general", "version")


def plugin_files() -> list[Path]:
    out = []
    for path in sorted(SRC.rglob("*")):
        rel = path.relative_to(SRC)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == "metadata.txt":  # the link (or, without links, its target's name)
            continue
        if path.is_file() and path.suffix not in SKIP_SUFFIXES:
            out.append(path)
    return out


def build_zip(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{PACKAGE}-{version()}.zip"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(METADATA, f"{PACKAGE}/metadata.txt")
        for path in plugin_files():
            zf.write(path, f"{PACKAGE}/{path.relative_to(SRC).as_posix()}")
    return dest


def qgis_settings_root() -> Path:
    """The folder holding QGIS's per-version settings folders (QGIS3, QGIS4) on this platform."""
    if sys.platform.startswith("win"):
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "QGIS"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "QGIS"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "QGIS"


def default_plugins_dirs(profile: str = "default") -> list:
    """The profile's plugins folders on this platform: QGIS 3's (QGIS3/profiles/...) and QGIS 4's
    (QGIS4/profiles/...) where that QGIS has made its settings folder; QGIS 3's when neither has."""
    root = qgis_settings_root()
    found = [root / v for v in ("QGIS3", "QGIS4") if (root / v).is_dir()] or [root / "QGIS3"]
    return [base / "profiles" / profile / "python" / "plugins" for base in found]


def install(zip_path: Path, plugins_dir: Path) -> Path:
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / PACKAGE
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins_dir)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "dist"), help="folder for the zip (default dist/)")
    ap.add_argument("--install", action="store_true", help="also install into a QGIS profile")
    ap.add_argument("--profile-dir", help="a QGIS profile folder (its python/plugins gets the plugin)")
    ap.add_argument("--profile", default="default", help="profile name in the standard location")
    args = ap.parse_args(argv)
    zip_path = build_zip(Path(args.out))
    print(f"built {zip_path}")
    if args.install:
        folders = ([Path(args.profile_dir) / "python" / "plugins"] if args.profile_dir
                   else default_plugins_dirs(args.profile))
        for plugins in folders:
            print(f"installed into {install(zip_path, plugins)}")
        print("Enable it in QGIS: Plugins > Manage and Install Plugins > Installed > GeoVQA.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
