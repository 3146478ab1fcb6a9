"""Checkpoints: exact resume across processes, half-written checkpoints, pruning, refused resumes."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from _train_worker import build_store
from distill.checkpoint import (META_FILE, ResumeError, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                read_meta, set_rng_state)
from distill.model import CoMADDistiller
from distill.train import build_optimizer, build_scheduler, train
from store_schema.config import load_config

WORKER = Path(__file__).with_name("_train_worker.py")
REPO = WORKER.parent.parent
STEPS = 6  # 2 processes x 8 = 16 samples a step from a 40-sample store: epochs wrap at step 2, 4, 6
# Every multi-process run makes rank 1's targets NaN at step 5: the skip must be collective and replay
# identically after a resume (and it saves the launches a separate run would cost).
POISON = ("--poison", "1:5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}


def _launch(launcher: list[str], config: Path, run_dir: Path, *extra: str) -> str:
    cmd = launcher + [str(WORKER), str(config), "--set", f'train.run_dir="{run_dir}"', *extra]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out.stdout


def _torchrun(config: Path, run_dir: Path, *extra: str) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return _launch(launcher, config, run_dir, *extra)


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ bitwise in {different[:5]}"


def _accelerate_launch(config: Path, run_dir: Path, *extra: str) -> str:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    return _launch(launcher, config, run_dir, *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A store, its config, and an uninterrupted 2-process run of STEPS steps under `accelerate launch`
    (the resumed run below uses torchrun: one launch less, and both launchers must agree anyway)."""
    root = tmp_path_factory.mktemp("ckpt")
    build_store(root, [f"train.steps={STEPS}", "train.checkpoint_every=3", "optim.base_lr=0.05"])
    out = _accelerate_launch(root / "config.toml", root / "straight", *POISON)
    return root, out


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_runs_two_processes(straight):
    root, out = straight
    assert out.count(f"SUMMARY {STEPS} 2") == 2  # both processes trained to the end in a world of 2
    assert read_meta(latest_checkpoint(root / "straight"))["world_size"] == 2


@pytest.mark.slow
def test_stop_and_resume_in_new_processes_is_bitwise_identical(straight):
    straight = straight[0]
    cfg_path, run = straight / "config.toml", straight / "resumed"
    first = _torchrun(cfg_path, run, "--stop-after", "3", *POISON)
    assert first.count("PREEMPTED after step 3") == 2
    assert latest_checkpoint(run).name == "step_00000003"
    meta = read_meta(latest_checkpoint(run))
    assert (meta["step"], meta["world_size"], meta["num_workers"]) == (3, 2, 0)
    second = _torchrun(cfg_path, run, "--resume", *POISON)
    assert second.count("SUMMARY 6 2") == 2
    ref = _weights(straight / "straight", STEPS)
    _assert_identical(ref, _weights(run, STEPS))
    # the checkpoint before the stop equals the straight run's at the same step, too
    _assert_identical(_weights(straight / "straight", 3), _weights(run, 3))
    opt_a, opt_b = (torch.load(r / "checkpoints" / f"step_{STEPS:08d}" / "optimizer.pt", weights_only=True)
                    for r in (straight / "straight", run))
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), f"optimizer state {i}.{k} differs"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # rows of the interrupted attempt past step 3 would have been dropped


@pytest.mark.slow
def test_resume_refuses_another_world_size_workers_or_config(straight, tmp_path):
    straight, run = straight[0], tmp_path / "run"
    shutil.copytree(straight / "straight", run)
    base = load_config(straight / "config.toml", [f'train.run_dir="{run}"'])
    with pytest.raises(ResumeError, match="written by 2 process"):
        train(base, resume=True)  # this test process is a single process
    cfg_path = straight / "config.toml"
    with pytest.raises(ResumeError, match="gate.variant: checkpoint has 'joint', this config has 'mean'"):
        train(load_config(cfg_path, [f'train.run_dir="{run}"', "gate.variant=mean"]), resume=True)
    with pytest.raises(ResumeError, match="train.num_workers = 0, this run has 1"):
        train(load_config(cfg_path, [f'train.run_dir="{run}"', "train.num_workers=1"]), resume=True)


@pytest.mark.slow
def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(straight):
    """Rank 1 alone saw NaN targets at step 5: both ranks skipped it (a rank entering backward's
    all-reduce alone would hang the run), and training went on to the end."""
    root, out = straight
    rows = [json.loads(x) for x in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(2, 0), (4, 0), (6, 1)]
    assert out.count("update skipped on every rank") == 1  # reported once, by the main process


def _fake_checkpoint(run: Path, step: int, complete: bool) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"")
    if complete:
        (d / META_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_ignores_half_written_and_prune_keeps_newest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 4):
        _fake_checkpoint(tmp_path, step, complete=True)
    _fake_checkpoint(tmp_path, 12, complete=False)  # killed while saving: no meta.json
    (tmp_path / "checkpoints" / ".tmp_step_00000014").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000010"  # by step number, not by name or mtime
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step_00000002"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == [".tmp_step_00000014", "step_00000004", "step_00000010", "step_00000012"]


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    build_store(tmp_path, ["train.steps=2", "train.checkpoint_every=2"])
    cfg = load_config(tmp_path / "config.toml", [f'train.run_dir="{tmp_path}/run"'])
    train(cfg)
    ckpt = latest_checkpoint(tmp_path / "run")
    set_rng_state(torch.load(ckpt / "rng_rank0.pt", weights_only=True))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # what the saved streams give next
    model = CoMADDistiller(cfg, {t: 32 for t in cfg.teachers})  # fresh weights
    optimizer = build_optimizer(model, cfg, 1)
    scheduler = build_scheduler(optimizer, cfg, 1)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert load_checkpoint(ckpt, model, optimizer, scheduler, rank=0) == 2
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    saved = safetensors.torch.load_file(ckpt / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert scheduler.last_epoch == 2 and len(optimizer.state) > 0


def test_resume_refuses_a_store_that_changed(tmp_path):
    from store_fixtures import write_unit
    from store_schema.store import FeatureStore
    build_store(tmp_path, ["train.checkpoint_every=2"])
    cfg = load_config(tmp_path / "config.toml", [f'train.run_dir="{tmp_path}/run"', "train.steps=4"])
    import distill.train as train_mod
    real_save = train_mod.save_checkpoint

    def stop_after_first(*args):
        real_save(*args)
        raise KeyboardInterrupt  # preempted right after the step-2 checkpoint
    train_mod.save_checkpoint = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        train_mod.save_checkpoint = real_save
    assert read_meta(latest_checkpoint(tmp_path / "run"))["data"]["store_samples"] == 40
    store = FeatureStore.open(cfg.store.root, mode="r+")
    write_unit(store, cfg, "data/c.tar", 8, seed=5)  # the store grew: epochs are no longer the same
    with pytest.raises(ResumeError, match="training data changed"):
        train(cfg, resume=True)
