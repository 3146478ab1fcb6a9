"""Fabricated store contents for tests of the store contract and its readers."""
from __future__ import annotations

import numpy as np

from store_schema.config import PipelineConfig
from store_schema.store import FeatureStore, TeacherMeta
from store_schema.writer import TeacherRows, UnitRows, UnitWriter, split_rows

TEACHER_DIM = 32


def teacher_meta(cfg: PipelineConfig, dim: int = TEACHER_DIM) -> dict[str, TeacherMeta]:
    return {t: TeacherMeta(dim, cfg.teacher_tokens(t), f"sha-{t}") for t in cfg.teachers}


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """ViT-like features: Student-t channels with a few channels an order of magnitude larger."""
    x = rng.standard_t(df=3, size=shape).astype(np.float32)
    x[..., :2] *= 12.0
    return x + rng.normal(0, 0.5, size=shape[-1]).astype(np.float32)


def make_rows(cfg: PipelineConfig, keys: list[str], rng: np.random.Generator, start_index: int = 0,
              teachers: list[str] | None = None, dim: int = TEACHER_DIM, base: bool = True) -> UnitRows:
    m, V, N = len(keys), cfg.views.num_views, cfg.num_patches
    p, ks = cfg.data.patch_size, cfg.student_tokens
    sidx = np.stack([np.stack([np.sort(rng.choice(N, ks, replace=False)) for _ in range(V)]) for _ in range(m)])
    trows = {}
    for t in teachers or list(cfg.teachers):
        kt = cfg.teacher_tokens(t)
        idx = np.zeros((m, V, kt), dtype=np.int64)
        for i in range(m):
            for v in range(V):
                rest = np.setdiff1d(np.arange(N), sidx[i, v])
                idx[i, v] = np.sort(np.concatenate([sidx[i, v], rng.choice(rest, kt - ks, replace=False)]))
        trows[t] = TeacherRows(idx, heavy_tailed(rng, (m, V, kt, dim)), heavy_tailed(rng, (m, V, dim)))
    return UnitRows(
        keys=list(keys), index=np.arange(start_index, start_index + m, dtype=np.int64),
        label=rng.integers(-1, 10, size=m).astype(np.int64) if base else None,
        views=rng.random((m, V, 5), dtype=np.float32) if base else None,
        student_idx=sidx if base else None,
        student_pixels=rng.integers(0, 256, size=(m, V, ks, 3, p, p), dtype=np.uint8) if base else None,
        teachers=trows)


def write_unit(store: FeatureStore, cfg: PipelineConfig, source: str, n: int, seed: int = 0,
               batch: int = 5) -> UnitRows:
    """Write n samples in uneven batches; returns everything written, for comparison."""
    rng = np.random.default_rng(seed)
    keys = [f"{source.rsplit('/', 1)[-1]}-{i:05d}" for i in range(n)]
    rows = make_rows(cfg, keys, rng)
    w = UnitWriter(store, source)
    rest = rows
    while len(rest):
        head, rest = split_rows(rest, min(batch, len(rest)))
        w.append(head)
    w.commit()
    return rows
