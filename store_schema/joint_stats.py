"""Cross-teacher statistics on co-visible tokens: what a shared (CCA) target basis is fitted from.

Every teacher's visible set contains the student's (V_s ⊆ V_k), so at a student-visible token all
teachers saw the same patch of the same view. Their features there, stacked side by side
[t_1 | t_2 | ... | t_T] (ΣD_k wide), give a joint mean and covariance whose off-diagonal blocks are the
cross-teacher covariances a multi-set CCA needs.

They are read back from the stored features (`comad-store joint-stats ROOT`, which extraction also
runs when it finishes) instead of being accumulated per unit during extraction: a per-unit ΣD² float64
record would be 42 MB per input tar for three ViT-B teachers, and a read-back is a deterministic
function of what the store holds, so a store written before this record existed gets it without a
teacher re-run. The sample is `store.joint_stats_samples` samples (view 0) from blocks taken in a
fixed pseudo-random order over all complete units, so it spreads over the whole store.

Layout: `<root>/stats_joint/{mean (ΣD,), m2 (ΣD, ΣD)}` float64; attribute `comad_joint` =
{teachers, dims, count, samples, view, units_digest}.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .stats import RunningStats
from .store import FeatureStore, StoreError

GROUP = "stats_joint"
ATTR = "comad_joint"
_ORDER_SEED = 20508  # the block order of the sample; fixed, so the same store gives the same statistics


class JointStatsMissing(StoreError):
    """The store has no (or no usable) cross-teacher statistics; the message names the command that adds them."""


def co_visible_rows(student_idx: np.ndarray, teacher_idx: np.ndarray, where: str) -> np.ndarray:
    """Positions (m, Ks) of each student token inside the teacher's sorted visible list (m, Kt)."""
    pos = np.stack([np.searchsorted(t, s) for s, t in zip(student_idx, teacher_idx)]).clip(max=teacher_idx.shape[1] - 1)
    if not np.array_equal(np.take_along_axis(teacher_idx, pos, 1), student_idx):
        raise StoreError(f"{where}: a student-visible token is not visible to the teacher (V_s ⊄ V_t); "
                         "the store is damaged: run `comad-store validate`")
    return pos


def compute_joint_stats(store: FeatureStore, max_samples: int = 0, view: int = 0) -> tuple[RunningStats, dict]:
    """Joint float64 statistics of all teachers' features at student-visible tokens.

    max_samples: samples to read (0 = every usable sample). Returns (stats over ΣD, record).
    """
    teachers = store.teachers
    dims = [store.teacher_meta(t).dim for t in teachers]
    chunk = int(store.meta["chunk_samples"])
    units = store.units()
    blocks = [(u, s) for u in units for s in range(0, u.n_samples, chunk)]
    order = np.random.default_rng(_ORDER_SEED).permutation(len(blocks))
    stats, samples = RunningStats(sum(dims)), 0
    for b in order:
        if max_samples and samples >= max_samples:
            break
        u, start = blocks[b]
        stop = min(start + chunk, u.n_samples)
        rows = np.arange(start, stop)
        rows = rows[~np.isin(rows, np.asarray(u.excluded_rows, dtype=np.int64))] - start
        if max_samples:
            rows = rows[: max_samples - samples]
        if rows.size == 0:
            continue
        data = store.read_block(u.name, start, stop, view, teachers=teachers, pixels=False, meta=False, cls=False)
        s_idx = data["student_idx"][rows]
        parts = []
        for t in teachers:
            got = data["teachers"][t]
            pos = co_visible_rows(s_idx, got["idx"][rows], f"{store.root}: unit {u.name} rows {start}-{stop}")
            parts.append(np.take_along_axis(got["patch"][rows], pos[..., None], 1))  # (m, Ks, D_t)
        stats.update(np.concatenate(parts, -1).reshape(-1, stats.dim))
        samples += int(rows.size)
    if stats.count < 2:
        raise StoreError(f"{store.root}: too few samples ({samples}) for cross-teacher statistics")
    _, digest = store.units_digest()
    record = {"teachers": teachers, "dims": dims, "count": stats.count, "samples": samples, "view": view,
              "max_samples": max_samples, "units_digest": digest}
    return stats, record


def write_joint_stats(store: FeatureStore, stats: RunningStats, record: dict[str, Any]) -> None:
    """Store the statistics (single writer); the record is invalidated first, so stale arrays never pair with it."""
    g = store.group.require_group(GROUP)
    g.attrs.put({ATTR: {"status": "writing"}})
    for name, value in (("mean", stats.mean), ("m2", stats.m2)):
        g.create_array(name, data=value, chunks=value.shape, compressors=None, overwrite=True)
    g.attrs.put({ATTR: {**record, "status": "complete"}})


def fit_joint_stats(store: FeatureStore, max_samples: int = 0) -> dict[str, Any]:
    """compute + write; returns the record."""
    stats, record = compute_joint_stats(store, max_samples)
    write_joint_stats(store, stats, record)
    return record


def joint_stats_record(store: FeatureStore) -> dict[str, Any] | None:
    if GROUP not in store.group:
        return None
    rec = dict(store.group[GROUP].attrs).get(ATTR)
    return rec if isinstance(rec, dict) and rec.get("status") == "complete" else None


def read_joint_stats(store: FeatureStore, teachers: list[str]) -> tuple[RunningStats, list[int], dict[str, Any]]:
    """The joint statistics restricted to `teachers` (in that order): (stats, dims, record).

    Raises JointStatsMissing, naming the command that computes them from the stored features.
    """
    rec = joint_stats_record(store)
    fix = f"run `comad-store joint-stats {store.root}` (reads the stored features; no teacher runs again)"
    if rec is None:
        raise JointStatsMissing(f"{store.root} has no cross-teacher statistics (written by comad-extract since "
                                f"the shared-basis change, or interrupted): {fix}")
    missing = [t for t in teachers if t not in rec["teachers"]]
    if missing:
        raise JointStatsMissing(f"{store.root}: the cross-teacher statistics do not cover teacher(s) {missing} "
                                f"(added after they were computed): {fix}")
    g = store.group[GROUP]
    mean, m2 = np.asarray(g["mean"][:]), np.asarray(g["m2"][:])
    offsets = np.concatenate([[0], np.cumsum(rec["dims"])])
    cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in map(rec["teachers"].index, teachers)])
    dims = [int(rec["dims"][rec["teachers"].index(t)]) for t in teachers]
    return RunningStats(len(cols), int(rec["count"]), mean[cols], m2[np.ix_(cols, cols)]), dims, rec
