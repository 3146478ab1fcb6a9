"""Shared set-up for the benchmarks: ViT-B/16 teachers saved as local checkpoints, synthetic WebDataset tars."""
from __future__ import annotations

import io
import json
import platform
import statistics
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from store_schema.config import PipelineConfig, load_config
from vit_layers.checkpoints import build_vit

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def write_teacher_checkpoints(cfg: PipelineConfig, out: Path, seed: int = 0) -> list[str]:
    """Random-weight teachers of the configured architectures, saved as plain state dicts (the real load path)."""
    out.mkdir(parents=True, exist_ok=True)
    overrides = []
    for i, (name, t) in enumerate(cfg.teachers.items()):
        torch.manual_seed(seed + i)
        model = build_vit(t.arch, t.arch_kwargs, cfg.data.image_size, cfg.data.patch_size)
        path = out / f"{name}.pth"
        torch.save(model.state_dict(), path)
        overrides += [f'teachers.{name}.format="state_dict"', f'teachers.{name}.weights="{path}"']
    return overrides


def write_image_tars(out: Path, n_images: int, per_tar: int, size: int = 256, seed: int = 0) -> list[str]:
    """Smooth random JPEGs (decode cost like real photos) with labels, `per_tar` samples per tar."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls = []
    for t in range((n_images + per_tar - 1) // per_tar):
        path = out / f"bench-{t:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(t * per_tar, min(n_images, (t + 1) * per_tar)):
                low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def bench_config(overrides: list[str]) -> PipelineConfig:
    return load_config(REPO / "pipeline.toml", overrides)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[float]]:
    """(median, all) seconds of `repeats` calls of fn after `warmup` untimed ones; `clock`: wall by default
    (time.process_time: this process's CPU seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times), times


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def print_json(name: str, payload: dict) -> None:
    print("BENCH_JSON " + json.dumps({"benchmark": name, "machine": machine(), **payload}, sort_keys=True))
