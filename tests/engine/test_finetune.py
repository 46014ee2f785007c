"""LoRA fine-tuning on the tiny checkpoint (CPU): labels, overfitting, resume, adapter in `ask`."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataError, Sample, Turn, load_dataset
from engine.finetune import add_finetune_arguments, run_finetune
from engine.finetune_inputs import IGNORE, encode_conversation
from engine.finetune_lora import LM_TARGET_REGEX

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _write_data(root, n=24, size=(420, 350)):
    """n small PNG scenes, each a solid colour with a grey square; the answer is the colour."""
    rows = []
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for i in range(n):
        name = names[i % 3]
        w, h = size
        px = np.empty((h, w, 3), np.uint8)
        px[:] = COLOURS[name]
        x, y = rng.integers(0, w - 60), rng.integers(0, h - 60)
        px[y:y + 60, x:x + 60] = 128
        Image.fromarray(px).save(root / f"scene{i}.png")
        rows.append({"id": f"s{i}", "image": [f"scene{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhich colour covers most of the scene?"},
            {"from": "gpt", "value": name}]})
    p = root / "train.json"
    p.write_text(json.dumps(rows))
    return p


def _args(data, out, weights, *extra):
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    return parser.parse_args([
        str(data), "--out", str(out), "--weights", str(weights), "--device", "cpu", "--quantization", "fp32",
        "--strategy", "geollava", "--tokens-per-tile", "4", "--lora-r", "8", "--lora-alpha", "16",
        "--lora-dropout", "0", "--lr", "1e-2",
        "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head", "--warmup-ratio", "0", "--grad-accum", "2",
        "--val-fraction", "0.125", "--eval-every", "5", "--save-every", "5", "--no-progress", *extra])


def _log(out):
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_target_regex_hits_only_the_language_model():
    import re

    assert re.fullmatch(LM_TARGET_REGEX, "model.layers.3.self_attn.q_proj")
    assert re.fullmatch(LM_TARGET_REGEX, "base_model.model.model.layers.0.mlp.down_proj")
    assert not re.fullmatch(LM_TARGET_REGEX, "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(LM_TARGET_REGEX, "model.mm_projector.0")


def test_labels_cover_only_assistant_answers(tiny_tokenizer):
    tok = tiny_tokenizer
    s = Sample(index=0, id="0", image=None, turns=[
        Turn("user", "<image>\nHow many ships?"), Turn("assistant", "Three"),
        Turn("user", "And planes?"), Turn("assistant", "Two")])
    enc = encode_conversation(tok, s)
    labelled = [t for t, lab in zip(enc.after, enc.after_labels) if lab != IGNORE]
    assert tok.decode(labelled) == "Three<|im_end|>Two<|im_end|>"
    # the single-turn prompt part equals what inference builds
    from engine.prompt import split_prompt

    pieces = split_prompt(tok, "How many ships?")
    assert enc.before == pieces.before
    assert enc.after[: len(pieces.after)] == pieces.after


def test_overfit_resume_and_adapter_changes_ask(tmp_path, tiny_checkpoint):
    torch.manual_seed(0)
    data = _write_data(tmp_path)
    out = tmp_path / "run"
    # first leg: 10 steps, checkpoints at 5 and 10
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "10")) == 0
    assert (out / "checkpoint-5" / "trainer_state.pt").is_file() and (out / "checkpoint-10").is_dir()
    state = torch.load(out / "checkpoint-10" / "trainer_state.pt", weights_only=True)  # no pickle
    assert state["step"] == 10
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    # second leg: --resume continues the step count up to 30
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "30", "--resume")) == 0
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert (out / "checkpoint-30").is_dir() and (out / "loss.png").stat().st_size > 1000
    losses = [float(r["loss"]) for r in rows]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, (first, last)
    assert any(r["val_loss"] for r in rows)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert (out / "adapter" / "adapter_config.json").is_file()

    # the adapter changes the answers of `ask` (greedy, same inputs)
    answers = {}
    for adapter in (None, out / "adapter"):
        answers[adapter is not None] = _ask(tiny_checkpoint, adapter, tmp_path / "scene0.png")
    assert answers[True] != answers[False]
    # the tuned model answers in the trained form: (a prefix of) one of the colour words
    tuned = answers[True].strip()
    assert tuned and any(c.startswith(tuned) or tuned.startswith(c) for c in COLOURS), answers


def _ask(weights, adapter, image):
    """Greedy answer through the engine's `ask` (the path `python -m engine ask --adapter` runs)."""
    from engine.pipeline import AskRequest, Engine

    eng = Engine(weights, device="cpu", quantization="fp32", adapter=adapter)
    req = AskRequest(raster_path=str(image), question="Which colour covers most of the scene?",
                     strategy="geollava", tokens_per_tile=4, max_new_tokens=6)
    for ev in eng.ask(req):
        if ev["type"] == "result":
            return ev["answer"]
        if ev["type"] == "error":
            raise AssertionError(ev)
    raise AssertionError("no result event")


def test_bad_samples_stop_or_skip_with_report(tmp_path, tiny_checkpoint):
    data = _write_data(tmp_path, n=6)
    rows = json.loads(data.read_text())
    rows[2]["image"] = ["missing.png"]
    rows[4]["conversations"] = [{"from": "gpt", "value": "x"}]
    rows[5]["conversations"][0]["value"] = "<image>\n" + "which colour is it " * 80  # too long
    data.write_text(json.dumps(rows))
    out = tmp_path / "bad"
    with pytest.raises(DataError, match="sample 2"):
        run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "1", "--on-bad-sample", "stop"))
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "3", "--on-bad-sample", "skip",
                              "--save-every", "0", "--val-fraction", "0", "--max-length", "200")) == 0
    report = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in report] == [(2, "missing_image"), (4, "malformed"),
                                                           (5, "too_long")]
    # a resumed run keeps the training-time entry (once) although it never meets sample 5 again
    # (a new run goes into a folder of its own: this one holds the finished run above)
    out = tmp_path / "resumed"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--on-bad-sample", "skip",
                              "--save-every", "1", "--val-fraction", "0", "--max-length", "200")) == 0
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "5", "--on-bad-sample", "skip",
                              "--save-every", "1", "--val-fraction", "0", "--max-length", "200",
                              "--resume")) == 0
    report = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["reason"]) for r in report) == [(2, "missing_image"), (4, "malformed"),
                                                                 (5, "too_long")]
    samples, _ = load_dataset(data, on_bad="skip")
    assert len(samples) == 4


def test_a_too_long_sample_stops_the_run_under_on_bad_sample_stop(tmp_path, tiny_checkpoint):
    """Found while training, a sample longer than --max-length stops the run (the default) like
    one whose visual path fails; it was skipped and listed whatever --on-bad-sample said."""
    data = _write_data(tmp_path, n=4)
    rows = json.loads(data.read_text())
    rows[1]["conversations"][0]["value"] = "<image>\n" + "which colour is it " * 80
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"sample 1 \(id s1\) has \d+ tokens .*more than --max-length 200.*"
                                        "--on-bad-sample skip"):
        run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--save-every", "0",
                           "--val-fraction", "0", "--max-length", "200"))
    assert not (out / "adapter").exists()
    assert (out / "bad_samples.jsonl").read_text() == ""  # nothing skipped


def test_a_sample_too_thin_for_any_patch_is_a_bad_sample_not_trained_blind(tmp_path, tiny_checkpoint):
    """Data in one column of three among tagged nodata: no patch is half valid, so `uniform`
    keeps no visual token. Such a sample was trained on without its image (no error, no report);
    it is now a bad sample with its index: the run stops (default) or skips and lists it.
    geollava, which keeps such clusters, trains on it."""
    data = _write_data(tmp_path, n=4)
    arr = np.random.default_rng(0).integers(1, 255, (3, 350, 420)).astype(np.uint8)
    arr[:, :, np.arange(420) % 3 != 0] = 0
    _geotiff(tmp_path / "thin.tif", arr, nodata=0)
    rows = json.loads(data.read_text())
    rows[1]["image"] = ["thin.tif"]
    data.write_text(json.dumps(rows))
    common = ("--strategy", "uniform", "--save-every", "0", "--val-fraction", "0", "--grad-accum", "1")
    with pytest.raises(DataError, match=r"sample 1 \(id s1\): building its visual tokens failed: No patch .*"
                                        r"kept no visual token.*--on-bad-sample skip"):
        run_finetune(_args(data, tmp_path / "stop", tiny_checkpoint, "--max-steps", "4", *common))
    out = tmp_path / "skip"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--on-bad-sample", "skip",
                              *common)) == 0
    report = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in report] == [(1, "visual_failed")]
    assert "kept no visual token" in report[0]["message"]
    out = tmp_path / "geollava"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", *common[2:])) == 0
    assert (out / "bad_samples.jsonl").read_text() == ""


def test_target_regex_lm_head_optional():
    import re

    from engine.finetune_lora import lm_target_regex

    rx = lm_target_regex(["q_proj", "lm_head"])
    assert re.fullmatch(rx, "lm_head") and re.fullmatch(rx, "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(LM_TARGET_REGEX, "lm_head")
    with pytest.raises(ValueError, match="unknown"):
        lm_target_regex(["fc1"])


def test_a_mistyped_target_module_is_refused_before_the_data_or_the_model_loads(tmp_path, tiny_checkpoint,
                                                                                 monkeypatch):
    import engine.finetune as ft
    import engine.loader

    data = _write_data(tmp_path, n=4)
    monkeypatch.setattr(engine.loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(ft, "load_dataset", lambda *a, **k: pytest.fail("the data was checked"))
    for typed in ("q_prj,v_proj", " , "):
        with pytest.raises(ValueError, match="unknown LoRA target modules \\['q_prj'\\]|no LoRA target"):
            run_finetune(_args(data, tmp_path / "run", tiny_checkpoint, "--target-modules", typed))
    assert not (tmp_path / "run").exists()


def test_gpu_benchmark_step_runs_on_cpu_with_the_tiny_model(tmp_path, tiny_checkpoint):
    """The code of engine/benchmarks/finetune_gpu.py (GPU run: full size, nf4) with small
    dimensions on the CPU: checkpoint writer, engine loader, LoRA, one step per token count."""
    from engine.benchmarks.finetune_gpu import main, qlora_step
    from engine.tiny import write_random_checkpoint

    tiny_cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    small = dict(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vision_config=tiny_cfg["vision_config"],
                 mm_hidden_size=tiny_cfg["mm_hidden_size"])
    ckpt = write_random_checkpoint(tmp_path / "ckpt", "cpu", **small)
    rec = qlora_step(ckpt, device="cpu", quantization="fp32", n_visual=[8, 32], lora_r=4)
    assert [s["visual_tokens"] for s in rec["steps"]] == [8, 32]
    assert all(np.isfinite(s["loss"]) and s["sequence_tokens"] > s["visual_tokens"] for s in rec["steps"])
    assert rec["trainable_parameters"] > 0
    if not torch.cuda.is_available():
        assert main([]) == 0  # skips cleanly, records nothing


def test_answer_loss_equals_the_causal_lm_loss(tiny_model, tiny_tokenizer):
    from engine.finetune_inputs import answer_loss, build_training_inputs

    s = Sample(index=0, id="0", image=None, turns=[Turn("user", "<image>\nHow many?"), Turn("assistant", "Three")])
    enc = encode_conversation(tiny_tokenizer, s)
    visual = torch.randn(7, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds, labels, mask = build_training_inputs(tiny_model, enc, visual)
    assert int((labels != IGNORE).sum()) == enc.n_answer_tokens
    with torch.no_grad():
        ref = tiny_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        ours = answer_loss(tiny_model, embeds, labels, mask)
    assert torch.allclose(ref, ours, atol=1e-5)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_checkpoint):
    """Run 6 steps; then 'interrupt' a copy after its step-3 checkpoint and resume it: the losses
    of steps 4-6 and the final adapter weights match the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    data = _write_data(tmp_path, n=8)
    full = tmp_path / "full"
    assert run_finetune(_args(data, full, tiny_checkpoint, "--max-steps", "6", "--save-every", "3",
                              "--val-fraction", "0")) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoint-6")
    shutil.rmtree(part / "adapter")
    assert run_finetune(_args(data, part, tiny_checkpoint, "--max-steps", "6", "--save-every", "3",
                              "--val-fraction", "0", "--resume")) == 0
    a, b = _log(full), _log(part)
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_another_lr_and_weight_decay_uses_them(tmp_path, tiny_checkpoint):
    """The learning rate may change on --resume (docs): the restored optimizer and scheduler kept
    the checkpoint's --lr and --weight-decay, so a resume with --lr 1e-5 still trained at 1e-2."""
    import math

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "1",
                              "--val-fraction", "0", "--lr", "1e-2")) == 0
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--save-every", "1",
                              "--val-fraction", "0", "--lr", "1e-5", "--weight-decay", "0.1", "--resume")) == 0
    lrs = [float(r["lr"]) for r in _log(out)]
    # steps 3 and 4 on the 4-step cosine (no warmup) of the new --lr, from where the schedule stood
    assert lrs[2:] == [float(f"{1e-5 * 0.5 * (1 + math.cos(math.pi * k / 4)):.3e}") for k in (3, 4)]
    assert lrs[0] > 1e-3
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert {(g["initial_lr"], g["weight_decay"]) for g in groups} == {(1e-5, 0.1)}
    assert state["scheduler"]["base_lrs"] == [1e-5] * len(groups)


def test_by_default_only_the_newest_three_checkpoints_are_kept(tmp_path, tiny_checkpoint):
    """--keep-checkpoints had no default: every checkpoint stayed, and the disk filled for the
    whole run. It keeps the newest 3 by default (GeoLLaVA-8K's ft3.sh: save_total_limit 3); 0
    keeps all."""
    from engine.finetune_checkpoints import prune_checkpoints

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--save-every", "1",
                              "--val-fraction", "0")) == 0
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert _args(data, out, tiny_checkpoint, "--keep-checkpoints", "0").keep_checkpoints == 0
    prune_checkpoints(out, 0)  # 0: keep all
    assert len(list(out.glob("checkpoint-*"))) == 3
    prune_checkpoints(out, 1)
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-4"]


def test_cli_exposes_finetune_and_eval():
    from engine.cli import build_parser

    a = build_parser("finetune").parse_args(["finetune", "data.json", "--out", "o", "--resume",
                                             "--on-bad-sample", "skip"])
    assert a.func is run_finetune and a.resume and a.on_bad_sample == "skip"
    from engine.evaluate import run_eval

    e = build_parser("eval").parse_args(["eval", "ann.json", "--limit", "5", "--format", "mme"])
    assert e.func is run_eval and e.limit == 5


def test_resume_refuses_another_token_path_or_base(tmp_path, tiny_checkpoint):
    """A resumed run keeps the base model and the visual-token settings of its checkpoint."""
    from engine.data import DataError
    from engine.finetune import _check_resume_settings, _run_args

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    out.mkdir()
    first = _args(data, out, tiny_checkpoint)
    saved = _run_args(first)
    del saved["faithful_empty_slots"]  # written before the option existed: the default is assumed
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(_args(data, out, tiny_checkpoint, "--resume"), out)  # same: fine
    _check_resume_settings(_args(data, out, tiny_checkpoint, "--lr", "1e-3", "--resume"), out)
    # the schedule, the dropout and the run's length may change; the target list as typed may differ
    # a record of an older version holds --target-modules as typed, spaces and all
    (out / "finetune_args.json").write_text(json.dumps({**saved, "target_modules": saved["target_modules"].replace(",", ", ")}))
    _check_resume_settings(_args(data, out, tiny_checkpoint, "--resume"), out)
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(_args(data, out, tiny_checkpoint, "--lora-dropout", "0.2", "--max-steps", "9",
                                 "--target-modules", " " + saved["target_modules"].replace(",", ", "),
                                 "--resume"), out)
    for extra, flag in ((["--tokens-per-tile", "6"], "--tokens-per-tile"),
                        (["--faithful-empty-slots"], "--faithful-empty-slots"),
                        (["--strategy", "uniform"], "--strategy"),
                        (["--seed", "1"], "--seed"),  # another split and data order
                        (["--val-fraction", "0.25"], "--val-fraction"),
                        (["--lora-alpha", "8"], "--lora-alpha"),
                        (["--lora-r", "4"], "--lora-r"),  # another adapter shape
                        (["--target-modules", "q_proj"], "--target-modules"),
                        (["--grad-accum", "3"], "--grad-accum"),  # other samples behind each step
                        (["--image-root", str(tmp_path / "elsewhere")], "--image-root"),
                        (["--max-pixels", "100"], "--max-pixels"),
                        (["--bands", "3,2,1"], "--bands")):  # other colours than the run saw
        with pytest.raises(DataError, match=flag):
            _check_resume_settings(_args(data, out, tiny_checkpoint, *extra, "--resume"), out)
    # without --resume a new run may change anything (it starts over)
    _check_resume_settings(_args(data, out, tiny_checkpoint, "--tokens-per-tile", "6"), out)


def test_resume_compares_paths_as_files_not_text(tmp_path, tiny_checkpoint, monkeypatch):
    """'./train.json' and 'train.json' are one file; 'train.json' in another folder is another."""
    from engine.finetune import _check_resume_settings, _run_args

    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        _write_data(tmp_path / d, n=4)
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.chdir(tmp_path / "one")
    saved = _run_args(_args("train.json", out, tiny_checkpoint))
    assert saved["data"] == str(tmp_path / "one" / "train.json")
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(_args("./train.json", out, tiny_checkpoint, "--resume"), out)
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(DataError, match="--data"):
        _check_resume_settings(_args("train.json", out, tiny_checkpoint, "--resume"), out)


def _gpu_here(monkeypatch, gpu: bool):
    """Make the engine see (or not) a CUDA GPU with bitsandbytes, as device resolution goes."""
    import engine.devices as devices

    monkeypatch.setattr(devices, "cuda_available", lambda: gpu)
    monkeypatch.setattr(devices, "bitsandbytes_usable", lambda: True)
    monkeypatch.setattr(devices, "flash_attn_usable", lambda: False)


def test_resume_compares_the_resolved_quantization_not_auto_as_typed(tmp_path, tiny_checkpoint, monkeypatch):
    """--quantization auto is nf4 (QLoRA) on a GPU and fp32 on the CPU: a run begun on the GPU and
    resumed on the CPU would go on training on another base format. finetune_args.json records
    the format auto gave, and a resume that resolves to another is refused before anything loads."""
    from engine.finetune import _check_resume_settings, _run_args

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    out.mkdir()

    def leg(*extra):
        return _args(data, out, tiny_checkpoint, "--quantization", "auto", *extra)

    _gpu_here(monkeypatch, False)
    assert _run_args(leg("--device", "auto"))["quantization"] == "fp32"
    _gpu_here(monkeypatch, True)
    saved = _run_args(leg("--device", "cuda"))
    assert saved["quantization"] == "nf4"
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(leg("--device", "auto", "--resume"), out)  # the GPU again: nf4
    _check_resume_settings(leg("--device", "cuda", "--quantization", "nf4", "--resume"), out)
    with pytest.raises(DataError, match="--quantization: 'nf4' -> 'bf16'"):
        _check_resume_settings(leg("--device", "cuda", "--quantization", "bf16", "--resume"), out)
    _gpu_here(monkeypatch, False)
    with pytest.raises(DataError, match="--quantization: 'nf4' -> 'fp32'"):
        _check_resume_settings(leg("--device", "cpu", "--resume"), out)
    # a record of an older version holds "auto" as typed: it counts as what auto gives now
    (out / "finetune_args.json").write_text(json.dumps({**saved, "quantization": "auto"}))
    _check_resume_settings(leg("--device", "cpu", "--resume"), out)
    (out / "finetune_args.json").write_text(json.dumps({**saved, "quantization": "bf16"}))
    with pytest.raises(DataError, match="--quantization: 'bf16' -> 'fp32'"):
        _check_resume_settings(leg("--device", "cpu", "--resume"), out)


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(tmp_path, tiny_checkpoint, monkeypatch):
    """Without --resume, another run's checkpoints in --out are not mixed with (pruned against,
    resumed from): the run stops before the data or the model are loaded."""
    import engine.loader

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    (out / "checkpoint-40" / "adapter").mkdir(parents=True)
    (out / "checkpoint-40" / "trainer_state.pt").write_bytes(b"another run")
    (out / "finetune_args.json").write_text('{"seed": 7}')

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.loader, "load_model", no_model)
    with pytest.raises(DataError, match=r"checkpoint-40.*--resume.*another --out"):
        run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2"))
    assert (out / "checkpoint-40" / "trainer_state.pt").read_bytes() == b"another run"
    assert json.loads((out / "finetune_args.json").read_text()) == {"seed": 7}
    assert not (out / "bad_samples.jsonl").exists()


def test_a_new_run_into_a_folder_with_a_finished_run_is_refused(tmp_path, tiny_checkpoint, monkeypatch):
    """A finished run saved without checkpoints (--save-every 0) keeps its adapter, log and
    summary: a new run without --resume into its --out is refused before anything loads, where
    it overwrote them. A run that stopped before its first step (a header-only log) is no result."""
    import engine.loader

    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "0",
                              "--val-fraction", "0")) == 0
    kept = {p: (out / p).read_bytes() for p in ("adapter/adapter_model.safetensors", "train_log.csv",
                                                "finetune_summary.json", "finetune_args.json")}

    def no_model(*a, **k):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(engine.loader, "load_model", no_model)
    again = _args(data, out, tiny_checkpoint, "--max-steps", "1", "--save-every", "0", "--val-fraction", "0",
                  "--lr", "5e-2")
    with pytest.raises(DataError, match=r"results of an earlier run \(adapter, finetune_summary.json, "
                                        r"train_log.csv\).*another --out, or remove them"):
        run_finetune(again)
    assert {p: (out / p).read_bytes() for p in kept} == kept
    for p in ("adapter", "finetune_summary.json"):  # each one alone is a finished run's
        (out / p).rename(out / (p + ".old"))
    with pytest.raises(DataError, match=r"earlier run \(train_log.csv\)"):
        run_finetune(again)
    (out / "train_log.csv").write_text("step,epoch,loss,lr,tokens_per_s,val_loss,elapsed_s\n")
    with pytest.raises(RuntimeError, match="the model was loaded"):  # past the check
        run_finetune(again)


def test_a_resume_refused_at_the_adapter_keeps_the_run_record(tmp_path, tiny_checkpoint):
    """A resume with another LoRA rank is refused from finetune_args.json before anything loads,
    and the record still describes the run in the folder. Without that record (lost, or copied
    checkpoints) the adapter's restore refuses it, and no record of the refused run is written."""
    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "1", "--save-every", "1",
                              "--val-fraction", "0")) == 0
    other_rank = _args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "1",
                       "--val-fraction", "0", "--lora-r", "4", "--resume")
    with pytest.raises(DataError, match="--lora-r: 8 -> 4"):
        run_finetune(other_rank)
    saved = json.loads((out / "finetune_args.json").read_text())
    assert saved["lora_r"] == 8 and saved["max_steps"] == 1
    (out / "finetune_args.json").unlink()
    with pytest.raises(DataError, match="other LoRA settings"):
        run_finetune(other_rank)
    assert not (out / "finetune_args.json").exists()


def test_resume_compares_the_resolved_base_model_not_the_flag_as_typed(tmp_path, tiny_checkpoint, monkeypatch):
    """--weights left out both times: the checkpoint GEOVQA_WEIGHTS, the default folder or the demo
    gave each run is compared (and refused before anything loads), not the None typed."""
    import engine.loader
    from engine.finetune import _check_resume_settings, _run_args

    from conftest import demo_and_real

    real = demo_and_real(tmp_path, monkeypatch, tiny_checkpoint)
    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    out.mkdir()

    def without_weights(*extra):
        args = _args(data, out, "unused", *extra)
        args.weights = None
        return args

    saved = _run_args(without_weights())  # the demo model
    assert saved["weights"] == str(tiny_checkpoint.resolve()) and saved["demo_model"] is True
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(without_weights("--resume"), out)  # the same model: fine
    monkeypatch.setenv("GEOVQA_WEIGHTS", str(real))
    monkeypatch.setattr(engine.loader, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(DataError, match=r"--weights: .* -> '.*real', demo model: True -> False"):
        run_finetune(without_weights("--resume"))
    # a record of an older version (--weights as typed: None, no demo_model) counts as unchanged
    del saved["demo_model"]
    saved["weights"] = None
    (out / "finetune_args.json").write_text(json.dumps(saved))
    _check_resume_settings(without_weights("--resume"), out)


def _geotiff(path, data, **kw):
    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:  # pragma: no cover
        from rasters import write_geotiff
    return write_geotiff(path, data, **kw)


@pytest.mark.parametrize("strategy", ["budget", "pyramid"])
def test_training_selects_the_same_visual_tokens_as_ask(tmp_path, tiny_checkpoint, strategy):
    """The text-guided strategies score the image through the LM's first decoder layer, whose
    q_proj / k_proj carry LoRA. Built in train mode, LoRA dropout picked other tokens on every
    pass, and other tokens than `ask` (eval mode) picks; the model stays in train mode after."""
    from engine.finetune_inputs import default_visual_fn
    from engine.finetune_lora import add_lora
    from engine.loader import load_model

    loaded = load_model(tiny_checkpoint, device="cpu", quantization="fp32")
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.05)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # an adapter that has learned something
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    raster = _geotiff(tmp_path / "a.tif", np.random.default_rng(3).integers(0, 255, (3, 350, 420), dtype=np.uint8))
    sample = Sample(index=0, id="0", image=raster, turns=[Turn("user", "<image>\nHow many buildings?"),
                                                          Turn("assistant", "3")])
    fn = default_visual_fn(model, strategy=strategy, budget=64, tokenizer=loaded.tokenizer)
    model.eval()
    at_inference = fn(sample)
    model.train()  # as in the training loop
    for _ in range(2):
        got = fn(sample)
        assert got.shape == at_inference.shape and torch.equal(got, at_inference)
    assert model.training


def test_finetune_takes_the_bands_ask_and_the_plugin_choose(tmp_path, tiny_checkpoint):
    """`ask --bands 3,2,1` and the plugin (the bands the layer's style shows) choose the bands the
    model sees; `finetune` had no --bands, so a 4-band BGRN stack always trained as bands 1,2,3.
    --bands takes ask's syntax, a record's own "bands" replaces it, both reach prepare_visual."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        path = _geotiff(tmp_path / f"bgrn{i}.tif", rng.integers(0, 4000, (4, 60, 80)).astype(np.uint16))
        rows.append({"id": f"s{i}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\nHow many fields?"}, {"from": "gpt", "value": str(i)}]})
    rows[2]["bands"] = [4]  # this record's own choice (near infrared as grey)
    data = tmp_path / "bgrn.json"
    data.write_text(json.dumps(rows))
    for bad in ("3,2", "0,1,2", "red"):  # as ask: one band or three, 1-based
        with pytest.raises(SystemExit):
            _args(data, tmp_path / "x", tiny_checkpoint, "--bands", bad)
    args = _args(data, tmp_path / "run", tiny_checkpoint, "--bands", "3,2,1", "--max-steps", "2",
                 "--grad-accum", "3", "--val-fraction", "0", "--save-every", "0", "--strategy", "geollava")
    assert args.bands == [3, 2, 1]
    seen = {}

    def factory(model, **kw):
        fn = default_visual_fn(model, **kw)

        def wrapped(sample):
            from engine.raster import read_for_tiling

            seen[sample.id] = read_for_tiling(str(sample.image), bands=sample.bands or kw["bands"]).bands
            return fn(sample)

        return wrapped

    from engine.finetune_inputs import default_visual_fn

    assert run_finetune(args, visual_fn_factory=factory) == 0
    assert seen == {"s0": (3, 2, 1), "s1": (3, 2, 1), "s2": (4, 4, 4)}
    assert json.loads((tmp_path / "run" / "finetune_args.json").read_text())["bands"] == [3, 2, 1]


QUESTION = "How many buildings are there?"


def _bgrn_data(root, n=2):
    """n small 4-band uint16 GeoTIFFs (a BGRN-like stack), one question each."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = _geotiff(root / f"scene{i}.tif", rng.integers(0, 4000, (4, 350, 420)).astype(np.uint16))
        rows.append({"id": f"s{i}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": str(i + 1)}]})
    p = root / "train.json"
    p.write_text(json.dumps(rows))
    return p


def _one_step(data, out, weights, *extra):
    return _args(data, out, weights, "--max-steps", "1", "--grad-accum", "1", "--val-fraction", "0",
                 "--save-every", "1", *extra)


def _events(engine, **fields):
    from engine.pipeline import AskRequest

    return list(engine.ask(AskRequest(question=QUESTION, max_new_tokens=1, **fields)))


def test_ask_with_an_adapter_sees_the_visual_tokens_it_was_trained_on(tmp_path, tiny_checkpoint):
    """Trained with --strategy anchored --tokens-per-tile 4 --bands 3,2,1, the adapter was served
    with the default geollava path at the checkpoint's 24 a tile and the default bands: nothing
    recorded the settings. The adapter (and each checkpoint's) now records them; the engine uses
    them for what a request leaves out, keeps what it gives (with a note), says them in /health;
    an adapter without the record gets the defaults as before."""
    from engine.loader import load_model
    from engine.pipeline import Engine, prepare_visual

    data = _bgrn_data(tmp_path)
    out = tmp_path / "run"
    assert run_finetune(_one_step(data, out, tiny_checkpoint, "--strategy", "anchored", "--bands", "3,2,1")) == 0
    recorded = json.loads((out / "adapter" / "geovqa_training.json").read_text())
    assert recorded == json.loads((out / "checkpoint-1" / "adapter" / "geovqa_training.json").read_text())
    assert {k: recorded[k] for k in ("strategy", "budget", "tokens_per_tile", "faithful_empty_slots", "bands")} == {
        "strategy": "anchored", "budget": None, "tokens_per_tile": 4, "faithful_empty_slots": False,
        "bands": [3, 2, 1]}
    raster = str(tmp_path / "scene0.tif")
    base = load_model(tiny_checkpoint, device="cpu", quantization="fp32").model
    trained = prepare_visual(base, raster, QUESTION, strategy="anchored", tokens_per_tile=4, bands=[3, 2, 1]).selection

    eng = Engine(tiny_checkpoint, device="cpu", quantization="fp32", adapter=out / "adapter")
    health = eng.health()
    assert health["adapter"] == str((out / "adapter").resolve()) and health["adapter_settings"]["strategy"] == "anchored"
    events = _events(eng, raster_path=raster)  # `ask --adapter DIR` and a request without settings
    result = events[-1]
    assert (result["strategy"], result["tokens"]["visual_kept"], result["bands"]) == \
        ("anchored", int(trained.n_tokens), [3, 2, 1])
    assert not [e for e in events if e["type"] == "status" and e["message"].startswith("note:")]
    # a request's own settings are kept, and the difference is said
    events = _events(eng, raster_path=raster, strategy="geollava", bands=[1, 2, 3])
    notes = [e["message"] for e in events if e["type"] == "status" and e["message"].startswith("note:")]
    assert events[-1]["strategy"] == "geollava" and events[-1]["bands"] == [1, 2, 3]
    assert len(notes) == 1 and "strategy geollava" in notes[0] and "bands 1, 2, 3" in notes[0] \
        and "strategy anchored" in notes[0], notes
    # a raster without the adapter's bands: the engine's own choice, and a note says so
    grey = _geotiff(tmp_path / "grey.tif", np.random.default_rng(1).integers(0, 255, (1, 300, 300), dtype=np.uint8))
    events = _events(eng, raster_path=str(grey))
    assert events[-1]["bands"] == [1, 1, 1]
    assert any("this raster has 1" in e.get("message", "") for e in events if e["type"] == "status")

    # an adapter of an older version (no record): the engine's defaults, as before
    (out / "adapter" / "geovqa_training.json").unlink()
    old = Engine(tiny_checkpoint, device="cpu", quantization="fp32", adapter=out / "adapter")
    assert old.health()["adapter_settings"] is None
    result = _events(old, raster_path=raster)[-1]
    assert result["strategy"] == "geollava" and result["bands"] == [1, 2, 3]
    # a broken record is refused when the adapter loads, not ignored
    (out / "adapter" / "geovqa_training.json").write_text('{"strategy": "geolava"}')
    from engine.loader import CheckpointError

    with pytest.raises(CheckpointError, match="geovqa_training.json"):
        load_model(tiny_checkpoint, device="cpu", quantization="fp32", adapter=out / "adapter")


def test_ask_says_that_it_runs_an_adapter_and_with_what(tmp_path, tiny_checkpoint, capsys):
    """`ask --adapter DIR` printed token counts, bands, timings: nothing said the answer came from
    the base model plus an adapter, nor which visual-token settings it took from it."""
    from engine.cli import main

    data = _bgrn_data(tmp_path)
    out = tmp_path / "run"
    assert run_finetune(_one_step(data, out, tiny_checkpoint, "--strategy", "anchored")) == 0
    capsys.readouterr()
    ask = ["ask", str(tmp_path / "scene0.tif"), QUESTION, "--weights", str(tiny_checkpoint), "--device", "cpu",
           "--quantization", "fp32", "--adapter", str(out / "adapter"), "--max-new-tokens", "1",
           "--output-dir", str(tmp_path / "outputs")]
    assert main(ask) == 0
    err = capsys.readouterr().err
    assert f"adapter: {(out / 'adapter').resolve()} (trained with strategy anchored, 4 tokens a tile" in err, err
    assert "(anchored)" in err and "note:" not in err
    assert main([*ask, "--strategy", "geollava"]) == 0
    err = capsys.readouterr().err
    assert "note: this request asks for strategy geollava" in err and "(geollava)" in err, err


def test_the_adapter_weights_are_readable_as_the_umask_allows(tmp_path, tiny_checkpoint):
    """safetensors wrote adapter_model.safetensors with mode 0600 whatever the umask, while every
    other file of the run is 0644 (umask 022): an adapter copied to a shared drive or served by
    another account (`serve --adapter`) could not be read ('Permission denied')."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert run_finetune(_one_step(_bgrn_data(tmp_path), out, tiny_checkpoint)) == 0
    finally:
        os.umask(old)
    for folder in (out / "adapter", out / "checkpoint-1" / "adapter"):
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
        assert set(modes.values()) == {"0o644"}, modes


def test_the_final_message_says_how_to_use_the_adapter(tmp_path, tiny_checkpoint, capsys):
    """The run ended with 'Adapter written to OUT/adapter (...)': nothing said to pass it as
    `--adapter DIR` to ask / serve or in the QGIS plugin's Extra engine arguments, nor the final
    validation loss."""
    import shlex

    data = _write_data(tmp_path, n=6)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--val-fraction", "0.34")) == 0
    err = capsys.readouterr().err
    adapter = shlex.quote(str((out / "adapter").resolve()))
    assert "validation: 2 samples about 2 of 6 rasters, held out whole" in err
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert f"Final validation loss: {summary['final_val_loss']:.4f} (2 held-out samples)." in err
    assert f"python -m engine ask RASTER \"question\" --weights {shlex.quote(str(tiny_checkpoint.resolve()))} " \
           f"--adapter {adapter}\n" in err, err
    assert f"python -m engine serve --weights {shlex.quote(str(tiny_checkpoint.resolve()))} --adapter {adapter}\n" in err
    assert f"Settings > Options > GeoVQA > Extra engine arguments: --adapter {adapter}" in err
    assert "trained with strategy geollava, 4 tokens a tile" in err


def test_a_wrong_image_root_is_named_as_a_missing_folder(tmp_path, tiny_checkpoint):
    """A mistyped --image-root was reported as every sample's image being missing (or, with
    --on-bad-sample skip, as no valid sample); the folder itself is named, before anything loads."""
    data = _write_data(tmp_path, n=2)
    with pytest.raises(DataError, match=r"--image-root .*imgs does not exist"):
        run_finetune(_args(data, tmp_path / "run", tiny_checkpoint, "--image-root", str(tmp_path / "imgs")))
    with pytest.raises(DataError, match=r"--image-root .*train.json is not a folder"):
        run_finetune(_args(data, tmp_path / "run", tiny_checkpoint, "--image-root", str(data)))


def test_help_shows_the_training_defaults(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]  # past the usage line
    for option, default in (("--lr", "0.0002"), ("--epochs", "1.0"), ("--grad-accum", "4"), ("--lora-r", "16"),
                            ("--lora-alpha", "32"), ("--lora-dropout", "0.05"), ("--warmup-ratio", "0.03"),
                            ("--val-fraction", "0.05"), ("--save-every", "100"), ("--max-length", "32768"),
                            ("--keep-checkpoints", "3")):
        after = text.split(f"{option} {option.lstrip('-').replace('-', '_').upper()}", 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], (option, after[:200])


def test_an_adapters_bands_never_read_an_alpha_band_as_colour(tmp_path, tiny_checkpoint):
    """An adapter trained with --bands 4,3,2 (a BGRN stack) asked, without bands, about an RGBA
    raster (4 bands, the 4th alpha): only the band count was checked, so the alpha band was read
    as red. The engine's own choice never uses alpha: it is used, with a note."""
    import rasterio
    from rasterio.enums import ColorInterp

    from engine.pipeline import Engine

    data = _bgrn_data(tmp_path)
    out = tmp_path / "run"
    assert run_finetune(_one_step(data, out, tiny_checkpoint, "--bands", "4,3,2")) == 0
    rgba = np.random.default_rng(2).integers(0, 255, (4, 300, 300), dtype=np.uint8)
    rgba[3] = 255
    path = _geotiff(tmp_path / "rgba.tif", rgba)
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    eng = Engine(tiny_checkpoint, device="cpu", quantization="fp32", adapter=out / "adapter")
    assert eng.adapter_settings["bands"] == [4, 3, 2]
    events = _events(eng, raster_path=str(path))
    assert events[-1]["bands"] == [1, 2, 3], f"the model saw bands {events[-1]['bands']} (band 4 is alpha)"
    assert any("band 4 of this raster is its alpha" in (e.get("message") or "") for e in events)


def test_a_samples_own_system_turn_is_its_system_prompt(tiny_tokenizer):
    turns = [Turn("user", "<image>\nHow many ships?"), Turn("assistant", "Three")]
    own = encode_conversation(tiny_tokenizer, Sample(index=0, id="0", image=None, turns=turns,
                                                     system="You count ships."))
    assert "<|im_start|>system\nYou count ships.<|im_end|>" in tiny_tokenizer.decode(own.before)
    default = encode_conversation(tiny_tokenizer, Sample(index=0, id="0", image=None, turns=turns))
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in tiny_tokenizer.decode(default.before)
    given = encode_conversation(tiny_tokenizer, Sample(index=0, id="0", image=None, turns=turns,
                                                       system="You count ships."), system="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tiny_tokenizer.decode(given.before)


def test_the_visual_tokens_sit_between_the_prompt_and_the_answers_unlabelled(tiny_model, tiny_tokenizer):
    from engine.finetune_inputs import build_training_inputs

    s = Sample(index=0, id="0", image=None, turns=[Turn("user", "<image>\nHow many?"), Turn("assistant", "Three")])
    enc = encode_conversation(tiny_tokenizer, s)
    visual = torch.randn(7, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds, labels, mask = build_training_inputs(tiny_model, enc, visual)
    n_before = len(enc.before)
    assert embeds.shape[1] == labels.shape[1] == n_before + 7 + len(enc.after)
    assert torch.equal(embeds[0, n_before:n_before + 7], visual.to(embeds.dtype))
    assert labels[0, :n_before + 7].tolist() == [IGNORE] * (n_before + 7)
    assert labels[0, n_before + 7:].tolist() == enc.after_labels


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    from engine.finetune_checkpoints import checkpoint_dirs, latest_checkpoint, prune_checkpoints

    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}" / "adapter").mkdir(parents=True)
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint's name
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, 2)
    assert sorted(d.name for d in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-9", "checkpoint-x"]


def test_resume_with_lora_dropout_reproduces_an_uninterrupted_run(tmp_path, tiny_checkpoint):
    """LoRA dropout (0.05 by default) draws from torch's RNG at every step: a resume restores the
    checkpoint's RNG state, so steps 3-4 drop the same inputs as in the uninterrupted run."""
    import shutil

    data = _write_data(tmp_path, n=8)
    common = ("--max-steps", "4", "--save-every", "2", "--val-fraction", "0", "--lora-dropout", "0.3")
    full = tmp_path / "full"
    assert run_finetune(_args(data, full, tiny_checkpoint, *common)) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoint-4")
    shutil.rmtree(part / "adapter")
    assert run_finetune(_args(data, part, tiny_checkpoint, *common, "--resume")) == 0
    assert [r["loss"] for r in _log(full)] == [r["loss"] for r in _log(part)]


def test_a_checkpoint_of_other_lora_targets_is_refused_at_load(tmp_path, tiny_checkpoint):
    """Without the run record (finetune_args.json lost, or a run of an older version), the
    checkpoint itself tells that its LoRA layers are not this run's."""
    data = _write_data(tmp_path, n=4)
    out = tmp_path / "out"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "2",
                              "--val-fraction", "0")) == 0
    (out / "finetune_args.json").unlink()
    with pytest.raises(DataError, match="does not match this model/LoRA settings"):
        run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--save-every", "2",
                           "--val-fraction", "0", "--target-modules", "q_proj,v_proj", "--resume"))
