"""Shared by the extraction tests: tiny teachers saved in their official formats, tiny input tars, configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tomllib
import torch
from conftest import TINY_VIT, tiny_config
from wds_fixtures import good_samples, write_tar

from store_schema.config import PipelineConfig
from store_schema.shards import Sample, iter_tar
from vit_layers.checkpoint_writers import save_in_official_format
from vit_layers.checkpoints import build_vit

FORMATS = {"mae": "mae", "mocov3": "mocov3", "ibot": "ibot"}  # each teacher in its own official layout


def make_teachers(tmp_path: Path) -> dict[str, Path]:
    """Random tiny ViTs (img 32, patch 8, 32-d) saved as {tmp}/ckpt/<name>.pth in that teacher's format."""
    kwargs = tomllib.loads(f"v = {TINY_VIT}")["v"]  # the arch_kwargs tiny_config gives every teacher
    (tmp_path / "ckpt").mkdir(parents=True, exist_ok=True)
    out = {}
    for seed, (name, fmt) in enumerate(FORMATS.items()):
        path = tmp_path / "ckpt" / f"{name}.pth"
        if not path.exists():
            torch.manual_seed(100 + seed)
            model = build_vit("vit_base_patch16_224", kwargs, 32, 8)
            save_in_official_format(model.state_dict(), str(path), fmt)
        out[name] = path
    return out


def write_tars(tmp_path: Path, sizes: list[int], prefix: str = "train") -> list[Path]:
    """Tars {tmp}/data/{prefix}-00000i.tar of good RGB samples (sizes 20..40 px, labels), keys unique overall."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        samples = good_samples(n, start=start, size=(20 + 5 * (i % 5), 40 - 4 * (i % 4)), fmt="png")
        paths.append(write_tar(tmp_path / "data" / f"{prefix}-{i:06d}.tar", samples))
        start += n
    return paths


def extract_config(tmp_path: Path, tars: list[Path], extra: list[str] | tuple[str, ...] = (),
                   store: str = "store") -> PipelineConfig:
    make_teachers(tmp_path)
    urls = "[" + ", ".join(f'"{p}"' for p in tars) + "]"
    over = [f"data.urls={urls}", f'store.root="{tmp_path / store}"', "data.max_failure_fraction=1.0"]
    over += [f'teachers.{t}.format="{fmt}"' for t, fmt in FORMATS.items()]
    return tiny_config(tmp_path, over + list(extra))


def decoded(url: str | Path) -> dict[str, Sample]:
    """key -> decoded Sample of one tar (the reference the stored pixels and features are checked against)."""
    return {s.key: s for s in iter_tar(str(url), 89478485) if isinstance(s, Sample)}


def read_unit(store, unit: str, view: int) -> dict:
    rec = store.unit_record(unit)
    return {"keys": rec["keys"], **store.read_block(unit, 0, rec["n_samples"], view)}


def all_rows(store) -> dict[tuple[str, int], dict]:
    """(key, view) -> that row's stored arrays, over every complete unit (excluded rows left out)."""
    out = {}
    for u in store.units():
        excluded = set(u.excluded_rows)
        for v in range(store.num_views):
            block = read_unit(store, u.name, v)
            for r, key in enumerate(block["keys"]):
                if r in excluded:
                    continue
                out[(key, v)] = {
                    "unit": u.name, "source": u.source,
                    "index": int(block["index"][r]), "label": int(block["label"][r]),
                    "views": block["views"][r], "student_idx": block["student_idx"][r], "pixels": block["pixels"][r],
                    "teachers": {t: {f: np.asarray(a[r]) for f, a in d.items()} for t, d in block["teachers"].items()},
                }
    return out
