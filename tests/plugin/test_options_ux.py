"""Options page usability (from a walkthrough): narrow enough for a laptop, placeholders that say
what an empty field means, the results folder in use now, a bad engine URL refused when saved,
and the CA certificate only for https:// URLs."""

from __future__ import annotations

import pytest
from conftest import set_settings


def _page():
    from geovqa.settings_page import GeoVQAOptionsPage

    return GeoVQAOptionsPage()


def test_the_page_is_narrow_and_the_details_are_in_tooltips(qgis_app):
    from geovqa.settings import SEND_RASTERS_LABELS
    from qgis.PyQt.QtCore import Qt

    page = _page()
    assert page.minimumSizeHint().width() < 640  # was 1019: long combo entries and the CA label
    form = page.form
    combo = form.send_rasters
    assert combo.count() == len(SEND_RASTERS_LABELS)
    for i in range(combo.count()):
        assert len(combo.itemText(i)) <= 30
        tip = combo.itemData(i, Qt.ItemDataRole.ToolTipRole)
        assert tip and len(tip) > len(combo.itemText(i))
    assert "SSH tunnel" in combo.itemData(combo.findData("upload"), Qt.ItemDataRole.ToolTipRole)
    assert combo.toolTip() == combo.itemData(combo.currentIndex(), Qt.ItemDataRole.ToolTipRole)
    ca_label = form.layout().labelForField(form.ca_cert)
    assert len(ca_label.text()) <= 25 and "self-signed" in ca_label.toolTip()


def test_empty_fields_say_what_happens(qgis_app, tmp_path):
    from geovqa.settings import Settings

    page = _page()
    form = page.form
    assert ".venv" in form.python.lineEdit().placeholderText()
    assert form.python.lineEdit().placeholderText().startswith("empty:")
    assert form.engine_dir.lineEdit().placeholderText().startswith("empty:")
    assert "wins" in form.token_file.toolTip() and "Engine token" in form.token_file.toolTip()
    # the results folder in use now, following the field
    assert str(Settings.load().results_dir()) in form.results_note.text()
    form.output.setFilePath(str(tmp_path / "elsewhere"))
    assert f"In use now: {tmp_path / 'elsewhere'}" in form.results_note.text()
    form.output.setFilePath("")
    set_settings(output_dir="")
    assert f"In use now: {Settings.load().results_dir()}" in form.results_note.text()


def test_the_weights_folder_and_extra_arguments_say_what_they_take(qgis_app):
    """Weights folder (empty: the engine folder's weights/GeoLLaVA-8K, else the tiny random demo
    model) and Extra engine arguments said nothing: no placeholder, no tooltip; nor did Engine
    URL, token, budget, tokens per tile and max answer tokens."""
    page = _page()
    form = page.form
    weights = form.weights.lineEdit().placeholderText()
    assert weights == "empty: weights/GeoLLaVA-8K"  # the rest in the tooltip: it must fit (below)
    assert "GEOVQA_WEIGHTS" in form.weights.toolTip() and "RANDOM demo model" in form.weights.toolTip()
    assert "<engine folder>/weights/GeoLLaVA-8K" in form.weights.toolTip()
    assert form.extra.placeholderText().startswith("e.g. --device cpu")
    for flag in ("--device cpu", "--quantization bf16", "--adapter DIR", "Engine URL", "--port"):
        assert flag in form.extra.toolTip(), flag
    layout = form.layout()
    for field in (form.url, form.token, form.weights, form.extra, form.budget, form.tpt, form.max_new):
        assert field.toolTip() and layout.labelForField(field).toolTip() == field.toolTip()
    assert page.minimumSizeHint().width() < 640  # tooltips, not longer labels


def test_the_page_says_when_the_results_folder_cannot_be_written(qgis_app, tmp_path):
    """A file, or a folder under one, was taken without a word ("In use now: .../afile"): the
    answers then came without their layers."""
    import os

    page = _page()
    form = page.form
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, said in ((afile, f"{afile} is a file, not a folder."),
                       (afile / "sub", f"{afile / 'sub'} cannot be made: {afile} is a file.")):
        form.output.setFilePath(str(path))
        assert said in form.results_note.text() and "Choose another folder" in form.results_note.text()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # not as root, who may write anywhere
            form.output.setFilePath(str(locked / "new"))
            assert f"cannot be made: {locked} cannot be written (no permission)" in form.results_note.text()
    finally:
        locked.chmod(0o700)
    form.output.setFilePath(str(tmp_path / "new" / "deeper"))  # made when needed: fine
    assert "Choose another folder" not in form.results_note.text()


def test_a_bad_engine_url_is_not_saved_and_the_page_says_why(qgis_app):
    from geovqa.settings import Settings

    set_settings(engine_url="http://127.0.0.1:8765")
    page = _page()
    form = page.form
    assert not form.url_error.isVisibleTo(form)
    form.url.setText("http://127.0.0.1:99999")
    assert form.url_error.isVisibleTo(form) and "invalid port" in form.url_error.text()  # as typed
    form.budget.setValue(1234)
    page.apply()
    s = Settings.load()
    assert s.engine_url == "http://127.0.0.1:8765"  # kept, not the bad one
    assert s.budget == 1234  # the rest is saved
    assert "invalid port" in form.url_problem and form.url_error.isVisibleTo(form)
    form.url.setText("ftp://example.org")
    assert "http://" in form.url_error.text()
    form.url.setText("http://127.0.0.1:9000")
    assert not form.url_error.isVisibleTo(form)
    page.apply()
    assert Settings.load().engine_url == "http://127.0.0.1:9000" and form.url_problem == ""


@pytest.mark.parametrize("url, base", [
    ("http://127.0.0.1:8765/health", "http://127.0.0.1:8765"),
    ("http://127.0.0.1:8765/health/", "http://127.0.0.1:8765"),
    ("https://gpu.example.org/geovqa/ask", "https://gpu.example.org/geovqa"),
    ("http://127.0.0.1:8765/jobs/0123abcd/results", "http://127.0.0.1:8765"),
])
def test_an_engine_url_pasted_with_an_endpoint_is_not_saved_and_the_base_url_is_suggested(qgis_app, url, base):
    """The URL tested with curl (.../health) pasted as the engine URL was saved, and then every
    call went to /health/health, /health/ask: 'There is no such endpoint.'"""
    from geovqa.settings import Settings
    from geovqa.settings_page import url_problem

    problem = url_problem(url)
    assert "ends in one of the engine's endpoints" in problem and problem.endswith(f"base URL: {base}")
    assert url_problem(base) == ""
    set_settings(engine_url="http://127.0.0.1:8765")
    page = _page()
    page.form.url.setText(url)
    assert page.form.url_error.isVisibleTo(page.form) and base in page.form.url_error.text()
    page.apply()
    assert Settings.load().engine_url == "http://127.0.0.1:8765"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765/geovqa", "http://127.0.0.1:8765/healthy",
                                 "https://gpu.example.org/asks/"])
def test_an_engine_url_with_another_path_is_taken(qgis_app, url):
    from geovqa.settings_page import url_problem

    assert url_problem(url) == ""


def test_the_ca_certificate_is_for_https_only(qgis_app):
    set_settings(engine_url="http://127.0.0.1:8765")
    page = _page()
    form = page.form
    assert not form.ca_cert.isEnabled()
    form.url.setText("https://gpu.example.org:8443")
    assert form.ca_cert.isEnabled()
    form.url.setText("HTTPS://gpu.example.org")
    assert form.ca_cert.isEnabled()
    form.url.setText("http://gpu.example.org")
    assert not form.ca_cert.isEnabled()
    set_settings(engine_url="https://gpu.example.org")
    page = _page()
    assert page.form.ca_cert.isEnabled()


def test_an_emptied_engine_url_keeps_the_saved_one_and_takes_its_connection_fields(qgis_app):
    """An empty engine URL means "keep the saved one" (its placeholder says so): it is no
    mistake, and the token typed with it is saved (trimmed); the CA certificate follows the saved URL's
    scheme."""
    from geovqa.settings import Settings

    set_settings(engine_url="https://gpu.example.org:8443", token="old")
    page = _page()
    form = page.form
    form.url.setText("")
    assert not form.url_error.isVisibleTo(form) and form.ca_cert.isEnabled()
    form.token.setText(" new ")  # pasted with the spaces around it
    form.apply()
    s = Settings.load()
    assert form.url_problem == "" and s.engine_url == "https://gpu.example.org:8443" and s.token == "new"


# found by a review of the UX changes


def test_a_refused_url_does_not_save_the_token_typed_for_it(qgis_app):
    from geovqa.settings import Settings
    from geovqa.settings_page import GeoVQAOptionsPage

    set_settings(engine_url="https://engine-a.example.org:8765", token="token-of-a")
    page = GeoVQAOptionsPage()
    form = page.form
    form.url.setText("https://engine-b.example.org:99999")  # typo in the new engine's port
    form.token.setText("token-of-b")
    form.apply()
    s = Settings.load()
    assert s.engine_url == "https://engine-a.example.org:8765"
    # engine B's token was saved, and sent to engine A
    assert s.token == "token-of-a", s.token


def test_saving_the_page_keeps_the_docks_own_choices_and_takes_the_changed_defaults(plugin, tmp_path):
    """Saving the page (only the results folder changed) put the dock back to geollava and the
    engine's budget: a strategy chosen for the conversation, or the budget *Retry with budget*
    set, was lost."""
    dock = plugin.dock
    dock.strategy_combo.setCurrentIndex(dock.strategy_combo.findData("pyramid"))
    dock.budget_spin.setValue(777)
    page = _page()
    page.form.output.setFilePath(str(tmp_path / "other results"))
    page.apply()
    assert dock.strategy_combo.currentData() == "pyramid" and dock.budget_spin.value() == 777
    # a default the page changes is taken, the others stay
    page = _page()
    page.form.max_new.setValue(99)
    page.apply()
    assert dock.max_new_spin.value() == 99
    assert dock.strategy_combo.currentData() == "pyramid" and dock.budget_spin.value() == 777
    page = _page()
    page.form.strategy.setCurrentIndex(page.form.strategy.findData("budget"))
    page.apply()
    assert dock.strategy_combo.currentData() == "budget" and dock.budget_spin.value() == 777


def test_every_placeholder_fits_its_field_at_the_pages_own_width(qgis_app):
    """The Weights folder's placeholder ("empty: <engine folder>/weights/GeoLLaVA-8K, else the
    tiny demo model") was cut off at the Options dialog's default size, and so were Engine
    Python's, Engine folder's and Engine token's (its full token file path): short placeholders,
    the details in the tooltips. Measured at the width the page asks for (its size hint), the
    narrowest the dialog gives it."""
    from qgis.PyQt.QtGui import QFontMetrics
    from qgis.PyQt.QtWidgets import QApplication, QLineEdit

    page = _page()
    page.resize(page.sizeHint())
    page.show()
    QApplication.processEvents()
    try:
        edits = [e for e in page.findChildren(QLineEdit) if e.placeholderText() and e.isVisible()]
        names = {page.form.weights.lineEdit(), page.form.python.lineEdit(), page.form.engine_dir.lineEdit(),
                 page.form.token, page.form.url, page.form.extra}
        assert names <= set(edits)
        for edit in edits:
            # the text area: the field less its frame and text margins (a few px each side)
            room = edit.contentsRect().width() - 12
            needed = QFontMetrics(edit.font()).horizontalAdvance(edit.placeholderText())
            assert needed <= room, (edit.placeholderText(), needed, room)
    finally:
        page.hide()


def test_after_saving_an_emptied_url_field_follows_the_url_just_saved(qgis_app):
    set_settings(engine_url="http://127.0.0.1:8765")
    page = _page()
    form = page.form
    form.url.setText("https://gpu.example.org:8443")
    form.apply()
    form.url.setText("")  # "keep the saved one": now the https one
    assert form.ca_cert.isEnabled()



def test_saving_the_page_checks_the_engine_at_once(plugin, stub_engine):
    """A new engine URL saved: the dock's status line asks it now, not at its next timed check."""
    from conftest import wait_until

    dock = plugin.dock
    wait_until(lambda: dock._health_task is None, 20, "the first status check")
    page = _page()
    page.form.url.setText(stub_engine.url)
    page.apply()
    assert dock._health_task is not None
    wait_until(lambda: dock._health_task is None, 20, "the status check")
    assert dock.status_level in ("ok", "demo")
