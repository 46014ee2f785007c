"""Which checkpoint the engine picks (--weights, GEOVQA_WEIGHTS, weights/GeoLLaVA-8K, the demo),
and that a damaged or missing chosen checkpoint is reported, never replaced by the demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import engine.pipeline as P
from engine.loader import CheckpointError, WeightsMissingError


@pytest.fixture
def places(tmp_path, monkeypatch, tiny_checkpoint):
    """A default weights folder of the test's own (absent at first) and a demo cache that already
    holds the tiny checkpoint (so nothing is built)."""
    default = tmp_path / "repo" / "weights" / "GeoLLaVA-8K"
    monkeypatch.setattr(P, "DEFAULT_WEIGHTS", default)
    monkeypatch.delenv("GEOVQA_WEIGHTS", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-geollava").symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setenv("GEOVQA_CACHE_DIR", str(cache))
    return {"default": default, "demo": cache / "tiny-geollava", "tmp": tmp_path}


def _copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest)
    return dest


def _lose_a_shard(d: Path) -> None:
    sorted(d.glob("model-*.safetensors"))[0].unlink()


def _break_config(d: Path) -> None:
    (d / "config.json").write_text("{not json", encoding="utf-8")


def _make_llama(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))


DAMAGE = {
    "missing shard": (_lose_a_shard, r"incomplete: 1 of 4 weight shards are missing"),
    "bad config.json": (_break_config, r"cannot read .*config\.json"),
    "llama": (_make_llama, r"holds a 'llama' model"),
}


def test_no_default_folder_gives_the_demo_model(places):
    assert P.resolve_weights(None) == (places["demo"], True)
    with pytest.raises(WeightsMissingError, match="no weights: .*make weights"):
        P.resolve_weights(None, demo_ok=False)


@pytest.mark.parametrize("content", ["empty", "download temp files"])
def test_a_default_folder_with_nothing_of_a_checkpoint_gives_the_demo_model(places, content):
    default = places["default"]
    default.mkdir(parents=True)
    if content == "download temp files":  # what huggingface_hub keeps of an interrupted download
        temp = default / ".cache" / "huggingface" / "download"
        temp.mkdir(parents=True)
        (temp / "model-00001-of-00004.safetensors.incomplete").write_bytes(b"\0" * 10)
    assert P.resolve_weights(None) == (places["demo"], True)
    # `make serve` names the default folder: the same choice
    assert P.resolve_weights(default) == (places["demo"], True)


def test_a_complete_default_checkpoint_is_used(places, tiny_checkpoint):
    _copy(tiny_checkpoint, places["default"])
    assert P.resolve_weights(None)[0] == places["default"]
    assert P.resolve_weights(places["default"])[0] == places["default"]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("source", ["default", "--weights", "GEOVQA_WEIGHTS"])
def test_a_damaged_checkpoint_is_reported_not_replaced_by_the_demo(places, tiny_checkpoint, monkeypatch,
                                                                  damage, source):
    spoil, message = DAMAGE[damage]
    folder = places["default"] if source == "default" else places["tmp"] / "mine"
    spoil(_copy(tiny_checkpoint, folder))
    given = folder if source == "--weights" else None
    if source == "GEOVQA_WEIGHTS":
        monkeypatch.setenv("GEOVQA_WEIGHTS", str(folder))
    for demo_ok in (True, False):
        with pytest.raises(CheckpointError, match=message) as err:
            P.resolve_weights(given, demo_ok=demo_ok)
        assert "make weights" in str(err.value)
        assert "holds no GeoLLaVA-8K checkpoint" not in str(err.value)


def test_a_missing_folder_in_geovqa_weights_is_reported(places, monkeypatch, tiny_checkpoint):
    _copy(tiny_checkpoint, places["default"])  # not a reason to ignore the variable
    monkeypatch.setenv("GEOVQA_WEIGHTS", str(places["tmp"] / "typo"))
    with pytest.raises(WeightsMissingError, match=r"typo \(given by GEOVQA_WEIGHTS\) does not exist"):
        P.resolve_weights(None)


def test_a_missing_or_empty_weights_folder_is_reported(places):
    with pytest.raises(WeightsMissingError, match=r"nowhere \(given by --weights\) does not exist"):
        P.resolve_weights(places["tmp"] / "nowhere")
    empty = places["tmp"] / "empty"
    empty.mkdir()
    with pytest.raises(WeightsMissingError, match="holds no GeoLLaVA-8K checkpoint.*leave --weights out"):
        P.resolve_weights(empty)


def test_info_and_serve_refuse_a_damaged_default_checkpoint(places, tiny_checkpoint, capsys, monkeypatch):
    from engine.cli import main

    for var in ("GEOVQA_CONFIG_DIR", "GEOVQA_STATE_DIR"):  # serve's token and job folders
        monkeypatch.setenv(var, str(places["tmp"] / var))
    _lose_a_shard(_copy(tiny_checkpoint, places["default"]))
    import socket

    with socket.socket() as s:  # a port that is free now (serve takes 1 to 65535)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for argv in (["info"], ["info", "--memory"], ["serve", "--port", port]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "incomplete: 1 of 4 weight shards are missing" in err and "make weights" in err, argv


def test_a_file_where_the_weights_folder_should_be_is_reported(places):
    default = places["default"]
    default.parent.mkdir(parents=True)
    default.write_text("not a folder", encoding="utf-8")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        P.resolve_weights(None)
