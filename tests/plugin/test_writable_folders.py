"""Whether a folder can be written is found by writing in it (paths.write_error), not with
os.access: on Windows, os.access(folder, os.W_OK) checks only the read-only attribute, which
folders ignore, so every folder passed, also one whose permissions forbid writing. The options
page then said nothing about an unwritable results folder, and renders never fell back to the
temporary folder.

Here a folder is really made unwritable (chmod, or as root, whom chmod does not stop, the
immutable attribute: skipped where neither can be set), and os.access is given Windows' answer
for folders (each one passes), as QGIS on Windows gets it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def locked_folder():
    """Makes ``path`` a folder in which nothing can be made (returns it); undone afterwards."""
    undo = []

    def lock(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o500)
            undo.append(lambda: path.chmod(0o700))
        else:
            chattr = shutil.which("chattr")
            if not chattr or subprocess.run([chattr, "+i", str(path)], capture_output=True,
                                            timeout=30).returncode != 0:
                pytest.skip("as root, a folder can only be locked with chattr +i, which is not possible here")
            undo.append(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True, timeout=30))
        try:
            (path / "probe").touch()
        except OSError:
            return path
        pytest.skip(f"{path} still takes files on this file system")

    yield lock
    for step in undo:
        step()


@pytest.fixture
def windows_os_access(monkeypatch):
    """os.access as Windows answers it for a folder: W_OK looks only at the read-only
    attribute, which a folder's permissions do not set, so an existing folder always passes."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        return os.path.isdir(path) or real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_write_error_makes_a_file_or_folder_and_leaves_nothing(tmp_path, locked_folder, windows_os_access):
    from geovqa.paths import write_error

    free = tmp_path / "free"
    free.mkdir()
    assert write_error(free) is None and write_error(free, make_folder=True) is None
    assert list(free.iterdir()) == []  # the probes are removed
    locked = locked_folder(tmp_path / "locked")
    assert isinstance(write_error(locked), PermissionError)
    assert isinstance(write_error(locked, make_folder=True), PermissionError)
    assert isinstance(write_error(tmp_path / "missing"), FileNotFoundError)


def test_the_options_page_says_an_unwritable_results_folder_where_os_access_lets_it_pass(
        qgis_app, tmp_path, locked_folder, windows_os_access):
    from geovqa.settings import folder_problem

    locked = locked_folder(tmp_path / "locked")
    assert folder_problem(locked) == f"{locked} cannot be written (no permission)."
    assert folder_problem(locked / "new") == f"{locked / 'new'} cannot be made: {locked} cannot be written (no permission)."
    assert folder_problem(tmp_path / "new" / "deeper") == ""  # made when needed: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no probe left, nothing made


def test_renders_go_to_the_temporary_folder_when_the_results_folder_refuses_them(
        qgis_app, tmp_path, locked_folder, windows_os_access):
    import tempfile

    from geovqa.render import render_file

    results = tmp_path / "results"
    assert render_file(results, "What is here?").parent == results / "renders"  # writable: kept there
    locked_folder(results / "renders")
    out = render_file(results, "What is here?")
    assert out.parent == Path(tempfile.gettempdir()) / "geovqa_renders", out
    assert out.name.endswith("_render.tif")
