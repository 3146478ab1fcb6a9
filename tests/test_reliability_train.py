"""Training survives hard kills bit for bit, and nothing stage 2 loads can run code hidden in a pickle.

Kill tests drive the CLI as a user does (`python -m distill train --config ... --set ...` in a subprocess)
with COMAD_FAULT=<point>:<n> (store_schema/faults.py: SIGKILL at the n-th hit), then run the same command
with --resume. The final model.safetensors must equal an uninterrupted run's byte for byte. Tiny store
(tests/_train_worker.build_store: 40 samples, 8 a batch), STEPS steps, a checkpoint every EVERY steps.

Refusal tests plant a pickle whose unpickling runs code (it would create a marker file) where the trainer,
`comad-distill eval` / `export` and the teacher loader read weights; each must refuse it by name, exit 2
without a traceback, and leave no marker.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from _train_worker import build_store

from distill.checkpoint import latest_checkpoint
from distill.cli import main as distill_cli
from distill.export import export_student, resolve_checkpoint_dir
from store_schema.config import load_config
from vit_layers.checkpoints import load_teacher

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2  # checkpoints at steps 2, 4, 6 (keep_checkpoints = 3 keeps them all)


def run(args: list[str], fault: str | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMAD_FAULT"}
    env["OMP_NUM_THREADS"] = "1"  # a shared 2-core machine; the same thread count keeps kernels bitwise equal
    if fault:
        env["COMAD_FAULT"] = fault
    cmd = (launcher or [sys.executable]) + ["-m", "distill", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def train_args(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--set", f'train.run_dir="{run_dir}"', *extra]


def torchrun() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, (f"{' '.join(out.args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                                 f"{out.stderr[-4000:]}")
    return out


def checkpoint_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same_weights(run_a: Path, run_b: Path, step: int) -> None:
    a, b = (r / "checkpoints" / f"step_{step:08d}" / "model.safetensors" for r in (run_a, run_b))
    if a.read_bytes() != b.read_bytes():
        wa, wb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
        differ = sorted(k for k in wa.keys() | wb.keys() if k not in wa or k not in wb or not torch.equal(wa[k], wb[k]))
        pytest.fail(f"step {step}: {a} and {b} differ (tensors {differ[:5]} of {len(differ)})")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> SimpleNamespace:
    """The store, its config file, and an uninterrupted single-process run of STEPS steps."""
    root = tmp_path_factory.mktemp("reliability_train")
    build_store(root, [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}"])
    config = root / "config.toml"
    ok(run(train_args(config, root / "straight")))
    return SimpleNamespace(root=root, config=config, run=root / "straight")


# ---------------------------------------------------------------------------------------------- kills

def test_killed_mid_step_resumes_bitwise_identical(straight, tmp_path):
    run_dir = tmp_path / "run"
    killed = run(train_args(straight.config, run_dir), fault="train_step:5")  # steps 2 and 4 are saved
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_steps(run_dir) == ["step_00000002", "step_00000004"]
    resumed = ok(run(train_args(straight.config, run_dir, "--resume")))
    assert f"from step_00000004 (step 4 of {STEPS})" in resumed.stdout
    assert_same_weights(straight.run, run_dir, STEPS)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # the killed attempt's rows are not duplicated


def test_killed_mid_checkpoint_write_never_uses_the_half_written_one(straight, tmp_path):
    run_dir = tmp_path / "run"
    killed = run(train_args(straight.config, run_dir), fault="checkpoint_write:2")  # while saving step 4
    assert killed.returncode == -9, killed.stderr[-3000:]
    half = run_dir / "checkpoints" / ".tmp_step_00000004"
    assert checkpoint_steps(run_dir) == [".tmp_step_00000004", "step_00000002"]
    assert (half / "model.safetensors").is_file() and not (half / "meta.json").exists()
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert resolve_checkpoint_dir(run_dir).name == "step_00000002"  # what eval and export would read
    resumed = ok(run(train_args(straight.config, run_dir, "--resume")))
    assert "from step_00000002 (step 2 of" in resumed.stdout
    # the leftover temp dir was replaced by a complete step 4, equal to the uninterrupted run's
    assert checkpoint_steps(run_dir) == ["step_00000002", "step_00000004", "step_00000006"]
    assert_same_weights(straight.run, run_dir, 4)
    assert_same_weights(straight.run, run_dir, STEPS)


def test_two_processes_killed_mid_step_resume_bitwise_identical(straight, tmp_path):
    ref, run_dir = tmp_path / "straight2", tmp_path / "run2"
    ok(run(train_args(straight.config, ref), launcher=torchrun()))
    killed = run(train_args(straight.config, run_dir), fault="train_step:3", launcher=torchrun())
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert checkpoint_steps(run_dir) == ["step_00000002"]
    ok(run(train_args(straight.config, run_dir, "--resume"), launcher=torchrun()))
    assert_same_weights(ref, run_dir, STEPS)


# ---------------------------------------------------------------------------------------------- pickled code

class CodeOnUnpickle:
    """Unpickling it calls exec, which creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant_code(path: Path, marker: Path) -> None:
    """Replace `path` with a torch.save'd dict that looks like a state dict and carries the payload."""
    path.unlink(missing_ok=True)
    torch.save({"state": {}, "param_groups": [], "payload": CodeOnUnpickle(marker)}, path)


def assert_refused(code: int, err: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), f"loading {path} ran the code in it"
    assert code == 2, err
    assert str(path) in err, f"the error does not name {path}:\n{err}"
    assert "Traceback" not in err


def test_the_planted_pickle_does_run_code_when_loaded_unsafely(tmp_path):
    """The refusal tests below mean something only if the payload is live."""
    plant_code(tmp_path / "x.pt", tmp_path / "marker")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_rank0.pt", "model.safetensors"])
def test_resume_refuses_a_checkpoint_file_with_pickled_code(straight, tmp_path, capsys, name):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(straight.run, run_dir)
    planted = run_dir / "checkpoints" / f"step_{STEPS:08d}" / name
    plant_code(planted, marker)
    if name == "optimizer.pt":  # once through the real entry point, in its own process
        out = run(train_args(straight.config, run_dir, "--resume"))
        code, err = out.returncode, out.stderr
    else:
        code = distill_cli(train_args(straight.config, run_dir, "--resume"))
        err = capsys.readouterr().err
    assert_refused(code, err, planted, marker)


def test_eval_and_export_refuse_student_weights_with_pickled_code(straight, tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(straight.run, run_dir)
    good_export = export_student(load_config(straight.config), run_dir, tmp_path / "export")
    planted = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"
    plant_code(planted, marker)
    commands = [["eval", "--checkpoint", str(run_dir)],
                ["export", "--config", str(straight.config), "--checkpoint", str(run_dir),
                 "--out", str(tmp_path / "x")]]
    for argv in commands:
        assert_refused(distill_cli(argv), capsys.readouterr().err, planted, marker)
    assert not (tmp_path / "x" / "model.safetensors").exists()
    planted = good_export / "model.safetensors"
    plant_code(planted, marker)
    code = distill_cli(["eval", "--config", str(straight.config), "--export", str(good_export)])
    assert_refused(code, capsys.readouterr().err, planted, marker)


def test_teacher_checkpoint_with_pickled_code_is_refused(straight, tmp_path, capsys):
    cfg, marker = load_config(straight.config), tmp_path / "marker"
    planted = Path(cfg.teachers["mae"].weights)  # format "state_dict", a .pth file: read by torch.load
    planted.parent.mkdir(parents=True, exist_ok=True)
    plant_code(planted, marker)
    with pytest.raises(ValueError, match="refusing to load") as e:
        load_teacher(cfg.teachers["mae"], cfg.data.image_size, cfg.data.patch_size)
    assert str(planted) in str(e.value) and not marker.exists()
    code = distill_cli(["eval", "--config", str(straight.config), "--teacher", "mae"])
    assert_refused(code, capsys.readouterr().err, planted, marker)


# ---------------------------------------------------------------------------------------------- config vs store

def test_train_refuses_a_config_that_does_not_match_the_store(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = distill_cli(train_args(straight.config, run_dir, "--set", "data.image_size=48",
                                  "--set", "masks.nested=true"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "image_size: store has 32, expected 48" in err and "nested: store has False, expected True" in err
    assert not run_dir.exists()  # refused before anything was written
