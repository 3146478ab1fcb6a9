"""Reader benchmark (issue 14): the store path alone, no model — samples per CPU-second and MB/s.

ViT-B shapes (pipeline.toml: 224 px, patch 16, 3 teachers of 768-d at 78 / 108 / 137 tokens, student
49 tokens, 2 views), synthetic features written through the real writer (UnitWriter), one store per
dtype x compression. Each variant iterates `StoreBatches` (the trainer's dataset, batch 16, through
`make_loader` with 0 / 1 / 2 workers) and counts the CPU seconds of this process and its loader
workers (user + system, every thread) over the timed batches. Variants alternate over the repeats so
machine noise hits them alike; the medians are reported. The baseline (`engine = "zarr"`, the zarr
read path that was the only one before issue 14, int8 decoded to float32 in the reader) runs in the same
process, side by side with `engine = "direct"` (store_schema/chunkread.py; int8 kept as int8 + scale).

    python -m benchmarks.bench_reader [--quick] [--samples 128] [--batches 24] [--repeats 3]
        [--dtypes float16 int8] [--compressions none zstd blosc] [--workers 0 1 2] [--engines zarr fast]

Reported per variant: samples per CPU-second (the figure that decides how many cores feed a GPU),
samples per wall-second (noisy on a shared machine), stored MB read per CPU-second, and the stored bytes
per view. The JSON key `samples_per_cpu_s` holds {engine/dtype/compression/workers: median}. dtype
"compact" is the compact store (distill/compact.py: float16 features already mapped by the default
frozen CCA basis to the target width); `compact_over_float16_ratio` is its bytes per view over the
float16 store's (zstd).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.common import bench_config, print_json
from distill.store_dataset import ENGINES, StoreBatches, make_loader
from store_schema.store import FeatureStore, TeacherMeta
from store_schema.writer import TeacherRows, UnitRows, UnitWriter


def _features(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """ViT-like features after the final norm: unit-scale channels, a couple of large ones."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x[..., :2] *= 8.0
    return x


def build_store(root: Path, dtype: str, compression: str, samples: int, unit_samples: int, dim: int,
                extra: list[str] = (), seed: int = 0) -> dict:
    """A store of `samples` synthetic samples at the configured shapes: {cfg (to read it), bytes_per_view}."""
    n_units = max(1, samples // unit_samples)
    urls = [f"{root}/src/bench-{i:06d}.tar" for i in range(n_units)]
    cfg = bench_config([f'store.root="{root}/store"', f'store.dtype="{dtype}"', f'store.compression="{compression}"',
                        f"data.urls={json.dumps(urls)}", *extra])
    store = FeatureStore.create(cfg.store.root, cfg, {t: TeacherMeta(dim, cfg.teacher_tokens(t), f"bench-{t}")
                                                      for t in cfg.teachers})
    rng = np.random.default_rng(seed)
    V, N, p, ks = cfg.views.num_views, cfg.num_patches, cfg.data.patch_size, cfg.student_tokens
    for u, url in enumerate(urls):
        m = unit_samples
        sidx = np.sort(np.stack([np.stack([rng.choice(N, ks, replace=False) for _ in range(V)]) for _ in range(m)]), -1)
        teachers = {}
        for t in cfg.teachers:
            kt = cfg.teacher_tokens(t)
            idx = np.empty((m, V, kt), dtype=np.int64)
            for i in range(m):
                for v in range(V):
                    rest = np.setdiff1d(np.arange(N), sidx[i, v])
                    idx[i, v] = np.sort(np.concatenate([sidx[i, v], rng.choice(rest, kt - ks, replace=False)]))
            teachers[t] = TeacherRows(idx, _features(rng, (m, V, kt, dim)), _features(rng, (m, V, dim)))
        rows = UnitRows(keys=[f"{u}-{i:06d}" for i in range(m)], index=np.arange(m), label=np.zeros(m, np.int64),
                        views=rng.random((m, V, 5), dtype=np.float32), student_idx=sidx,
                        student_pixels=rng.integers(0, 256, size=(m, V, ks, 3, p, p), dtype=np.uint8),
                        teachers=teachers)
        w = UnitWriter(store, url)
        w.append(rows)
        w.commit()
    return {"cfg": cfg, "bytes_per_view": _stored_bytes(root / "store") / (samples * V)}


def build_compact(src_cfg, root: Path, samples: int) -> dict:
    """The compact store (distill/compact.py) of a float16 store: its features mapped by the default
    frozen basis (the CCA of the cross-teacher statistics, fitted here from the store itself)."""
    from distill.compact import write_compact_store
    from store_schema.joint_stats import fit_joint_stats
    shutil.rmtree(root, ignore_errors=True)
    fit_joint_stats(FeatureStore.open(src_cfg.store.root, mode="r+"), src_cfg.store.joint_stats_samples)
    write_compact_store(src_cfg, f"{root}/store", dtype="float16")
    cfg = dataclasses.replace(src_cfg, store=dataclasses.replace(src_cfg.store, root=f"{root}/store"))
    return {"cfg": cfg, "bytes_per_view": _stored_bytes(root / "store") / (samples * cfg.views.num_views)}


def _stored_bytes(store_root: Path) -> int:
    """Bytes of the per-unit arrays (statistics and metadata documents excluded)."""
    return sum(f.stat().st_size for f in (store_root / "units").rglob("*") if f.is_file()
               and "stats_" not in str(f) and f.name != "zarr.json")


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds (user + system, every thread) of this process and its live children (the loader workers)."""
    total = time.process_time()
    for p in proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cfg, engine: str, workers: int, batches: int, warmup: int) -> dict:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers))
    # The baseline is the code before issue 14 (zarr, int8 decoded in the reader with numpy); the others
    # are the trainer's path now (int8 targets as int8 + scale, decoded on the device).
    ds = StoreBatches(cfg, 0, 1, 0, engine=engine, int8_targets=engine != "zarr")
    it = iter(make_loader(ds, workers))
    for _ in range(warmup):  # worker start-up, first reads, page cache
        next(it)
    proc = psutil.Process()
    c0, t0 = _cpu(proc), time.perf_counter()
    n = sum(len(b["pixels"]) for b in islice(it, batches))
    cpu, wall = _cpu(proc) - c0, time.perf_counter() - t0
    del it
    return {"samples": n, "cpu_s": max(cpu, 1e-6), "wall_s": wall}  # children's clock ticks are 10 ms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 samples, 8 timed batches, 2 repeats")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--unit-samples", type=int, default=64, help="samples per unit (input tar)")
    ap.add_argument("--dim", type=int, default=768, help="teacher width (768 = ViT-B)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"])
    ap.add_argument("--compressions", nargs="+", default=["none", "zstd", "blosc"])
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), help="the first is the baseline")
    ap.add_argument("--no-compact", dest="compact", action="store_false",
                    help="skip the compact store (features mapped to the target width; distill/compact.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.unit_samples = min(args.samples, 64), min(args.unit_samples, 32)
        args.batches, args.repeats = min(args.batches, 8), min(args.repeats, 2)
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_reader_"))
    stores = {}
    for dtype in args.dtypes:
        for comp in args.compressions:
            root = out / f"{dtype}-{comp}"
            shutil.rmtree(root, ignore_errors=True)
            # The trainer's read: CLS features too (loss.cls_weight > 0 by default), no views or labels.
            stores[(dtype, comp)] = build_store(root, dtype, comp, args.samples, args.unit_samples, args.dim, [
                f"train.batch_size={args.batch}", f"train.shuffle_window={args.batch * 4}"])
    if args.compact:
        for comp in args.compressions:
            if ("float16", comp) in stores:
                stores[("compact", comp)] = build_compact(stores[("float16", comp)]["cfg"], out / f"compact-{comp}",
                                                          args.samples)
    variants = [(e, d, c, w) for (d, c) in stores for w in args.workers for e in args.engines]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            e, d, c, w = v
            runs[v].append(measure(stores[(d, c)]["cfg"], e, w, args.batches, warmup=2 if w else 1))

    res = {"samples_per_cpu_s": {}, "samples_per_wall_s": {}, "mb_per_cpu_s": {}, "bytes_per_view": {},
           "runs": {}}
    rows = []
    for v in variants:
        e, d, c, w = v
        key = f"{e}/{d}/{c}/w{w}"
        spc = statistics.median(r["samples"] / r["cpu_s"] for r in runs[v])
        spw = statistics.median(r["samples"] / r["wall_s"] for r in runs[v])
        bpv = stores[(d, c)]["bytes_per_view"]
        res["samples_per_cpu_s"][key] = spc
        res["samples_per_wall_s"][key] = spw
        res["mb_per_cpu_s"][key] = spc * bpv / 1e6
        res["bytes_per_view"][f"{d}/{c}"] = bpv
        res["runs"][key] = runs[v]
        base = res["samples_per_cpu_s"][f"{args.engines[0]}/{d}/{c}/w{w}"]
        rows.append((e, d, c, w, spc, spw, spc * bpv / 1e6, bpv / 1e3, spc / base))
    print(f"\nReader benchmark: {args.samples} samples x 2 views, teachers {args.dim}-d at 78/108/137 tokens, "
          f"batch {args.batch}, {args.batches} batches x {args.repeats} repeats (medians)")
    head = ("engine", "dtype", "compression", "workers", "samples/CPU-s", "samples/wall-s", "MB/CPU-s", "KB/view",
            "x baseline")
    print(" | ".join(head))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} | {r[7]:.1f} | {r[8]:.2f}")
    f16 = [res["samples_per_cpu_s"][k] for k in res["samples_per_cpu_s"] if k.startswith(f"{args.engines[-1]}/float16")]
    res["best_float16_samples_per_cpu_s"] = max(f16) if f16 else None
    ratios = {c: res["bytes_per_view"][f"compact/{c}"] / res["bytes_per_view"][f"float16/{c}"]
              for c in args.compressions if f"compact/{c}" in res["bytes_per_view"]}
    if ratios:  # the compact store's bytes per view over today's float16 store's, same compression
        res["compact_over_float16_ratio"] = ratios.get("zstd", next(iter(ratios.values())))
        res["compact_over_float16_ratio_by_compression"] = ratios
        # ImageNet-1k totals: 1,281,167 images x 2 stored views
        res["imagenet1k_tb"] = {k: v * 1_281_167 * 2 / 1e12 for k, v in res["bytes_per_view"].items()}
        print("compact / float16 bytes per view: " + ", ".join(f"{c} {r:.3f}" for c, r in ratios.items()))
    res.update(samples=args.samples, dim=args.dim, batch=args.batch, batches=args.batches, repeats=args.repeats,
               engines=args.engines, cpus=os.cpu_count(), load_average=os.getloadavg())
    print_json("reader", res)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
