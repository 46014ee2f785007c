"""Nothing lost when training stops early: Ctrl-C or a failing sample saves the last finished step
(resuming from it reproduces the uninterrupted run), and a sample that runs out of memory (visual
path, forward or backward pass) is skipped and reported, or stops the run with its progress kept."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import engine.finetune_loop
from engine.data import DataError
from engine.finetune import run_finetune
from engine.finetune_inputs import default_visual_fn
from test_finetune import _args, _log, _write_data

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


def _counting_factory(on_call: dict, calls: list):
    """A visual-token factory (default path) that raises on_call[n] at its n-th call."""

    def factory(model, **kw):
        fn = default_visual_fn(model, **kw)

        def wrapped(sample):
            calls.append(sample.index)
            exc = on_call.get(len(calls))
            if exc is not None:
                raise exc
            return fn(sample)

        return wrapped

    return factory


def _report(out):
    path = out / "bad_samples.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture(scope="module")
def uninterrupted(data, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0",
                              "--val-fraction", "0")) == 0
    return out


def test_ctrl_c_saves_the_last_finished_step_and_resume_matches(data, tiny_checkpoint, uninterrupted,
                                                                tmp_path, capsys):
    out = tmp_path / "part"
    calls: list[int] = []
    args = _args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0", "--val-fraction", "0")
    with pytest.raises(KeyboardInterrupt):  # 2 samples a step: the 9th call is step 5's first
        run_finetune(args, visual_fn_factory=_counting_factory({9: KeyboardInterrupt()}, calls))
    assert "interrupted after step 4: saved" in capsys.readouterr().err
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [r["step"] for r in _log(out)] == ["1", "2", "3", "4"]

    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0",
                              "--val-fraction", "0", "--resume")) == 0
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(uninterrupted)]
    a, b = _adapter(uninterrupted / "adapter"), _adapter(out / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_out_of_memory_stops_with_its_progress_saved(data, tiny_checkpoint, tmp_path):
    out = tmp_path / "stop"
    calls: list[int] = []
    args = _args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0", "--val-fraction", "0")
    with pytest.raises(DataError) as exc:
        run_finetune(args, visual_fn_factory=_counting_factory({5: torch.OutOfMemoryError(OOM)}, calls))
    msg = str(exc.value)
    assert f"sample {calls[4]} " in msg and "ran out of memory while building its visual tokens" in msg
    assert "--on-bad-sample skip" in msg and "checkpoint-2" in msg and "--resume" in msg
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_out_of_memory_samples_are_skipped_and_reported(data, tiny_checkpoint, tmp_path, monkeypatch):
    """One sample fails in its visual path, one in the forward pass, one in backward (whose
    partial gradients are dropped); training still makes its steps and each is reported."""
    real_loss = engine.finetune_loop.answer_loss
    n_loss = {"calls": 0}

    class BackwardOom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError(OOM)

    def answer_loss(*a, **k):
        n_loss["calls"] += 1
        if n_loss["calls"] == 3:
            raise torch.OutOfMemoryError(OOM)
        loss = real_loss(*a, **k)
        return BackwardOom.apply(loss) if n_loss["calls"] == 6 else loss

    monkeypatch.setattr(engine.finetune_loop, "answer_loss", answer_loss)  # the name train() calls
    out = tmp_path / "skip"
    calls: list[int] = []
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "4", "--save-every", "2",
                              "--val-fraction", "0", "--on-bad-sample", "skip"),
                        visual_fn_factory=_counting_factory({1: torch.OutOfMemoryError(OOM)}, calls)) == 0
    report = {r["index"]: r for r in _report(out)}
    assert {r["reason"] for r in report.values()} == {"out_of_memory"} and len(report) == 3
    assert "while building its visual tokens" in report[calls[0]]["message"]
    messages = sorted(r["message"] for r in report.values())
    assert any("in the forward pass at" in m for m in messages)
    assert any("in the backward pass at" in m for m in messages)
    assert [r["step"] for r in _log(out)] == ["1", "2", "3", "4"]
    assert all(float(r["loss"]) > 0 for r in _log(out))

    # a resumed run keeps the report (once) and does not train on those samples again
    monkeypatch.setattr(engine.finetune_loop, "answer_loss", real_loss)
    seen: list[int] = []
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "2",
                              "--val-fraction", "0", "--on-bad-sample", "skip", "--resume"),
                        visual_fn_factory=_counting_factory({}, seen)) == 0
    assert {r["index"] for r in _report(out)} == set(report) and len(_report(out)) == 3
    assert not set(seen) & set(report)


def test_ctrl_c_waits_for_the_end_of_an_optimizer_update():
    """An interruption never lands between an optimizer update and the record of its step."""
    import os
    import signal
    import time

    from engine.finetune_checkpoints import ctrl_c_deferred

    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, where the deferral is a no-op
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached.append("end of block")
        assert reached == ["end of block"]
        assert signal.getsignal(signal.SIGINT) is before
        with ctrl_c_deferred():  # nothing caught: nothing raised
            reached.append("quiet")
        assert reached[-1] == "quiet"
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_during_validation_keeps_the_step_in_the_log(data, tiny_checkpoint, tmp_path, capsys):
    """The step whose validation is interrupted is saved as a checkpoint and has its log row
    (val_loss empty), so after --resume the log holds every step once; elapsed_s goes on from
    the resumed step instead of starting at 0 again."""
    out = tmp_path / "val"
    calls: list[int] = []
    args = _args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0", "--eval-every", "5")
    # 7 training samples, 1 for validation, 2 a step: calls 1-10 are steps 1-5, call 11 validates
    with pytest.raises(KeyboardInterrupt):
        run_finetune(args, visual_fn_factory=_counting_factory({11: KeyboardInterrupt()}, calls))
    assert "interrupted after step 5: saved" in capsys.readouterr().err
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-5"]
    rows = _log(out)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"] and rows[-1]["val_loss"] == ""

    before = float(rows[-1]["elapsed_s"])
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "6", "--save-every", "0",
                              "--eval-every", "5", "--resume")) == 0
    rows = _log(out)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[-1]["val_loss"] != ""  # the last step validates
    assert float(rows[-1]["elapsed_s"]) >= before
