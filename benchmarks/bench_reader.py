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
        [--dtypes float16 int8] [--compressions none zstd blosc blosc3b0] [--workers 0 1 2] [--engines zarr direct]
        [--pixels random|photo]

Reported per variant: samples per CPU-second (the figure that decides how many cores feed a GPU),
samples per wall-second (noisy on a shared machine), stored MB read per CPU-second, and the stored bytes
per view. The JSON key `samples_per_cpu_s` holds {engine/dtype/compression/workers: median}. A
compression is a codec name with an optional level (`blosc5` = blosc at level 5; no digits = level 3,
pipeline.toml's) and, for blosc, a block in KiB (`blosc3b0`: blosc picks its own blocks, the codec of
blosc stores before session 9; without it pipeline.toml's store.blosc_block_kib). dtype "compact" is the
compact store (distill/compact.py: float16 features already mapped by the default frozen CCA basis to the
target width), one per compression, written from the float16 store of that compression;
`compact_over_float16_ratio` is the bytes per view of the compact store as distill/compact.py writes it
by default (its own codec, when among --compressions) over the float16 store issue 14 measured against
(zstd level 3, pipeline.toml's codec until session 9), `..._by_compression` the same at equal codecs.
`--pixels photo` stores student pixels cut from the photos scikit-learn ships (random crops, as the
extractor's views) instead of uniform noise, which no codec can shrink.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
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
from distill.store_dataset import StoreBatches, make_loader
from store_schema.store import FeatureStore, TeacherMeta
from store_schema.writer import TeacherRows, UnitRows, UnitWriter


def _features(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """ViT-like features after the final norm: unit-scale channels, a couple of large ones."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x[..., :2] *= 8.0
    return x


def codec(spec: str) -> tuple[str, int, list[str]]:
    """"blosc5" -> ("blosc", 5, []); a bare name is level 3 (pipeline.toml's store.compression_level);
    "blosc3b0" is blosc with store.blosc_block_kib = 0 (blosc picks its blocks: the store before session 9)
    -> ("blosc", 3, ["store.blosc_block_kib=0"]); without "b" the block is pipeline.toml's."""
    m = re.fullmatch(r"(none|zstd|blosc)(\d*)(?:b(\d+))?", spec)
    if m is None or (m[3] is not None and m[1] != "blosc"):
        raise SystemExit(f"bench_reader: compression {spec!r}: use none, zstd or blosc, optionally with a level "
                         f"(blosc5) and for blosc a block in KiB (blosc3b0)")
    return m[1], int(m[2] or 3), [] if m[3] is None else [f"store.blosc_block_kib={int(m[3])}"]


def _photo_pixels(rng: np.random.Generator, sidx: np.ndarray, image: int, p: int) -> np.ndarray:
    """(m, V, Ks, 3, p, p) uint8: each view a random resized crop (scale 0.25-1, ratio 3/4-4/3) of a photo
    scikit-learn ships, at `image` px, its patches at sidx; like the extractor's views of real images."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise SystemExit("bench_reader: --pixels photo needs scikit-learn (pip install -e '.[extras]')") from None
    from PIL import Image
    photos = load_sample_images().images
    g = image // p
    out = np.empty((*sidx.shape, 3, p, p), dtype=np.uint8)
    for i, v in np.ndindex(sidx.shape[:2]):
        im = photos[rng.integers(len(photos))]
        H, W = im.shape[:2]
        area, ratio = rng.uniform(0.25, 1.0) * H * W, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h, w = min(H, int(np.sqrt(area / ratio))), min(W, int(np.sqrt(area * ratio)))
        top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        view = np.asarray(Image.fromarray(im[top:top + h, left:left + w]).resize((image, image), Image.BICUBIC))
        patches = view.reshape(g, p, g, p, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, 3, p, p)
        out[i, v] = patches[sidx[i, v]]
    return out


def build_store(root: Path, dtype: str, compression: str, samples: int, unit_samples: int, dim: int,
                extra: list[str] = (), seed: int = 0, pixels: str = "random") -> dict:
    """A store of `samples` synthetic samples at the configured shapes: {cfg (to read it), bytes_per_view}."""
    t0 = time.perf_counter()
    n_units = max(1, samples // unit_samples)
    urls = [f"{root}/src/bench-{i:06d}.tar" for i in range(n_units)]
    name, level, block = codec(compression)
    cfg = bench_config([f'store.root="{root}/store"', f'store.dtype="{dtype}"', f'store.compression="{name}"',
                        f"store.compression_level={level}", *block, f"data.urls={json.dumps(urls)}", *extra])
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
                        student_pixels=(_photo_pixels(rng, sidx, cfg.data.image_size, p) if pixels == "photo" else
                                        rng.integers(0, 256, size=(m, V, ks, 3, p, p), dtype=np.uint8)),
                        teachers=teachers)
        w = UnitWriter(store, url)
        w.append(rows)
        w.commit()
    return {"cfg": cfg, "bytes_per_view": _stored_bytes(root / "store") / (samples * V),
            "write_s": time.perf_counter() - t0}


def build_compact(src_cfg, root: Path, samples: int, compression: str) -> dict:
    """The compact store (distill/compact.py) of a float16 store, written with `compression`: its features
    mapped by the default frozen basis (the CCA of the cross-teacher statistics, fitted from the store)."""
    from distill.compact import write_compact_store
    from store_schema.joint_stats import fit_joint_stats
    shutil.rmtree(root, ignore_errors=True)
    fit_joint_stats(FeatureStore.open(src_cfg.store.root, mode="r+"), src_cfg.store.joint_stats_samples)
    name, level, _ = codec(compression)  # the block: src_cfg's, which the compact store keeps
    t0 = time.perf_counter()  # the compact write alone (reading the source, mapping, encoding, writing)
    write_compact_store(src_cfg, f"{root}/store", dtype="float16", compression=name, compression_level=level)
    cfg = dataclasses.replace(src_cfg, store=dataclasses.replace(src_cfg.store, root=f"{root}/store"))
    return {"cfg": cfg, "bytes_per_view": _stored_bytes(root / "store") / (samples * cfg.views.num_views),
            "write_s": time.perf_counter() - t0}


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


# variant -> (read engine, reused shared buffers between loader workers and the trainer)
READERS = {"zarr": ("zarr", False), "direct-nopool": ("direct", False), "direct": ("direct", True)}


def measure(cfg, reader: str, workers: int, batches: int, warmup: int) -> dict:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers))
    # The baseline is the code before issue 14 (zarr, int8 decoded in the reader with numpy, torch's
    # transport); "direct" is the trainer's path now (int8 targets as int8 + scale, decoded on the
    # device; workers hand batches over in reused buffers: distill/batch_pool.py), "direct-nopool" the
    # same through torch's transport (a new shared buffer per batch).
    engine, pool = READERS[reader]
    ds = StoreBatches(cfg, 0, 1, 0, engine=engine, int8_targets=engine != "zarr")
    it = iter(make_loader(ds, workers, pool=pool))
    for _ in range(warmup):  # worker start-up, first reads, page cache
        next(it)
    proc = psutil.Process()
    c0, t0 = _cpu(proc), time.perf_counter()
    n = sum(len(b["pixels"]) for b in islice(it, batches))
    cpu, wall = _cpu(proc) - c0, time.perf_counter() - t0
    del it
    return {"samples": n, "cpu_s": max(cpu, 1e-6), "wall_s": wall}  # children's clock ticks are 10 ms


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; --quick caps the sizes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 samples, 8 timed batches, 2 repeats")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--unit-samples", type=int, default=64, help="samples per unit (input tar)")
    ap.add_argument("--dim", type=int, default=768, help="teacher width (768 = ViT-B)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"])
    ap.add_argument("--compressions", nargs="+", default=["none", "zstd", "blosc", "blosc3b0"],
                    help="codec[level][bKiB]: none, zstd, blosc (pipeline.toml's and the compact store's codec), "
                         "blosc3b0 (blosc choosing its blocks: blosc stores before session 9)")
    ap.add_argument("--pixels", choices=("random", "photo"), default="random",
                    help="student pixels: uniform noise (incompressible) or crops of real photos")
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--engines", nargs="+", default=["zarr", "direct-nopool", "direct"], choices=list(READERS),
                    help="the first is the baseline; direct-nopool runs with loader workers only")
    ap.add_argument("--no-compact", dest="compact", action="store_false",
                    help="skip the compact store (features mapped to the target width; distill/compact.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.unit_samples = min(args.samples, 64), min(args.unit_samples, 32)
        args.batches, args.repeats = min(args.batches, 8), min(args.repeats, 2)
    return args


def build_stores(args: argparse.Namespace, out: Path) -> dict[tuple[str, str], dict]:
    """{(dtype, compression): build_store's dict}; then ("compact", compression) from each float16 store."""
    stores = {}
    for dtype in args.dtypes:
        for comp in args.compressions:
            root = out / f"{dtype}-{comp}"
            shutil.rmtree(root, ignore_errors=True)
            # The trainer's read: CLS features too (loss.cls_weight > 0 by default), no views or labels.
            stores[(dtype, comp)] = build_store(root, dtype, comp, args.samples, args.unit_samples, args.dim, [
                f"train.batch_size={args.batch}", f"train.shuffle_window={args.batch * 4}"], pixels=args.pixels)
    if args.compact:
        for comp in args.compressions:
            if ("float16", comp) in stores:
                stores[("compact", comp)] = build_compact(stores[("float16", comp)]["cfg"], out / f"compact-{comp}",
                                                          args.samples, comp)
    return stores


def measure_all(args: argparse.Namespace, stores: dict[tuple[str, str], dict]) -> tuple[list[tuple], dict[tuple, list]]:
    """([(engine, dtype, compression, workers)], {variant: [measure() per repeat]}); they alternate in each repeat."""
    # direct-nopool differs from direct only in how loader workers hand batches over
    variants = [(e, d, c, w) for (d, c) in stores for w in args.workers for e in args.engines
                if not (e == "direct-nopool" and w == 0)]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            e, d, c, w = v
            runs[v].append(measure(stores[(d, c)]["cfg"], e, w, args.batches, warmup=2 if w else 1))
    return variants, runs


def summarize(args: argparse.Namespace, stores: dict[tuple[str, str], dict], variants: list[tuple],
              runs: dict[tuple, list[dict]]) -> dict:
    """The medians per variant, printed as a table -> the result dict (keys as in the module docstring)."""
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
        res.setdefault("write_s", {})[f"{d}/{c}"] = stores[(d, c)]["write_s"]  # wall: noisy when shared
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
    return res


def add_compact_ratios(args: argparse.Namespace, res: dict) -> None:
    """The compact store's bytes per view over the float16 store's, into `res` and printed (when both were built)."""
    ratios = {c: res["bytes_per_view"][f"compact/{c}"] / res["bytes_per_view"][f"float16/{c}"]
              for c in args.compressions if f"compact/{c}" in res["bytes_per_view"]}
    if ratios:  # the compact store's bytes per view over today's float16 store's
        from distill.compact import COMPRESSION, COMPRESSION_LEVEL
        # the codec distill/compact.py writes by default, as --compressions names it (the config's block)
        shipped = next((c for c in args.compressions if codec(c) == (COMPRESSION, COMPRESSION_LEVEL, [])), None)
        today = res["bytes_per_view"].get("float16/zstd")  # issue 14's baseline: zstd level 3
        if today and f"compact/{shipped}" in res["bytes_per_view"]:
            res["compact_over_float16_ratio"] = res["bytes_per_view"][f"compact/{shipped}"] / today
            res["compact_over_float16_ratio_of"] = f"compact/{shipped} over float16/zstd"
        else:
            res["compact_over_float16_ratio"] = ratios.get("zstd", next(iter(ratios.values())))
            res["compact_over_float16_ratio_of"] = "compact over float16, equal codecs"
        res["compact_over_float16_ratio_by_compression"] = ratios
        # ImageNet-1k totals: 1,281,167 images x 2 stored views
        res["imagenet1k_tb"] = {k: v * 1_281_167 * 2 / 1e12 for k, v in res["bytes_per_view"].items()}
        print("compact / float16 bytes per view at equal codecs: " + ", ".join(f"{c} {r:.3f}" for c, r in ratios.items())
              + f"; compact_over_float16_ratio ({res['compact_over_float16_ratio_of']}) "
              f"{res['compact_over_float16_ratio']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_reader_"))
    stores = build_stores(args, out)
    res = summarize(args, stores, *measure_all(args, stores))
    f16 = [res["samples_per_cpu_s"][k] for k in res["samples_per_cpu_s"] if k.startswith(f"{args.engines[-1]}/float16")]
    res["best_float16_samples_per_cpu_s"] = max(f16) if f16 else None
    add_compact_ratios(args, res)
    res.update(samples=args.samples, dim=args.dim, batch=args.batch, batches=args.batches, repeats=args.repeats,
               engines=args.engines, pixels=args.pixels, cpus=os.cpu_count(), load_average=os.getloadavg())
    print_json("reader", res)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
