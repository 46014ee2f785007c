"""The command line's output where stdout is not UTF-8: on Windows, redirected to a file or a
pipe, Python writes in the ANSI code page (cp1252 in the west). A path, a question or an answer
holding a character outside it made `ask` / `info` fail with UnicodeEncodeError ("error:
'charmap' codec can't encode characters") once their work was done. PYTHONIOENCODING=cp1252
stands for that default here."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_info_names_a_checkpoint_folder_outside_the_code_page(tmp_path, tiny_checkpoint):
    weights = tmp_path / "权重 José"  # Chinese is not in cp1252; é is
    shutil.copytree(tiny_checkpoint, weights)
    env = dict(os.environ, PYTHONIOENCODING="cp1252", GEOVQA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "engine", "info", "--memory", "--weights", str(weights)],
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode("cp1252", errors="replace")
    first = done.stdout.decode("cp1252").splitlines()[0]
    assert f"{tmp_path}{os.sep}\\u6743\\u91cd José: " in first, first


def test_a_utf8_stream_is_left_as_it_is():
    from engine.cli import tolerate_unencodable_output

    cp1252 = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    tolerate_unencodable_output([cp1252, utf8])
    assert (cp1252.errors, utf8.errors) == ("backslashreplace", "strict")
    cp1252.write("权 é")
    cp1252.flush()
    assert cp1252.buffer.getvalue() == b"\\u6743 \xe9"
