"""'Check memory' on the options page: the configured local engine says, without loading the model,
what each weight format needs on this computer and what is free."""

from __future__ import annotations

import os

import pytest
from conftest import ENGINE_PY, ENGINE_ROOT, _tiny_checkpoint, fake_engine_python, set_settings, wait_until


def test_the_command_keeps_only_the_model_options(tmp_path):
    from geovqa.engine_process import memory_check_command
    from geovqa.settings import Settings

    py = fake_engine_python(tmp_path / "repo" / ".venv" / "bin" / "python")
    s = Settings(engine_dir=str(tmp_path / "repo"), weights_dir="/w/GeoLLaVA-8K",
                 extra_args="--device cpu --log-level debug --quantization=nf4 --no-demo --port 9")
    program, args, workdir = memory_check_command(s)
    assert program == str(py) and workdir == str(tmp_path / "repo")
    assert args == ["-m", "engine", "info", "--memory", "--json", "--weights", "/w/GeoLLaVA-8K",
                    "--device", "cpu", "--quantization=nf4", "--no-demo"]


def test_summary_names_every_format():
    from geovqa.engine_process import memory_summary

    report = {"weights_dir": "/w", "demo_model": False, "device": "cuda:0", "free_bytes": 12_000_000_000,
              "parameters": 7_935_664_649,
              "formats": {"nf4": {"weights_bytes": 6_186_947_346, "needed_bytes": 7_260_689_170, "fits": True},
                          "bf16": {"weights_bytes": 15_871_329_298, "needed_bytes": 17_458_462_227, "fits": False}}}
    text = memory_summary(report)
    assert text.startswith("/w, 7,935,664,649 parameters. Free on cuda:0: 12.0 GB.")
    assert "nf4 7.3 GB: fits" in text and "bf16 17.5 GB: does not fit" in text


def _form_done(form):
    return lambda: form.memory_button.isEnabled() and form.memory_label.text() not in ("", "Checking …")


def test_an_unclosed_quote_in_extra_arguments_gives_the_button_back(qgis_app, tmp_path):
    """An apostrophe in 'Extra engine arguments' raised ValueError out of Check memory: a Python
    error dialog, and the button stayed disabled at "Checking …"."""
    import sys

    from geovqa.settings_page import SettingsForm

    set_settings(python=sys.executable, engine_dir=str(tmp_path), extra_args="--adapter /data/Bob's lora")
    form = SettingsForm()
    form.check_memory()
    assert form.memory_button.isEnabled()
    text = form.memory_label.text()
    assert text.startswith("Cannot tell: The setting 'Extra engine arguments'") and "No closing quotation" in text


@pytest.mark.skipif(not ENGINE_PY.exists(), reason="needs the engine venv (make setup)")
def test_check_memory_button_asks_the_real_engine(qgis_app):
    from geovqa.settings_page import SettingsForm

    tiny = _tiny_checkpoint(dict(os.environ))
    set_settings(python=str(ENGINE_PY), engine_dir=str(ENGINE_ROOT), weights_dir=str(tiny),
                 extra_args="--device cpu")
    form = SettingsForm()
    form.check_memory()
    assert form.memory_label.text() == "Checking …" and not form.memory_button.isEnabled()
    wait_until(_form_done(form), 120, "the memory check")
    text = form.memory_label.text()
    assert text.startswith("the tiny demo model, ") and "Free on cpu:" in text
    # the tiny weights plus the working-memory floor, plus what its features can fill of the
    # engine's feature cache (RAM beside a model on the CPU), said with how to change it
    assert "fp32 1.8 GB: fits" in text and "feature cache, 0.7 GB: --feature-cache-bytes" in text
    assert text.endswith("The default (auto) loads fp32.")  # --device cpu

    # the cap in Extra engine arguments is the one counted (serve would keep it)
    set_settings(extra_args="--device cpu --feature-cache-bytes 0")
    form = SettingsForm()
    form.check_memory()
    wait_until(_form_done(form), 120, "the memory check without a feature cache")
    text = form.memory_label.text()
    assert "fp32 1.1 GB: fits" in text and "feature cache" not in text
    form.weights.setFilePath(str(tiny))

    # the form's fields count, not only saved settings: a folder without weights is named
    form.weights.setFilePath(str(ENGINE_ROOT / "no-such-weights"))
    form.check_memory()
    wait_until(_form_done(form), 120, "the second memory check")
    assert form.memory_label.text().startswith("Cannot tell: no weights:")


def test_check_memory_without_an_engine_python_says_so(qgis_app):
    from geovqa.settings_page import SettingsForm

    set_settings(python="", engine_dir="")
    form = SettingsForm()
    form.check_memory()
    wait_until(_form_done(form), 10, "the memory check")
    assert form.memory_label.text().startswith("Cannot tell: No Python for the engine is configured")
