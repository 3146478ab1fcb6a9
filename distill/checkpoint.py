"""Step-based training checkpoints that are either complete or invisible.

Layout: run_dir/checkpoints/step_{step:08d}/ holding
    model.safetensors        unwrapped CoMADDistiller state dict (student.* is the exportable ViT)
    optimizer.pt, scheduler.pt   torch.save'd state dicts, read back with weights_only=True
    rng_rank{r}.pt           torch / numpy / python (/ cuda) generator states of rank r
    meta.json                step, world_size, num_workers, the config fields a resume must keep

Write protocol: every rank writes into run_dir/checkpoints/.tmp_step_*; a barrier; rank 0 checks all
files are there, writes meta.json LAST and renames the directory into place. A directory without
meta.json (a run killed while saving) is never picked. Ranks share run_dir (one machine, or a shared
file system across machines).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from store_schema.config import PipelineConfig, config_to_dict
from store_schema.faults import fault_point
from store_schema.fingerprint import flatten

META_FILE, MODEL_FILE = "meta.json", "model.safetensors"
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"
PREFIX, TMP_PREFIX = "step_", ".tmp_step_"

# Config fields whose change alters the training trajectory; the others (paths, logging, checkpoint
# cadence, evaluation, extraction-only settings) may change between a run and its resume.
RESUME_FIELDS = ("seed", "data.image_size", "data.patch_size", "masks.", "teachers.", "student.", "heads.",
                 "gate.", "loss.", "optim.", "train.batch_size", "train.steps", "train.shuffle_window",
                 "train.mixed_precision", "train.targets")


class ResumeError(RuntimeError):
    """A run cannot continue from its checkpoint; the message says why and what to do."""


def resume_fields(cfg: PipelineConfig) -> dict[str, Any]:
    flat = flatten(config_to_dict(cfg))
    return {k: v for k, v in sorted(flat.items()) if any(k == f or k.startswith(f) for f in RESUME_FIELDS)}


def config_hash(cfg: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(resume_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / META_FILE).read_text())


# ---------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """Every generator's state in types torch.load(weights_only=True) accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- save

def save_checkpoint(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                    cfg: PipelineConfig, num_workers: int, data: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it at the same step. `data` identifies the training data (the
    store's complete units), which a resume must find unchanged. Returns the final checkpoint path."""
    root = checkpoint_root(cfg.train.run_dir)
    tmp, final = root / f"{TMP_PREFIX}{step:08d}", root / f"{PREFIX}{step:08d}"
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / MODEL_FILE)
        fault_point("checkpoint_write")  # reliability tests: a kill with the checkpoint half-written
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)  # DDP: every rank holds the same state
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        expected = [MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE] + [f"rng_rank{r}.pt" for r in range(world)]
        missing = [f for f in expected if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} lacks {missing} after every rank saved: is run_dir on a file "
                               "system all processes share?")
        meta = {"step": step, "world_size": world, "num_workers": num_workers, "config_hash": config_hash(cfg),
                "config": resume_fields(cfg), "data": data, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _fsync_files(tmp)
        _write_durable(tmp / META_FILE, json.dumps(meta, indent=1))
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(cfg.train.run_dir, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints; returns the deleted paths."""
    old = complete_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories; the rename itself is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- load

def check_resumable(ckpt: Path, cfg: PipelineConfig, world_size: int, num_workers: int,
                    data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse a resume whose data order or trajectory would differ from the checkpointed run."""
    meta = read_meta(ckpt)
    problems = []
    if meta.get("data") != data:
        problems.append(f"the training data changed: the checkpoint was trained on {meta.get('data')}, "
                        f"now it is {data}")
    if meta["world_size"] != world_size:
        problems.append(f"it was written by {meta['world_size']} process(es), this run has {world_size}")
    if meta["num_workers"] != num_workers:
        problems.append(f"it was written with train.num_workers = {meta['num_workers']}, this run has {num_workers}")
    if meta["config_hash"] != config_hash(cfg):
        ours = resume_fields(cfg)
        theirs = meta.get("config", {})
        for k in sorted(set(ours) | set(theirs)):
            if ours.get(k, "<absent>") != theirs.get(k, "<absent>"):
                problems.append(f"{k}: checkpoint has {theirs.get(k, '<absent>')!r}, this config has "
                                f"{ours.get(k, '<absent>')!r}")
    if problems:
        raise ResumeError(f"cannot resume from {ckpt}: the data order and training trajectory depend on what "
                          "changed:\n  - " + "\n  - ".join(problems)
                          + "\nResume with the original settings, or start a new run (another train.run_dir).")
    return meta


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int) -> int:
    """Restore model (unwrapped), optimizer, scheduler and this rank's RNG; returns the step."""
    model.load_state_dict(_read_checkpoint_file(ckpt, MODEL_FILE), strict=True)
    optimizer.load_state_dict(_read_checkpoint_file(ckpt, OPTIMIZER_FILE))
    scheduler.load_state_dict(_read_checkpoint_file(ckpt, SCHEDULER_FILE))
    set_rng_state(_read_checkpoint_file(ckpt, f"rng_rank{rank}.pt"))
    return int(read_meta(ckpt)["step"])


def _read_checkpoint_file(ckpt: Path, name: str) -> Any:
    """safetensors, or torch.load(weights_only=True): a file that needs code to unpickle is refused
    unexecuted, with a ResumeError naming it (torch's own message names neither file nor remedy)."""
    path = ckpt / name
    try:
        if name.endswith(".safetensors"):
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = f"it holds pickled Python objects that torch.load(weights_only=True) refuses to execute ({_detail(e)})"
    except FileNotFoundError:
        why = "it is missing"
    except Exception as e:  # safetensors' header errors, torch's "failed finding central directory", ...
        why = f"it is not a readable {'safetensors' if name.endswith('.safetensors') else 'torch'} file ({_detail(e)})"
    raise ResumeError(f"refusing to resume from {path}: {why}. The trainer did not leave it so: it was removed, "
                      f"replaced or damaged. Move {ckpt} out of checkpoints/ to resume from the previous "
                      "checkpoint, or start a new run (another train.run_dir)")


def _detail(e: Exception) -> str:
    """The global a refused pickle would call (torch's message buries it under advice to allow it), or
    the error's first line."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused:
        return f"it would call {refused.group(1)}"
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
