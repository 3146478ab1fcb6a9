"""`comad-extract --dry-run`: what a multi-day extraction will do, from minutes of work, writing nothing.

- every teacher loaded exactly as the run loads it (strictly: a missing or unexpected key fails here):
  name, arch, format, parameter count, width, visible tokens, the sha256 of its weights;
- the inputs expanded (tar count) and a few tars counted (sample groups, read without decoding: the
  first, middle and last tar) for an estimate of the image count;
- the store size per (sample, view) and in total, before compression, from the layout (store_schema/README.md):
  features barely compress, so this is close to what the store takes;
- a time estimate from a few timed batches of the first tar: decoding (views, masks, pixels) and every
  teacher's forward, per image, combined as the run overlaps them (data.num_workers decode while the
  main process runs the teachers; torchrun processes split the tars).

Nothing is created: no store, no lock, no run record. The store root is only looked at (one request,
which also checks an object store's endpoint, bucket and credentials).
"""
from __future__ import annotations

import itertools
import math
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from extract.inputs import check_locations
from extract.pipeline import _teacher_rows, load_teachers
from extract.prepare import tar_chunks
from store_schema.config import PipelineConfig
from store_schema.inspection import expected_arrays
from store_schema.shards import _META, ShardReadError, split_key
from store_schema.storage import open_input

TIMED_BATCHES = 3  # after one warm-up batch (first-call costs: allocations, kernel choice)
SAMPLED_TARS = 3


@dataclass
class DryRun:
    teachers: list[dict[str, Any]]
    tars: int
    sampled: dict[str, int]  # url -> sample groups
    images_estimate: int
    bytes_per_view: dict[str, float]  # part -> bytes
    decode_s_per_image: float | None
    forward_s_per_image: float | None
    processes: int
    workers: int
    views: int

    @property
    def view_bytes(self) -> float:
        return sum(self.bytes_per_view.values())

    @property
    def total_bytes(self) -> float:
        return self.view_bytes * self.views * self.images_estimate

    @property
    def seconds_estimate(self) -> float | None:
        if self.decode_s_per_image is None or self.forward_s_per_image is None:
            return None
        # Workers decode in parallel with the teachers; with no worker the main process does both in turn.
        per_image = (max(self.decode_s_per_image / self.workers, self.forward_s_per_image) if self.workers
                     else self.decode_s_per_image + self.forward_s_per_image)
        return per_image * self.images_estimate / self.processes


def count_samples(url: str, storage_options: dict | None) -> int:
    """Sample groups of one tar (WebDataset's grouping, as store_schema.shards), reading headers and skipping data."""
    n, last = 0, None
    with open_input(url, storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for info in tf:
            if not info.isreg() or _META.match(info.name):
                continue
            key, _ = split_key(info.name)
            if key is not None and key != last:
                n, last = n + 1, key
            tf.members = []
    return n


def bytes_per_view(cfg: PipelineConfig, dims: dict[str, int]) -> dict[str, float]:
    """Bytes one (sample, view) takes in the store by part, uncompressed: the arrays `comad-store inspect`
    counts as decoded (store_schema.inspection.expected_arrays), per-sample arrays shared by the views."""
    meta = {"patch_size": cfg.data.patch_size, "student_tokens": cfg.student_tokens, "dtype": cfg.store.dtype,
            "teacher_order": list(dims), "teachers": {t: {"dim": d, "tokens": cfg.teacher_tokens(t)}
                                                      for t, d in dims.items()}}
    out: dict[str, float] = {}
    for path, (row, dtype, per_view) in expected_arrays(meta).items():
        part = f"teacher {path.split('/')[1]}" if path.startswith("teachers/") else "student"
        size = math.prod(row) * np.dtype(dtype).itemsize / (1 if per_view else cfg.views.num_views)
        out[part] = out.get(part, 0.0) + size
    return out


def _time_batches(cfg: PipelineConfig, models, url: str) -> tuple[float | None, float | None]:
    """(decode seconds per image, all teachers' forward seconds per image) from the first tar's batches."""
    per_chunk = max(1, cfg.data.batch_size // cfg.views.num_views)
    chunks = tar_chunks(cfg, url, per_chunk)
    decode = forward = 0.0
    images = 0
    for i in itertools.count():
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        t1 = time.perf_counter()
        if chunk is None or chunk.error is not None:
            if chunk is not None:
                raise ShardReadError(chunk.error, url)
            break
        if not chunk.keys:
            if chunk.last:
                break
            continue
        _teacher_rows(cfg, models, chunk)
        t2 = time.perf_counter()
        if i > 0 or chunk.last:  # the first batch carries one-time costs; keep it only if it is all there is
            decode, forward, images = decode + t1 - t0, forward + t2 - t1, images + len(chunk.keys)
        if images >= TIMED_BATCHES * per_chunk or chunk.last:
            break
    chunks.close()
    if not images:
        return None, None
    return decode / images, forward / images


def dry_run(cfg: PipelineConfig) -> DryRun:
    """Everything `comad-extract` would find out before writing, and the estimates; writes nothing."""
    urls = check_locations(cfg, cfg.store.storage_options)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    models, metas = load_teachers(cfg, device)
    teachers = [{"name": n, "arch": cfg.teachers[n].arch, "format": cfg.teachers[n].format,
                 "weights": cfg.teachers[n].weights, "params": sum(p.numel() for p in m.parameters()),
                 "dim": metas[n].dim, "tokens": metas[n].tokens, "sha256": metas[n].weights_sha256}
                for n, m in models.items()]
    picks = sorted({0, len(urls) // 2, len(urls) - 1})[:SAMPLED_TARS] if urls else []
    sampled = {}
    for i in picks:
        try:
            sampled[urls[i]] = count_samples(urls[i], cfg.data.storage_options)
        except (OSError, tarfile.TarError, ValueError) as e:  # the run records such a tar as failed: say it here
            raise ShardReadError(f"cannot read input tar {urls[i]!r}: {type(e).__name__}: {e}", urls[i]) from e
    estimate = round(sum(sampled.values()) / len(sampled) * len(urls)) if sampled else 0
    decode_s, forward_s = _time_batches(cfg, models, urls[0]) if urls else (None, None)
    return DryRun(teachers, len(urls), sampled, estimate, bytes_per_view(cfg, {n: m.dim for n, m in metas.items()}),
                  decode_s, forward_s, int(os.environ.get("WORLD_SIZE", "1")), cfg.data.num_workers,
                  cfg.views.num_views)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_dry_run(cfg: PipelineConfig, r: DryRun) -> str:
    lines = [f"dry run of {cfg.source}: nothing written (store.root {cfg.store.root})", "teachers (loaded strictly):"]
    for t in r.teachers:
        lines.append(f"  {t['name']:<10} {t['arch']} ({t['format']}: {t['weights']}), {t['params']:,} "
                     f"parameters, width {t['dim']}, {t['tokens']} of {cfg.num_patches} tokens, "
                     f"weights sha256 {t['sha256'][:16]}")
    counted = ", ".join(f"{n}" for n in r.sampled.values())
    lines.append(f"inputs: {r.tars} tars; {len(r.sampled)} counted ({counted} samples) -> about "
                 f"{r.images_estimate} images, {r.images_estimate * r.views} views")
    lines.append(f"store: {_size(r.view_bytes)} per (sample, view) before compression ("
                 + "; ".join(f"{k} {_size(v)}" for k, v in r.bytes_per_view.items()) + f", {cfg.store.dtype}); "
                 f"about {_size(r.total_bytes)} in total")
    if r.seconds_estimate is None:
        lines.append("time: no decodable sample in the first tar to time")
    else:
        lines.append(f"time: decoding {r.decode_s_per_image * 1e3:.1f} ms and the teachers "
                     f"{r.forward_s_per_image * 1e3:.1f} ms per image ({r.views} views) on this machine -> about "
                     f"{_duration(r.seconds_estimate)} with {r.workers} decoding worker(s) and {r.processes} "
                     "process(es)")
    return "\n".join(lines)
