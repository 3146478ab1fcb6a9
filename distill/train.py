"""Stage 2: train the student from the teacher-feature store (or from live teachers).

One plain process, `torchrun --nproc_per_node N -m distill train ...` and `accelerate launch` all run
the same code. The DataLoader is deliberately not `accelerator.prepare`d: StoreBatches already
shards by (rank, world_size), and accelerate would shard it again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import Tensor, nn
from tqdm import tqdm

from distill.batch import StudentBatch
from distill.checkpoint import (
    ResumeError,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from distill.collapse import CollapseGuard
from distill.compact import check_compact_training, install_compact_maps
from distill.model import CoMADDistiller
from distill.online import LiveTeachers, online_loader
from distill.store_dataset import StoreBatches, check_store_matches, dequantize_targets, make_loader
from distill.tracking import finish_trackers, start_trackers
from store_schema.collective import gather_objects as _all_gather
from store_schema.config import ConfigError, PipelineConfig, dumps_toml
from store_schema.faults import fault_point
from store_schema.joint_stats import read_joint_stats
from store_schema.storage import check_reachable
from store_schema.store import UnitInfo


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


# ---------------------------------------------------------------------------------------------- recipe

def peak_lr(cfg: PipelineConfig, world_size: int) -> float:
    """Linear scaling rule: base_lr · global batch / lr_reference_batch."""
    return cfg.optim.base_lr * cfg.train.batch_size * world_size / cfg.optim.lr_reference_batch


def learning_rate(cfg: PipelineConfig, world_size: int, step: int) -> float:
    """lr of 0-based step `step`: linear warm-up to the peak over warmup_steps (step warmup-1 is at
    the peak), then a half cosine from the peak at step warmup_steps to min_lr at the last step.

    Not timm's CosineLRScheduler: its warm-up starts at warmup_lr_init and reaches the peak one step
    later (at warmup_t, where its cosine starts), so the same settings give another lr on every warm-up
    step; runs and checkpoints made with this schedule would not resume identically under it."""
    peak, o, total = peak_lr(cfg, world_size), cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps))
    return o.min_lr + (peak - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: PipelineConfig, world_size: int) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms, positions and tokens.

    timm's param_groups_weight_decay picks the same parameters, but orders the groups (no-decay, decay)
    and merges them into one when weight_decay = 0; optimizer state is matched to groups by position,
    so checkpoints written with this layout (decay first, always two groups) would not resume under it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen adapters and the fixed sin-cos pos_embed
        skip = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "mask_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg, world_size), betas=tuple(cfg.optim.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: PipelineConfig,
                    world_size: int) -> torch.optim.lr_scheduler.LambdaLR:
    peak = peak_lr(cfg, world_size)

    def factor(step: int) -> float:  # a plain function: LambdaLR then keeps it out of its state dict
        return learning_rate(cfg, world_size, step) / peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mixed_precision(cfg: PipelineConfig) -> str:
    if cfg.train.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.train.mixed_precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------- one step

def train_step(model: nn.Module, batch: StudentBatch, optimizer: torch.optim.Optimizer, scheduler: Any,
               accelerator: Accelerator, grad_clip: float) -> tuple[dict[str, Tensor], bool]:
    """Forward, backward, clip, update. Returns (metrics, applied); a non-finite loss or gradient norm
    on ANY rank skips the update on every rank (a DDP collective must never be half-entered)."""
    with accelerator.autocast():
        loss, metrics = model(batch)
    applied = _all_finite(loss, accelerator)
    if applied:
        accelerator.backward(loss)
        fault_point("train_step")  # reliability tests: a kill between backward and the update
        # Gradients are all-reduced by now, so every rank sees the same norm and decides alike.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        metrics["grad_norm"] = grad_norm.detach().float()
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()  # also on a skipped step: the lr is a function of the step index
    return metrics, applied


def _all_finite(loss: Tensor, accelerator: Accelerator) -> bool:
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return accelerator.reduce(bad, reduction="sum").item() == 0


# ---------------------------------------------------------------------------------------------- data

def make_batches(run: Run, start_step: int) -> Iterator[StudentBatch]:
    """This rank's batches from global step `start_step` on (endless; order fixed by rank, world, workers),
    from the store and units that set_up checked and found equal on every rank."""
    cfg = run.cfg
    if cfg.train.targets == "online":
        return iter(online_loader(cfg, run.rank, run.world, start_step))
    # int8 stores: targets travel as int8 + scale and are decoded on the device (dequantize_targets below).
    dataset = StoreBatches(cfg, run.rank, run.world, start_step, storage_options=cfg.store.storage_options or None,
                           int8_targets=True, store=run.store, units=run.units)
    return iter(make_loader(dataset, cfg.train.num_workers))


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors (and numpy arrays) of a nested batch to `device`; other leaves (sample keys) as they are."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x


def needs_statistics(cfg: PipelineConfig) -> bool:
    return cfg.heads.adapter_init in ("pca", "cca") or cfg.loss.standardize_targets or cfg.gate.prior != "none"


def open_store(cfg: PipelineConfig):
    """The checked FeatureStore, or None when online targets need no statistics from it."""
    if cfg.train.targets == "online" and not needs_statistics(cfg):
        return None
    try:
        check_reachable(cfg.store.root, cfg.store.storage_options, "store.storage_options")  # one line, not "no store"
        return check_store_matches(cfg, cfg.store.storage_options or None)
    except Exception as e:
        if cfg.train.targets != "online":
            raise
        raise ConfigError(f"online targets with heads.adapter_init = \"pca\" or \"cca\", loss.standardize_targets or "
                          f"gate.prior = \"rankme\" need the store's teacher statistics, but the store cannot be used: "
                          f"{e}\nSet heads.adapter_init = \"random\", loss.standardize_targets = false and gate.prior = "
                          "\"none\", or extract a store first") from e


def target_statistics(cfg: PipelineConfig, store) -> tuple[dict | None, tuple | None]:
    """(each teacher's statistics or None, (joint statistics, widths) or None) for the adapters' init."""
    if store is None or not needs_statistics(cfg):
        return None, None
    stats = {t: store.teacher_stats(t) for t in cfg.distill_teachers}
    if cfg.heads.adapter_init != "cca":
        return stats, None
    joint, dims, rec = read_joint_stats(store, cfg.distill_teachers)
    if rec.get("units_digest") != store.units_digest()[1]:
        warnings.warn(f"{store.root}: the cross-teacher statistics ({rec['samples']} samples) were computed before "
                      "the store last changed; they still give a valid basis, `comad-store joint-stats "
                      f"{store.root}` refreshes them")
    return stats, (joint, dims)


def data_identity(cfg: PipelineConfig, units: list[UnitInfo] | None) -> dict[str, Any]:
    """What the data order depends on beyond the config: the store's complete units (a store extended
    since the checkpoint gives other epochs), or the online input list."""
    if cfg.train.targets == "online":
        return {"online_urls_sha1": hashlib.sha1(json.dumps(cfg.data.urls).encode()).hexdigest()[:16]}
    if units is None:
        raise ValueError("store targets need the store's unit list")
    units = [(u.name, u.n_samples, list(u.excluded_rows)) for u in units]
    return {"store_units": len(units), "store_samples": sum(n - len(x) for _, n, x in units),
            "store_units_sha1": hashlib.sha1(json.dumps(units).encode()).hexdigest()[:16]}


# ---------------------------------------------------------------------------------------------- logging

class MetricLog:
    """Sums metrics over a log window; writes the cross-rank means to metrics.jsonl and to the accelerator's
    trackers (train.trackers, TensorBoard by default; distill/tracking.py)."""

    def __init__(self, run_dir: Path, start_step: int, main: bool) -> None:
        self.path, self.main = run_dir / "metrics.jsonl", main
        self.sums: dict[str, Tensor] = {}
        self.applied = self.skipped = 0
        self.t0 = time.perf_counter()
        if main:
            _truncate_jsonl(self.path, start_step)

    def add(self, metrics: dict[str, Tensor], applied: bool) -> None:
        if not applied:
            self.skipped += 1
            return
        self.applied += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float().clone()

    def flush(self, step: int, lr: float, images: int, accelerator: Accelerator) -> dict[str, Any]:
        """Collective: the window's means over steps and ranks (None for a window of skipped steps)."""
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys]) if keys else torch.zeros(0, device=accelerator.device)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
        ranks = accelerator.num_processes
        elapsed = time.perf_counter() - self.t0
        row: dict[str, Any] = {"step": step, "lr": lr, "img_per_s": images * ranks / max(elapsed, 1e-9),
                               "skipped_steps": self.skipped}
        if self.applied:  # every rank applied the same steps: the skip decision is collective
            row.update({k: float(v) / (self.applied * ranks) for k, v in zip(keys, total)})
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.sums, self.applied, self.skipped, self.t0 = {}, 0, 0, time.perf_counter()
        return row


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep rows up to the resume step: later ones belong to the interrupted attempt."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= start_step))


# ---------------------------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """What a run fixes before any weights exist: the processes, the data and the checkpoint to resume.
    Every check that can refuse the run cheaply (wrong launch, store changing, bad resume) happens here,
    before the model and the teachers are built."""
    cfg: PipelineConfig
    accelerator: Accelerator
    rank: int
    world: int
    main: bool
    run_dir: Path
    store: Any  # the checked FeatureStore, or None (online targets needing no statistics)
    units: list[UnitInfo] | None  # the store's complete units, the same on every rank (None: online targets)
    data: dict[str, Any]  # data_identity: what a resume must find unchanged
    ckpt: Path | None  # the checkpoint to resume from


def make_accelerator(cfg: PipelineConfig) -> Accelerator:
    """This process's Accelerator, refusing a launch accelerate did not join into one process group."""
    tr = cfg.train
    # A term with weight 0 or a target-side adapter receives no gradient; DDP must then be told.
    unused = cfg.loss.token_weight == 0 or cfg.loss.map_weight == 0 or cfg.heads.adapter_trainable
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    # accelerate keeps one process-wide state and refuses a second run (a sweep variant) with another
    # precision; clearing it keeps the process group (PartialState) and lets each run choose its own.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without cpu=True accelerate ignores a CPU-only multi-process launch and every process trains alone.
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=launched > 1 and not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
                              log_with=list(tr.trackers) or None, project_dir=tr.run_dir)
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
                           "they would train independently into the same run_dir; check the launcher and "
                           "torch.distributed setup")
    return accelerator


def set_up(cfg: PipelineConfig, resume: bool) -> Run:
    """The accelerator, the checked store and its identity (the same on every rank), and the checkpoint
    to resume from, refused unless `resume` is set and the run can continue from it unchanged."""
    accelerator = make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir = Path(cfg.train.run_dir)
    store = open_store(cfg)
    # Each rank lists the units once, here; StoreBatches trains on this list. Were extraction to complete a
    # unit in between, ranks would disagree on the epoch length and DDP would hang at the first uneven step.
    units = store.units() if store is not None and cfg.train.targets == "store" else None
    data = data_identity(cfg, units)
    if len({json.dumps(d, sort_keys=True) for d in _all_gather(data, world)}) > 1:
        raise RuntimeError("processes see different store contents (complete units): the store changed while "
                           "training started (is comad-extract still running?); retry when it has finished")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise ResumeError(f"{run_dir} already holds checkpoints up to step {read_meta(ckpt)['step']}: pass "
                          "--resume to continue that run, or set another train.run_dir")
    if ckpt is not None:
        check_resumable(ckpt, cfg, world, cfg.train.num_workers, data)
    return Run(cfg, accelerator, rank, world, main, run_dir, store, units, data, ckpt)


def build_model(run: Run) -> tuple[CoMADDistiller, LiveTeachers | None]:
    """The student with its heads initialised (compact maps, or the store's statistics), and the live
    teachers for online targets. Seeded first, so every rank starts from identical weights."""
    cfg, store = run.cfg, run.store
    seed_everything(cfg.seed)  # identical initial weights on every rank
    dims = None if store is None else {t: store.teacher_meta(t).dim for t in store.teachers}
    compact = None if store is None else check_compact_training(cfg, store)  # features already mapped
    stats, joint = (None, None) if compact else target_statistics(cfg, store)
    live = None
    if cfg.train.targets == "online":
        live = LiveTeachers(cfg).to(run.accelerator.device)
        if dims is not None and dims != live.dims:
            raise RuntimeError(f"the live teachers' feature widths {live.dims} differ from the store's {dims}, "
                               "whose statistics would initialise the adapters")
        dims = live.dims
    model = CoMADDistiller(cfg, dims)
    if compact:
        install_compact_maps(model, compact)
    elif stats is not None:
        model.init_from_statistics(stats, pca=cfg.heads.adapter_init == "pca", joint=joint)
    if run.main and hasattr(model, "gate_prior"):
        print(f"gate prior (rankme^{cfg.gate.prior_power:g}, from each teacher's statistics in the store): "
              + ", ".join(f"{t} {float(p):.3f}" for t, p in zip(model.teacher_names, model.gate_prior)),
              file=sys.stderr)
    return model, live


def prepare(run: Run, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, Any, int]:
    """(prepared model, optimizer, scheduler, step to start from): the checkpoint's state when resuming.
    Writes the run's config.toml (the main process)."""
    cfg, tr = run.cfg, run.cfg.train
    optimizer = build_optimizer(model, cfg, run.world)
    scheduler = build_scheduler(optimizer, cfg, run.world)
    # The scheduler is not prepared: accelerate would step it once per process.
    model, optimizer = run.accelerator.prepare(model, optimizer)
    step = 0
    if run.ckpt is not None:
        step = load_checkpoint(run.ckpt, run.accelerator.unwrap_model(model), optimizer, scheduler, run.rank)
        if run.main:
            print(f"resuming {run.run_dir} from {run.ckpt.name} (step {step} of {tr.steps})")
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.toml").write_text(dumps_toml(cfg))
    return model, optimizer, scheduler, step


# ---------------------------------------------------------------------------------------------- the loop

class NonFiniteSteps:
    """Counts skipped (non-finite) steps; stops the run after train.max_nonfinite_steps in a row, since
    isolated bad batches are survivable but a diverged run only burns compute."""

    def __init__(self, run: Run) -> None:
        self.limit, self.run_dir, self.main = run.cfg.train.max_nonfinite_steps, run.run_dir, run.main
        self.consecutive = self.total = 0

    def update(self, step: int, metrics: dict[str, Tensor], applied: bool) -> None:
        self.consecutive = 0 if applied else self.consecutive + 1
        if applied:
            return
        self.total += 1
        if self.main:
            values = ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items() if k.startswith(("loss", "grad")))
            tqdm.write(f"step {step}: non-finite loss or gradient on at least one rank (rank 0: {values}); "
                       "update skipped on every rank")
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps up to step {step} had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps = {self.limit}); the run stops. Check the store's "
                f"features for NaN/inf, lower optim.base_lr, or resume from {latest_checkpoint(self.run_dir)}")


def next_batch(batches: Iterator[StudentBatch], live: LiveTeachers | None, accelerator: Accelerator) -> StudentBatch:
    """The next batch on the device with its targets: decoded from the store, or the live teachers'."""
    batch = dequantize_targets(to_device(next(batches), accelerator.device))
    if live is not None:
        with torch.no_grad(), accelerator.autocast():
            batch = live(batch)
    return batch


def train(cfg: PipelineConfig, resume: bool = False) -> dict[str, Any]:
    """Train for cfg.train.steps global steps; returns a summary (run_dir, final step, last metrics)."""
    run = set_up(cfg, resume)
    model, live = build_model(run)
    model, optimizer, scheduler, step = prepare(run, model)
    tr, accelerator = cfg.train, run.accelerator
    log = MetricLog(run.run_dir, step, run.main)
    start_trackers(accelerator, cfg, step)  # hparams and the resolved config, once per (resumed) run
    last_row: dict[str, Any] = {}
    bad = NonFiniteSteps(run)
    collapse = CollapseGuard(cfg)
    batches = make_batches(run, step) if step < tr.steps else iter(())
    bar = tqdm(total=tr.steps, initial=step, disable=not run.main, dynamic_ncols=True, desc="train")
    model.train()
    try:
        while step < tr.steps:
            batch = next_batch(batches, live, accelerator)
            metrics, applied = train_step(model, batch, optimizer, scheduler, accelerator, cfg.optim.grad_clip)
            step += 1
            warned = collapse.update(step, metrics, lambda x: accelerator.reduce(x.to(accelerator.device), "mean"))
            if warned and run.main:
                tqdm.write(warned)
            log.add(metrics, applied)
            bar.update(1)
            bad.update(step, metrics, applied)
            if step % tr.log_every == 0 or step == tr.steps:
                last_row = log.flush(step, learning_rate(cfg, run.world, step - 1),
                                     tr.batch_size * (log.applied + log.skipped), accelerator)
                bar.set_postfix(loss=f"{last_row.get('loss', float('nan')):.4f}",
                                img_s=f"{last_row['img_per_s']:.0f}")
            if step % tr.checkpoint_every == 0 or step == tr.steps:
                save_checkpoint(accelerator, model, optimizer, scheduler, step, cfg, tr.num_workers, run.data)
    finally:
        bar.close()
        finish_trackers(accelerator)
    return summary(run, step, last_row, bad.total)


def summary(run: Run, step: int, last_row: dict[str, Any], skipped: int) -> dict[str, Any]:
    """train()'s result; a run resumed at its end trained nothing, so its last logged row is reported."""
    final = latest_checkpoint(run.run_dir)
    metrics = run.run_dir / "metrics.jsonl"
    if not last_row and metrics.exists():  # nothing left to train: report the run's end
        rows = metrics.read_text().splitlines()
        last_row = json.loads(rows[-1]) if rows else {}
    return {"run_dir": str(run.run_dir), "step": step, "last_metrics": last_row, "skipped_steps": skipped,
            "checkpoint": None if final is None else str(final), "world_size": run.world}
