"""Extraction benchmark (issue 3), ViT-B/16 teachers at 224, side by side in one run:

1. extraction images/s (the real `run_extraction`: decode workers + teachers + background writer) vs bare
   teacher forwards on the same views and masks (goal: ratio >= 0.85);
2. the three token-dropped teachers at 40/55/70 % vs three full-image forwards (goal: <= 0.56 of the time);
3. store bytes per view for float32 / float16 / int8 (the same features re-encoded through UnitWriter).

    python benchmarks/bench_extract.py [--images 32] [--repeats 3] [--precision float32|bf16] [--out DIR]

On a CUDA machine everything runs on the GPU (extraction picks it by itself); `--precision bf16` sets
store.teacher_precision and runs the bare forwards under the same bf16 autocast.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    bench_config,
    median_time,
    print_json,
    print_table,
    write_image_tars,
    write_teacher_checkpoints,
)
from extract.masks import draw_masks, generator_for
from extract.pipeline import run_extraction
from extract.views import apply_view, sample_view
from store_schema.shards import Sample, expand_urls, iter_tar
from store_schema.store import FeatureStore
from store_schema.writer import TeacherRows, UnitRows, UnitWriter
from vit_layers.checkpoints import load_teacher
from vit_layers.forward import forward_visible
from vit_layers.pixels import normalize_pixels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where run_extraction runs the teachers


def _forwards(precision: str):
    """The autocast of a bare teacher forward, as store.teacher_precision asks (off for float32)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def prepared_views(cfg) -> list[tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """Every (image, view) exactly as extraction prepares it: uint8 view image + teacher masks."""
    out = []
    for url in expand_urls(cfg.data.urls):
        for item in iter_tar(url, cfg.data.max_image_pixels):
            if not isinstance(item, Sample):
                continue
            for v in range(cfg.views.num_views):
                gen = generator_for(cfg.seed, item.key, v, "view")
                params = sample_view(item.image.width, item.image.height, gen, cfg.views)
                img = apply_view(item.image, params, cfg.data.image_size, cfg.views.interpolation)
                out.append((img, draw_masks(cfg, item.key, v).teachers))
    return out


def bare_forwards(cfg, teachers, views) -> None:
    b = cfg.data.batch_size
    with torch.inference_mode(), _forwards(cfg.store.teacher_precision):
        for i in range(0, len(views), b):
            chunk = views[i:i + b]
            imgs = torch.stack([c[0] for c in chunk]).to(DEVICE)
            for name, model in teachers.items():
                t = cfg.teachers[name]
                idx = torch.from_numpy(np.stack([c[1][name] for c in chunk])).long().to(DEVICE)
                forward_visible(model, normalize_pixels(imgs, t.mean, t.std), idx)
    _sync()


def dropped_vs_full(cfg, teachers, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size).to(DEVICE)
    n = cfg.num_patches
    idx = {k: torch.stack([torch.randperm(n)[:cfg.teacher_tokens(k)].sort().values for _ in range(batch)]).to(DEVICE)
           for k in teachers}

    def dropped():
        with torch.inference_mode(), _forwards(cfg.store.teacher_precision):
            for k, m in teachers.items():
                forward_visible(m, x, idx[k])
        _sync()

    def full():
        with torch.inference_mode(), _forwards(cfg.store.teacher_precision):
            for m in teachers.values():
                m.forward_features(x)
        _sync()

    t_drop, t_full = [], []
    dropped(), full()  # warm-up
    for _ in range(repeats):  # interleaved so both see the same machine state
        t_drop.append(median_time(dropped, 1, warmup=0)[0])
        t_full.append(median_time(full, 1, warmup=0)[0])
    token_fraction = sum(cfg.teacher_tokens(k) + 1 for k in teachers) / (len(teachers) * (n + 1))
    return {"dropped_s": float(np.median(t_drop)), "full_s": float(np.median(t_full)),
            "ratio": float(np.median(t_drop) / np.median(t_full)), "token_fraction": token_fraction}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bytes_per_view(cfg, src_root: str, out: Path) -> dict:
    """Re-encode the extracted features in each dtype (no teacher rerun) and measure bytes on disk."""
    src = FeatureStore.open(src_root)
    res = {}
    for dtype in ("float32", "float16", "int8"):
        root = out / f"store-{dtype}"
        shutil.rmtree(root, ignore_errors=True)
        c = bench_config(BASE_OVERRIDES + [f'store.root="{root}"', f'store.dtype="{dtype}"'])
        dst = FeatureStore.create(str(root), c, {t: src.teacher_meta(t) for t in src.teachers})
        views = 0
        for info in src.units():
            w = UnitWriter(dst, info.source)
            n = info.n_samples
            per_view = [src.read_block(info.name, 0, n, v) for v in range(src.num_views)]
            stack = lambda f: np.stack([f(b) for b in per_view], axis=1)  # noqa: E731
            w.append(UnitRows(
                keys=src.keys(info.name), index=per_view[0]["index"], label=per_view[0]["label"],
                views=stack(lambda b: b["views"]), student_idx=stack(lambda b: b["student_idx"]),
                student_pixels=stack(lambda b: b["pixels"]),
                teachers={t: TeacherRows(stack(lambda b: b["teachers"][t]["idx"]),
                                         stack(lambda b: b["teachers"][t]["patch"]),
                                         stack(lambda b: b["teachers"][t]["cls"])) for t in src.teachers}))
            w.commit()
            views += n * src.num_views
        units = root / "units"
        # Per-unit statistics (count, mean, M2 in float64: D x D per teacher) are a fixed cost per input tar,
        # reported apart: they would swamp the per-view figure on this benchmark's tiny tars.
        stats = sum(dir_bytes(p) for p in units.glob("*/teachers/*/stats_*"))
        teacher_bytes = sum(dir_bytes(p) for p in units.glob("*/teachers")) - stats
        pixel_bytes = sum(dir_bytes(p) for p in units.glob("*/student_pixels"))
        rest = dir_bytes(units) - stats - teacher_bytes - pixel_bytes
        res[dtype] = {"bytes_per_view": (teacher_bytes + pixel_bytes + rest) / views,
                      "teacher_bytes_per_view": teacher_bytes / views,
                      "student_pixel_bytes_per_view": pixel_bytes / views,
                      "stats_bytes_per_unit": stats / len(src.units())}
    return res


BASE_OVERRIDES: list[str] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--precision", choices=("float32", "bf16"), default="float32", help="store.teacher_precision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_extract_"))
    base = bench_config([])
    urls = write_image_tars(out / "data", args.images, per_tar=max(1, args.images // 2))
    BASE_OVERRIDES[:] = write_teacher_checkpoints(base, out / "ckpt") + [
        f"data.urls={urls!r}".replace("'", '"'), f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f'store.teacher_precision="{args.precision}"']
    cfg = bench_config(BASE_OVERRIDES + [f'store.root="{out}/store-run0"'])
    teachers = {k: load_teacher(t, cfg.data.image_size, cfg.data.patch_size)[0].to(DEVICE)
                for k, t in cfg.teachers.items()}

    part2 = dropped_vs_full(cfg, teachers, args.batch, args.repeats)
    views = prepared_views(cfg)
    ext_rates, bare_rates = [], []
    for r in range(args.repeats):  # alternate the two so machine noise hits both alike
        run_cfg = bench_config(BASE_OVERRIDES + [f'store.root="{out}/store-run{r}"'])
        shutil.rmtree(f"{out}/store-run{r}", ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_extraction(run_cfg)
        wall = time.perf_counter() - t0
        ext_rates.append(summary.get("images_per_s", args.images / wall))
        t0 = time.perf_counter()
        bare_forwards(cfg, teachers, views)
        bare_rates.append(args.images / (time.perf_counter() - t0))
    part1 = {"extract_images_per_s": float(np.median(ext_rates)), "bare_images_per_s": float(np.median(bare_rates)),
             "ratio": float(np.median(np.array(ext_rates) / np.array(bare_rates))),
             "runs_extract": ext_rates, "runs_bare": bare_rates}
    part3 = bytes_per_view(cfg, f"{out}/store-run0", out)

    print_table(f"Extraction benchmark: {args.images} images x {cfg.views.num_views} views, ViT-B/16 x3 at "
                f"{cfg.data.image_size}, batch {args.batch}, {args.precision} on {DEVICE}, median of {args.repeats}", [
        ("(1) extraction images/s", f"{part1['extract_images_per_s']:.3f}"),
        ("(1) bare teacher forwards images/s", f"{part1['bare_images_per_s']:.3f}"),
        ("(1) ratio (goal >= 0.85)", f"{part1['ratio']:.3f}"),
        ("(2) token-dropped 3 teachers s/batch", f"{part2['dropped_s']:.3f}"),
        ("(2) full-image 3 teachers s/batch", f"{part2['full_s']:.3f}"),
        ("(2) ratio (goal <= 0.56; token fraction)", f"{part2['ratio']:.3f} ({part2['token_fraction']:.3f})"),
        *[(f"(3) {d} bytes/view (teachers + pixels)",
           f"{v['bytes_per_view'] / 1e3:.1f} KB ({v['teacher_bytes_per_view'] / 1e3:.1f} + "
           f"{v['student_pixel_bytes_per_view'] / 1e3:.1f})") for d, v in part3.items()],
    ])
    print_json("extract", {"images": args.images, "views": cfg.views.num_views, "batch": args.batch,
                           "device": str(DEVICE), "precision": args.precision,
                           "repeats": args.repeats, "extract_vs_bare": part1, "dropped_vs_full": part2,
                           "bytes_per_view": part3})


if __name__ == "__main__":
    main()
