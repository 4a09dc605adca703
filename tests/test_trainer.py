"""The generic trainer: spec validation, early stopping, exact resume after a SIGKILL
mid-epoch, and two gloo processes under DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TINY_KWARGS
from pqk.errors import ConfigError
from pqk.models.dust3r import build_model
from pqk.train.losses import conf_regression_loss
from pqk.train.bookkeeping import _spec_key
from pqk.train.ema import WeightAverage
from pqk.train.trainer import TrainSpec, fit

TESTS = Path(__file__).resolve().parent


def _spec(**over) -> TrainSpec:
    base = dict(epochs=3, steps_per_epoch=4, batch_size=2, lr=1e-3, warmup_steps=2, width=64, height=48,
                n_scenes=2, views_per_scene=4, val_scenes=1, val_pairs=2, checkpoint_every=3, patience=None)
    return TrainSpec(**{**base, **over})


def _staged() -> TrainSpec:
    """Half the steps at 64x48 (batch 2), then 96x64 (batch 1), weights averaged: the students' recipe."""
    return _spec(resolution_schedule=[[0.5, 96, 64, 1]], ema_decay=0.9)


def task_loss(model, view1, view2, gt, progress):
    res1, res2 = model(view1, view2)
    return conf_regression_loss(res1, res2, gt)


def _tiny():
    torch.manual_seed(42)
    return build_model(**TINY_KWARGS)


def test_spec_rejects_bad_values_in_one_line():
    with pytest.raises(ConfigError, match="train.epochs = 0"):
        _spec(epochs=0)
    with pytest.raises(ConfigError, match="multiples of 16"):
        _spec(width=60)
    with pytest.raises(ConfigError, match="training seed range"):
        _spec(scene_seed_base=42)
    with pytest.raises(ConfigError, match="unknown train field 'epoch'"):
        TrainSpec.from_dict({"epoch": 3})
    for bad in ([[0.0, 96, 64, 1]], [[0.5, 100, 64, 1]], [[0.5, 96, 64]], [[0.7, 96, 64, 1], [0.5, 96, 64, 1]]):
        with pytest.raises(ConfigError, match="train.resolution_schedule"):
            _spec(resolution_schedule=bad)
    with pytest.raises(ConfigError, match="give both or neither"):
        _spec(val_width=96)
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ConfigError, match="train.ema_decay"):
            _spec(ema_decay=bad)
    scaled = TrainSpec(epochs=30, n_scenes=64).scaled(0.1)
    assert (scaled.epochs, scaled.n_scenes) == (3, 6)
    assert TrainSpec(epochs=30, n_scenes=64).scaled(2.0).n_scenes == 64


def test_early_stopping_and_outputs(tmp_path):
    # No gradient and no weight decay: validation never improves after epoch 1.
    def frozen(model, view1, view2, gt, progress):
        res1, _ = model(view1, view2)
        return res1["pts3d"].sum() * 0.0, {"loss": 0.0}

    result = fit(_tiny(), frozen, _spec(epochs=6, patience=2, weight_decay=0.0), tmp_path, show_progress=False, log=lambda _m: None)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1
    assert {p.name for p in tmp_path.iterdir()} >= {"best.pth", "last.pth", "train_log.json"}
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["stopped_early"] and len(log["history"]) == 3 and "val_absrel" in log["history"][0]
    # A finished run resumes to a no-op.
    again = fit(_tiny(), frozen, _spec(epochs=6, patience=2, weight_decay=0.0), tmp_path, show_progress=False, log=lambda _m: None)
    assert len(again.history) == 3 and again.best_epoch == 1
    with pytest.raises(ConfigError, match="another training spec"):
        fit(_tiny(), frozen, _spec(epochs=7, patience=2, weight_decay=0.0), tmp_path, show_progress=False, log=lambda _m: None)


def test_patience_counts_only_epochs_at_the_final_resolution(tmp_path):
    # Validation runs at the final resolution: epochs 2-3 (all at 64x48) must not count, or a
    # long run would stop before it ever trains at the size it is judged at.
    def frozen(model, view1, view2, gt, progress):
        res1, _ = model(view1, view2)
        return res1["pts3d"].sum() * 0.0, {"loss": 0.0}

    spec = _spec(epochs=6, patience=2, weight_decay=0.0, resolution_schedule=[[0.5, 96, 64, 1]])
    result = fit(_tiny(), frozen, spec, tmp_path, show_progress=False, log=lambda _m: None)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.stopped_early and result.best_epoch == 1


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
from pathlib import Path
from test_trainer import _staged, _tiny, task_loss
from pqk.train.trainer import fit

def die(step, logs):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

fit(_tiny(), task_loss, _staged(), Path({out!r}), show_progress=False, log=lambda _m: None, on_step=die)
"""


def test_progressive_resolution_switches_size_and_batch_and_validates_at_the_end_size(tmp_path):
    seen = []

    def recording(model, view1, view2, gt, progress):
        seen.append((tuple(view1["img"].shape), progress))
        return task_loss(model, view1, view2, gt, progress)

    spec = _staged()
    assert spec.val_size() == (96, 64) and _spec().val_size() == (64, 48)
    assert _spec(resolution_schedule=[[0.5, 96, 64, 1]], val_width=128, val_height=96).val_size() == (128, 96)
    fit(_tiny(), recording, spec, tmp_path, show_progress=False, log=lambda _m: None)
    # 12 steps: 0..5 at progress < 0.5, 6..11 from 0.5 on.
    assert [shape for shape, _ in seen] == [(2, 3, 48, 64)] * 6 + [(1, 3, 64, 96)] * 6
    from pqk.train.trainer import validation_examples

    assert {tuple(e["img1"].shape[-2:]) for e in validation_examples(spec)} == {(64, 96)}


def test_weight_average_follows_its_formula_and_swaps_back():
    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay ramps: min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.state["weight"], d * start + (1 - d) * (start + 1.0))
    live = model.weight.detach().clone()
    with ema.swapped_in(model) as averaged:
        assert torch.equal(averaged.weight, ema.state["weight"])
    assert torch.equal(model.weight, live)


def test_a_run_with_ema_validates_and_keeps_the_averaged_weights(tmp_path):
    result = fit(_tiny(), task_loss, _spec(epochs=1, ema_decay=0.9), tmp_path, show_progress=False, log=lambda _m: None)
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in last["ema"]["state"].items())
    assert any(not torch.equal(kept[k], v) for k, v in last["model"].items() if v.is_floating_point())
    # A last.pth written without EMA (as before the field existed) still resumes a run without it.
    assert "ema_decay" not in _spec_key(_spec()) and _spec_key(_spec(ema_decay=0.9))["ema_decay"] == 0.9


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    # The run switches resolution at step 6 (_staged): the resumed run must pick up both the
    # stage and the one random stream its samplers share.
    full = fit(_tiny(), task_loss, _staged(), tmp_path / "full", show_progress=False, log=lambda _m: None)

    # Killed at step 7: epoch 2 of 3 (4 steps each), one step after the mid-epoch checkpoint at 6.
    script = _KILLED_RUN.format(tests=str(TESTS), threads=torch.get_num_threads(), kill_at=7, out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert state["step"] == 6 and state["epoch_sums"]  # mid-epoch

    resumed = fit(_tiny(), task_loss, _staged(), tmp_path / "killed", show_progress=False, log=lambda _m: None)
    assert resumed.history == [{**h, "elapsed_s": r["elapsed_s"]} for h, r in zip(full.history, resumed.history)]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


# --- two processes, gloo -----------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, base: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{base}/store", rank=rank, world_size=world)
    try:
        model = _tiny()
        if rank == 1:  # DDP must broadcast rank 0's initial weights
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        spec = _spec(epochs=1, steps_per_epoch=2, checkpoint_every=1)
        result = fit(model, task_loss, spec, Path(base) / f"out{rank}", show_progress=False, log=lambda _m: None)
        torch.save(result.model.state_dict(), Path(base) / f"weights{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_hold_identical_weights_and_only_rank0_writes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    init = _tiny().state_dict()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # a step was taken
    assert {p.name for p in (tmp_path / "out0").iterdir()} >= {"best.pth", "last.pth", "train_log.json"}
    assert not (tmp_path / "out1").exists()
    log = json.loads((tmp_path / "out0" / "train_log.json").read_text())
    assert log["world_size"] == 2
