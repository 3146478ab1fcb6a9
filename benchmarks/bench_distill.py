"""Training benchmark (issue 4): ViT-B/16 teachers, ViT-Tiny/16 student at 224, same batch, one run:

  store   — steps/s reading targets from the store (StoreBatches + DataLoader workers, the trainer's path)
  memory  — steps/s on the same batches already in memory (the ceiling for the store path; goal >= 0.97)
  online  — steps/s with the three live teachers computing targets (goal: store >= 10x faster)

and the FLOP ratio (online / store) counted from the architectures.

    python -m benchmarks.bench_distill [--images 64] [--batch 16] [--steps 10] [--rounds 4] [--online-steps 2]
        [--mixed-precision no|bf16]

On a CUDA machine the student trains on the GPU (accelerate picks it) and every timed step ends in a
synchronisation; `--mixed-precision bf16` sets train.mixed_precision and store.teacher_precision (the extraction's
and the online teachers' forward), so every path runs in bf16 (use another --out than a float32 run's).

The images go into two tars, so with 64 images each unit holds 32 samples: one whole 32-sample chunk
(pipeline.toml's store.chunk_samples) per block read, as in a real store of ~1,000-image tars. Fewer images
give part-filled chunks, and each read's fixed cost is then spread over fewer samples.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from benchmarks.common import bench_config, print_json, print_table, write_image_tars, write_teacher_checkpoints
from distill.model import CoMADDistiller
from distill.online import LiveTeachers, online_loader
from distill.store_dataset import StoreBatches, check_store_matches, make_loader
from distill.train import build_optimizer, build_scheduler, to_device, train_step
from extract.pipeline import run_extraction
from store_schema.config import PipelineConfig
from store_schema.store import FeatureStore


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds x 2 of one ViT encoder pass over `tokens` tokens (linear layers + attention)."""
    linear = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv (3), proj (1), mlp (2 x ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return depth * (linear + attention)


def flop_ratio(cfg, student, teacher_dims: dict[str, int]) -> dict[str, float]:
    """Online step = student step + teacher forwards; store step = student step. Per image."""
    n, d_s = cfg.num_patches, student.embed_dim
    depth_s = len(student.blocks)
    student_fwd = vit_forward_flops(cfg.student_tokens + 1, d_s, depth_s)
    decoder_fwd = vit_forward_flops(n + 1, d_s, cfg.heads.decoder_depth, cfg.heads.decoder_mlp_ratio)
    adapters = sum(2 * cfg.teacher_tokens(t) * dim * d_s for t, dim in teacher_dims.items())
    student_step = 3 * (student_fwd + decoder_fwd) + adapters  # forward + backward (2x) for trained parts
    teachers = sum(vit_forward_flops(cfg.teacher_tokens(t) + 1, dim, 12) for t, dim in teacher_dims.items())
    return {"student_step_gflop": student_step / 1e9, "teacher_gflop": teachers / 1e9,
            "online_over_store": (student_step + teachers) / student_step}


def in_memory(batch: Any) -> Any:
    """A copy of a loader batch in the trainer's own memory.

    Keeping the loader's batches themselves would hold its reused shared buffers (distill/batch_pool.py:
    a buffer goes back only when the trainer drops the batch): with all of a worker's buffers held, every
    later store batch falls back to torch's transport, and the store path measured is not the trainer's.
    """
    if isinstance(batch, dict):
        return {k: in_memory(v) for k, v in batch.items()}
    if not isinstance(batch, torch.Tensor):
        return batch
    # pinned like the loader's batches on a GPU machine, so both paths copy to the device alike
    return batch.clone().pin_memory() if torch.cuda.is_available() else batch.clone()


def timed_steps(step_fn, batches, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step_fn(next(batches))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels, not just their launch
        times.append(time.perf_counter() - t0)
    return times


def parse_args() -> argparse.Namespace:
    """The command line (sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round for store and memory")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--online-steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="train.mixed_precision")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def extracted_config(args: argparse.Namespace, out: Path) -> PipelineConfig:
    """The benchmark's config (image tars, random ViT-B teachers under `out`); extracts the store unless there."""
    base = bench_config([])
    urls = write_image_tars(out / "data", args.images, per_tar=max(1, args.images // 2))
    overrides = write_teacher_checkpoints(base, out / "ckpt") + [
        f"data.urls={urls!r}".replace("'", '"'), "data.batch_size=16", "data.num_workers=1",
        f'store.root="{out}/store"', f"train.batch_size={args.batch}", f"train.shuffle_window={args.batch}",
        f"train.num_workers={args.workers}", f'train.run_dir="{out}/run"', "optim.warmup_steps=0",
        f'train.mixed_precision="{args.mixed_precision}"',
        f'store.teacher_precision="{"bf16" if args.mixed_precision == "bf16" else "float32"}"']
    cfg = bench_config(overrides)
    if not (out / "store").exists():
        t0 = time.perf_counter()
        run_extraction(cfg)
        print(f"extracted {args.images} images in {time.perf_counter() - t0:.0f} s")
    return cfg


def build_trainer(cfg: PipelineConfig, store: FeatureStore,
                  dims: dict[str, int]) -> tuple[Accelerator, nn.Module, Callable[..., None]]:
    """The student, optimizer and scheduler, set up as training does -> (accelerator, model, step(batch))."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(0)
    model = CoMADDistiller(cfg, dims)
    model.init_from_statistics({t: store.teacher_stats(t) for t in cfg.teachers}, pca=True)
    optimizer = build_optimizer(model, cfg, 1)
    scheduler = build_scheduler(optimizer, cfg, 1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step(batch):
        train_step(model, to_device(batch, accelerator.device), optimizer, scheduler, accelerator, cfg.optim.grad_clip)

    return accelerator, model, step


def report(args: argparse.Namespace, cfg: PipelineConfig, student: nn.Module, dims: dict[str, int],
           t_store: list[float], t_memory: list[float], t_online: list[float], arrived: dict | None) -> None:
    """The medians as steps/s, the goals' ratios and the FLOP ratio: a table and the JSON line."""
    med = {k: statistics.median(v) for k, v in (("store", t_store), ("memory", t_memory), ("online", t_online))}
    flops = flop_ratio(cfg, student, dims)
    res = {"steps_per_s": {k: 1 / v for k, v in med.items()},
           "store_over_memory": med["memory"] / med["store"], "store_speedup_over_online": med["online"] / med["store"],
           "flops": flops, "batch": args.batch, "workers": args.workers,
           "device": str(next(student.parameters()).device), "mixed_precision": args.mixed_precision,
           "images_per_s": {k: args.batch / v for k, v in med.items()},
           "loader_batches": arrived,
           "times_s": {"store": t_store, "memory": t_memory, "online": t_online}}
    print_table(f"Training benchmark: ViT-Tiny/16 student, 3 x ViT-B/16 teachers, 224 px, batch {args.batch}, "
                f"median step time", [
        ("store  steps/s", f"{res['steps_per_s']['store']:.3f}"),
        ("memory steps/s", f"{res['steps_per_s']['memory']:.3f}"),
        ("online steps/s", f"{res['steps_per_s']['online']:.4f}"),
        ("store / memory (goal >= 0.97, issue 14)", f"{res['store_over_memory']:.3f}"),
        ("store batches via reused buffers / fresh", "-" if arrived is None else
                                                      f"{arrived['pooled']} / {arrived['fresh']}"),
        ("store speed-up over online (goal >= 10)", f"{res['store_speedup_over_online']:.1f}x"),
        ("FLOP ratio online / store", f"{flops['online_over_store']:.1f}x "
                                      f"({flops['teacher_gflop']:.1f} + {flops['student_step_gflop']:.2f} GFLOP/img)"),
    ])
    print_json("distill", res)


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_distill_"))
    cfg = extracted_config(args, out)
    store = check_store_matches(cfg)
    dims = {t: store.teacher_meta(t).dim for t in store.teachers}
    accelerator, model, step = build_trainer(cfg, store, dims)

    loader = make_loader(StoreBatches(cfg, 0, 1, 0), cfg.train.num_workers)
    store_batches = iter(loader)
    memory = [in_memory(next(store_batches)) for _ in range(args.steps)]
    step(memory[0])  # warm-up (allocator, kernels)
    t_store, t_memory = [], []
    for _ in range(args.rounds):  # alternate so machine noise hits both alike
        t_store += timed_steps(step, store_batches, args.steps)
        t_memory += timed_steps(step, iter(memory), args.steps)

    live = LiveTeachers(cfg).to(accelerator.device)
    online_batches = iter(online_loader(cfg, 0, 1, 0))
    t_online = timed_steps(lambda b: step(live(b)), online_batches, args.online_steps + 1)[1:]  # first: warm-up
    pool = loader.last_pool  # how the store batches crossed from the workers (None: in process, or no fork)
    arrived = {"pooled": pool.pooled, "fresh": pool.fresh} if pool is not None else None
    report(args, cfg, accelerator.unwrap_model(model).student, dims, t_store, t_memory, t_online, arrived)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
