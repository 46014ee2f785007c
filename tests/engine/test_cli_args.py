"""The subcommands share their model and token-path options (engine/cli_args.py): the same names,
choices and defaults everywhere, and bad values refused by argparse before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.protocol import DEFAULT_STRATEGY, STRATEGIES

POSITIONAL = {"ask": ["scene.tif", "How many ships?"], "finetune": ["data.json", "--out", "o"],
              "eval": ["ann.json"], "serve": [], "info": []}
TOKEN_PATH = ("ask", "finetune", "eval")


def parse(cmd: str, *extra: str):
    return build_parser(cmd).parse_args([cmd, *POSITIONAL[cmd], *extra])


@pytest.mark.parametrize("cmd", list(POSITIONAL))
def test_model_options_are_the_same_everywhere(cmd):
    a = parse(cmd, "--weights", "w", "--device", "cpu", "--quantization", "nf4", "--no-demo")
    assert (a.weights, a.device, a.quantization, a.no_demo) == (Path("w"), "cpu", "nf4", True)
    d = parse(cmd)
    assert (d.weights, d.device, d.quantization, d.no_demo) == (None, "auto", "auto", False)
    if cmd != "finetune":  # finetune writes an adapter, it does not start from one
        assert parse(cmd, "--adapter", "ad").adapter == Path("ad")


@pytest.mark.parametrize("cmd", list(POSITIONAL))
def test_unknown_quantization_is_refused(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(cmd, "--quantization", "int8")
    assert exc.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", TOKEN_PATH)
def test_token_path_options_share_defaults_and_choices(cmd):
    d = parse(cmd)
    # tokens a tile: None = the checkpoint's own (resolved from its config, see test_pipeline);
    # ask's and eval's strategy None = the --adapter's training setting, else the default
    # (Engine.resolve_visual, evaluate._adapter_defaults)
    assert (d.strategy, d.budget, d.tokens_per_tile) == (None if cmd in ("ask", "eval") else DEFAULT_STRATEGY, None, None)
    for name in STRATEGIES:
        assert parse(cmd, "--strategy", name).strategy == name
    a = parse(cmd, "--budget", "512", "--tokens-per-tile", "12", "--faithful-empty-slots")
    assert (a.budget, a.tokens_per_tile, a.faithful_empty_slots) == (512, 12, True)


def test_eval_tells_an_unset_faithful_option_from_off():
    # eval's saved run settings hold null for runs that never gave it
    assert parse("eval").faithful_empty_slots is None
    assert parse("ask").faithful_empty_slots is None  # the --adapter's setting, else off
    assert parse("finetune").faithful_empty_slots is False


@pytest.mark.parametrize("cmd", TOKEN_PATH)
@pytest.mark.parametrize("extra, message", [
    (["--strategy", "geolava"], "invalid choice: 'geolava'"),
    (["--budget", "0"], "--budget: must be at least 1, not 0"),
    (["--tokens-per-tile", "-3"], "--tokens-per-tile: must be at least 1, not -3"),
    (["--budget", "many"], "--budget: 'many' is not a whole number"),
])
def test_bad_token_path_values_stop_before_anything_loads(cmd, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(cmd, *extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--grad-accum", "--lora-r", "--max-steps", "--max-length",
                                    "--max-pixels"])
def test_finetune_counts_must_be_positive(option, capsys):
    with pytest.raises(SystemExit):
        parse("finetune", option, "0")
    assert f"{option}: must be at least 1" in capsys.readouterr().err
    assert getattr(parse("finetune", option, "3"), option[2:].replace("-", "_")) == 3


@pytest.mark.parametrize("option", ["--save-every", "--eval-every", "--keep-checkpoints"])
def test_finetune_every_n_steps_takes_zero_for_never(option, capsys):
    assert getattr(parse("finetune", option, "0"), option[2:].replace("-", "_")) == 0
    with pytest.raises(SystemExit):
        parse("finetune", option, "-1")
    assert f"{option}: must be at least 0, not -1" in capsys.readouterr().err


# option: (values refused, values taken). nan and inf used to pass float(): --lr inf or --epochs
# nan ended "done" with an adapter of NaN weights (or an empty run), --lr nan / -1 and
# --lora-dropout 1.5 failed only after the model had loaded, --lr 0 / --lora-alpha 0 trained nothing
FINETUNE_NUMBERS = {
    "--lr": (["0", "-1", "nan", "inf"], ["2e-4"]),
    "--epochs": (["0", "-1", "nan", "inf"], ["0.5", "3"]),
    "--weight-decay": (["-0.1", "nan", "inf"], ["0", "0.01"]),
    "--max-grad-norm": (["-1", "nan", "inf"], ["0", "1.0"]),
    "--warmup-ratio": (["-0.1", "1.5", "nan"], ["0", "0.03", "1"]),
    "--lora-dropout": (["-0.1", "1", "1.5", "nan"], ["0", "0.05"]),
    "--val-fraction": (["-0.5", "1", "nan"], ["0", "0.05"]),
    "--lora-alpha": (["0", "-5"], ["32"]),
}


@pytest.mark.parametrize("option", list(FINETUNE_NUMBERS))
def test_finetune_numbers_out_of_range_are_refused_before_anything_loads(option, capsys):
    refused, taken = FINETUNE_NUMBERS[option]
    for value in refused:
        with pytest.raises(SystemExit) as exc:
            parse("finetune", f"{option}={value}")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument {option}: must be " in err, (value, err)
        assert "Traceback" not in err
    for value in taken:
        assert getattr(parse("finetune", option, value), option[2:].replace("-", "_")) == float(value)


def test_main_reports_a_mistyped_strategy_without_loading(monkeypatch, capsys):
    """A typo in finetune's --strategy used to surface only after the model had loaded."""
    import engine.loader
    from engine.cli import main

    def must_not_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.loader, "load_model", must_not_load)
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "data.json", "--out", "o", "--strategy", "anchor"])
    assert exc.value.code == 2 and "invalid choice: 'anchor'" in capsys.readouterr().err


def test_weights_download_lands_where_the_engine_looks_from_any_folder(tmp_path, monkeypatch, capsys):
    import engine.weights as W
    from engine.cli import main
    from engine.pipeline import DEFAULT_WEIGHTS

    seen = {}
    monkeypatch.setattr(W, "download_weights", lambda dest, **kw: seen.setdefault("dest", dest))
    monkeypatch.chdir(tmp_path)  # not the repository: a relative default would land in here
    assert main(["weights"]) == 0
    assert Path(seen["dest"]).is_absolute() and Path(seen["dest"]) == DEFAULT_WEIGHTS
    assert DEFAULT_WEIGHTS == Path(__file__).resolve().parents[2] / "weights" / "GeoLLaVA-8K"


@pytest.mark.parametrize("cmd", ["serve", "info"])
def test_the_feature_cache_size_is_an_option_taking_zero(cmd, capsys):
    assert parse(cmd).feature_cache_bytes is None  # not given: GEOVQA_FEATURE_CACHE_BYTES, else 4 GiB
    assert parse(cmd, "--feature-cache-bytes", "0").feature_cache_bytes == 0
    assert parse(cmd, "--feature-cache-bytes", "1048576").feature_cache_bytes == 1048576
    with pytest.raises(SystemExit):
        parse(cmd, "--feature-cache-bytes", "-1")
    assert "--feature-cache-bytes: must be at least 0, not -1" in capsys.readouterr().err
