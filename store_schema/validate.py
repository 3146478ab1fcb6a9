"""Validate a feature store against the layout in store_schema/README.md.

`validate_store` reads every array of every complete unit one block of `chunk_samples` rows at a time
(memory stays at one block), and reports what is wrong and where as `Problem`s — a damaged store gives
a report, never a traceback. zarr returns fill values for a missing shard file, so shard files are
checked against the store listing instead of trusting a read. `inspect_store` is in inspection.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec

from .choices import FEATURE_DTYPES
from .codec import decode_features
from .config import ConfigError, stored_config
from .fingerprint import SCHEMA_VERSION
from .inspection import FAILED, RUNS_GROUP, expected_arrays, failure_reason, object_sizes
from .stats import RunningStats
from .store import TEACHER_ATTR, FeatureStore, StoreError


# How far a unit's recorded statistics (computed on float32 before encoding) may sit from the decoded
# features', in per-channel standard deviations (mean) and relative variance: the storage dtype's error.
STATS_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "int8": 0.1}


@dataclass(frozen=True)
class Problem:
    where: str  # node in the store: "" (root), "units/<u>", "units/<u>/teachers/<t>/patch", "stats/<t>"
    what: str  # what is wrong, with the first place that shows it
    count: int = 1  # blocks, shards or rows with the same fault, folded into one problem

    def __str__(self) -> str:
        more = f" [{self.count} times]" if self.count > 1 else ""
        return f"{self.where or '<root>'}: {self.what}{more}"


class _Report:
    """Problems folded by (where, kind): the first detail is kept, repeats are counted."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], list] = {}

    def add(self, where: str, kind: str, detail: str = "") -> None:
        entry = self.found.setdefault((where, kind), [detail[:300], 0])
        entry[1] += 1

    def problems(self) -> list[Problem]:
        return [Problem(w, f"{k}: {d}" if d else k, c) for (w, k), (d, c) in self.found.items()]


def open_unchecked(root: str, storage_options: dict | None = None) -> FeatureStore:
    """Open any CoMAD store without the schema-version check; StoreError when there is none at root."""
    try:
        group = zarr.open_group(root, mode="r", storage_options=storage_options)
    except Exception as e:  # missing path, bad URL, refused connection, not a zarr group
        raise StoreError(f"cannot open {root!r} as a zarr group ({type(e).__name__}: {e}); "
                         "check the path and --storage-option values") from None
    return FeatureStore(group, root)


# ---------------------------------------------------------------------------------------------- validate

def validate_store(root: str, storage_options: dict | None = None,
                   checked: dict[str, int] | None = None) -> list[Problem]:
    """Everything wrong with the store at root, each named with where it is; [] for a clean store.

    Raises StoreError only when root is not a CoMAD store at all. `checked`, when given, is filled
    with what was read: units, rows, arrays, bytes.
    """
    store = open_unchecked(root, storage_options)
    rep = _Report()
    counts = {"units": 0, "rows": 0, "arrays": 0, "bytes": 0}
    if _check_root(store.meta, rep):
        try:
            names = store.unit_names()
        except Exception as e:
            rep.add("units", "the units group cannot be listed", f"{type(e).__name__}: {e}")
            names = []
        complete, unit_stats, key_rows = [], {}, {}
        for name in names:
            try:
                info, rec = store.unit_info(name), store.unit_record(name)
                if rec.get("status") == FAILED:
                    rep.add(f"units/{name}", "failed unit: its input tar was not read",
                            f"source {info.source}: {failure_reason(rec)}; readers ignore "
                            "it; fix the cause and rerun comad-extract to retry it")
                    continue
                if not info.complete:
                    _report_incomplete(store, info, rep)
                    continue
                complete.append(name)
                unit_stats[name] = _check_unit(store, name, rep, counts, key_rows)
            except Exception as e:  # a unreadable record or group: report, go on with the others
                rep.add(f"units/{name}", "cannot be read", f"{type(e).__name__}: {e}")
        _check_final_stats(store, complete, unit_stats, rep)
        _check_runs(store, rep)
    if checked is not None:
        checked.update(counts)
    return rep.problems()


def _check_runs(store: FeatureStore, rep: _Report) -> None:
    """extract_runs, when present: a group whose attrs["runs"] is a list of summaries (dicts)."""
    try:
        if RUNS_GROUP not in store.group:
            return
        node = store.group[RUNS_GROUP]
        runs = dict(node.attrs).get("runs") if isinstance(node, zarr.Group) else None
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            rep.add(RUNS_GROUP, "run summaries are not a list of records",
                    f"expected a group with attrs['runs'] = [{{...}}, ...], found {type(node).__name__} "
                    f"with runs = {runs!r}"[:200])
    except Exception as e:
        rep.add(RUNS_GROUP, "run summaries cannot be read", f"{type(e).__name__}: {e}")


_ROOT_FIELDS = {"schema_version": str, "fingerprint": dict, "teachers": dict, "teacher_order": list,
                "num_views": int, "image_size": int, "patch_size": int, "num_patches": int,
                "student_tokens": int, "dtype": str, "compression": str, "compression_level": int,
                "chunk_samples": int, "shard_samples": int, "config": dict}


def _check_root(meta: dict[str, Any], rep: _Report) -> bool:
    """Root record checks; False when the units cannot be interpreted (fields missing, other schema)."""
    for k, typ in _ROOT_FIELDS.items():
        v = meta.get(k)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            rep.add("", f"root attribute comad.{k} is missing or not a {typ.__name__}", f"found {v!r}"[:80])
    if rep.found:
        return False
    if meta["schema_version"].split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        rep.add("", f"schema version {meta['schema_version']} is not readable by this code (schema "
                f"{SCHEMA_VERSION})", "re-extract, or use the pipeline version that wrote it")
        return False
    n, ks, grid = meta["num_patches"], meta["student_tokens"], meta["image_size"] // max(meta["patch_size"], 1)
    usable = True
    if n != grid * grid or not 1 <= ks < n:
        rep.add("", "inconsistent token counts", f"num_patches {n}, grid {grid}, student_tokens {ks}")
    if meta["dtype"] not in FEATURE_DTYPES:
        rep.add("", "unknown feature dtype", f"{meta['dtype']!r}, not one of {FEATURE_DTYPES}")
        usable = False
    if meta["shard_samples"] < 1 or meta["chunk_samples"] < 1 or meta["shard_samples"] % meta["chunk_samples"]:
        rep.add("", "shard_samples must be a positive multiple of chunk_samples",
                f"{meta['shard_samples']} and {meta['chunk_samples']}")
        usable = False
    if sorted(meta["teacher_order"]) != sorted(meta["teachers"]):
        rep.add("", "teacher_order does not list the teachers",
                f"{meta['teacher_order']} vs {sorted(meta['teachers'])}")
        usable = False
    fp_teachers = meta["fingerprint"].get("teachers", {})
    for t, tm in meta["teachers"].items():
        if not (isinstance(tm.get("dim"), int) and tm["dim"] >= 1 and isinstance(tm.get("tokens"), int)):
            rep.add("", f"teacher {t!r} record lacks an integer dim/tokens", repr(tm))
            usable = False
        elif not ks < tm["tokens"] <= n:
            rep.add("", f"teacher {t!r} keeps {tm['tokens']} tokens",
                    f"must be above the student's {ks} and at most {n}")
        if fp_teachers.get(t, {}).get("tokens") != tm.get("tokens"):
            rep.add("", f"fingerprint of teacher {t!r} disagrees with its record",
                    f"tokens {fp_teachers.get(t, {}).get('tokens')} vs {tm.get('tokens')}")
    for k in ("image_size", "patch_size", "num_patches", "student_tokens"):
        if meta["fingerprint"].get(k) != meta[k]:
            rep.add("", f"fingerprint {k} disagrees with the root record", f"{meta['fingerprint'].get(k)} vs {meta[k]}")
    try:
        cfg = stored_config(meta["config"], source="comad.config")
        if cfg.views.num_views != meta["num_views"] or cfg.store.dtype != meta["dtype"]:
            rep.add("", "the stored config disagrees with the root record", "views.num_views or store.dtype")
    except (ConfigError, TypeError, KeyError) as e:
        rep.add("", "the stored config does not load", str(e))
    return usable


def _report_incomplete(store: FeatureStore, info: Any, rep: _Report) -> None:
    status = store.unit_record(info.name).get("status", "missing")
    lacking = [t for t in store.teachers if t not in info.teachers_complete]
    rep.add(f"units/{info.name}", "incomplete unit",
            f"source {info.source}: unit record status {status!r}"
            + (f", teachers not complete: {', '.join(lacking)}" if lacking else "")
            + "; readers ignore it and comad-extract redoes it on resume")


def _check_unit(store: FeatureStore, name: str, rep: _Report, counts: dict[str, int],
                key_rows: dict[str, tuple[str, int]]) -> dict[str, RunningStats] | None:
    """All checks of one complete unit; returns its per-teacher statistics (None where unreadable)."""
    where = f"units/{name}"
    n = _check_unit_keys(store, name, rep, key_rows)
    if n is None:
        return None
    arrays, bad_shards = _open_unit_arrays(store, where, n, rep, counts)
    sums = _scan_unit_rows(store, where, n, arrays, bad_shards, rep)
    return {t: _check_unit_stats(store, name, t, n, sums[t], rep) for t in store.teachers}


def _check_unit_keys(store: FeatureStore, name: str, rep: _Report, key_rows: dict[str, tuple[str, int]]) -> int | None:
    """The unit record: n_samples, keys, excluded rows, keys unique across units; n (None if inconsistent)."""
    where = f"units/{name}"
    rec = store.unit_record(name)
    n = rec.get("n_samples")
    keys, excluded = rec.get("keys"), set(rec.get("excluded_rows", []))
    if not isinstance(n, int) or n < 0 or not isinstance(keys, list) or len(keys) != n:
        rep.add(where, "unit record is inconsistent", f"n_samples {n!r} with {len(keys or [])} keys")
        return None
    if any(not isinstance(r, int) or not 0 <= r < n for r in excluded):
        rep.add(where, "excluded_rows outside [0, n_samples)", f"{sorted(excluded, key=str)[:5]}")
    for row, key in enumerate(keys):
        if row in excluded:
            continue
        if key in key_rows:
            other, orow = key_rows[key]
            rep.add(where, "duplicate key", f"{key!r} (row {row}) is also row {orow} of {other}")
        else:
            key_rows[key] = (where, row)
    return n


def _open_unit_arrays(store: FeatureStore, where: str, n: int, rep: _Report,
                      counts: dict[str, int]) -> tuple[dict[str, zarr.Array], dict[str, set[int]]]:
    """The unit's arrays that open with the expected shape and dtype, and each one's bad shard files."""
    meta, V, S = store.meta, store.num_views, store.meta["shard_samples"]
    group, sizes = store.group[where], object_sizes(store, f"{where}/")
    arrays, bad_shards = {}, {}
    for path, (row_shape, dtype, per_view) in expected_arrays(meta).items():
        a = _open_array(group, path, (n, V, *row_shape) if per_view else (n, *row_shape), dtype,
                        (S, V, *row_shape) if per_view else (S,), f"{where}/{path}", rep)
        if a is not None:
            arrays[path] = a
            bad_shards[path] = _check_shard_files(a, n, S, sizes, f"{where}/{path}", rep)
    counts["units"] += 1
    counts["rows"] += n
    counts["arrays"] += len(arrays)
    counts["bytes"] += sum(sizes.values())
    return arrays, bad_shards


def _scan_unit_rows(store: FeatureStore, where: str, n: int, arrays: dict[str, zarr.Array],
                    bad_shards: dict[str, set[int]], rep: _Report) -> dict[str, list | None]:
    """Every row of the unit, chunk by chunk; returns per teacher [count, sum, sum of squares] of the
    decoded patch features, None once unusable."""
    S, C, N = store.meta["shard_samples"], store.meta["chunk_samples"], store.meta["num_patches"]

    def read(path: str, a: int, b: int) -> np.ndarray | None:
        if path not in arrays or (a // S) in bad_shards[path]:
            return None
        try:
            return arrays[path][a:b]
        except Exception as e:  # a decode or checksum error: corrupt bytes in that shard
            rep.add(f"{where}/{path}", "cannot be read (corrupt shard or chunk)",
                    f"rows {a}-{b}: {type(e).__name__}: {e}")
            return None

    sums = {t: [0, 0.0, 0.0] for t in store.teachers}
    sample_index = []
    for a in range(0, n, C):
        b = min(n, a + C)
        read("student_pixels", a, b)  # uint8 has no invalid value: readability is all there is to check
        for path, (kind, is_bad) in _ROW_CHECKS.items():
            x = read(path, a, b)
            if x is not None:
                _flag(rep, f"{where}/{path}", kind, is_bad(x), a)
                if path == "index":
                    sample_index.append(x)
        sidx = read("student_idx", a, b)
        sidx_ok = sidx is not None and _check_idx(rep, f"{where}/student_idx", sidx, N, a)
        for t in store.teachers:
            _check_teacher_block(store, f"{where}/teachers/{t}", lambda p: read(f"teachers/{t}/{p}", a, b),
                                 sidx if sidx_ok else None, a, sums, t, rep)
    if sample_index and sum(len(x) for x in sample_index) == n:
        repeats = n - len(np.unique(np.concatenate(sample_index)))
        if repeats:
            rep.add(f"{where}/index", "a sample index appears twice", f"{repeats} repeats")
    return sums


_ROW_CHECKS = {
    "index": ("negative sample index", lambda x: x < 0),
    "label": ("label outside -1 (none) .. 2^31 - 1", lambda x: (x < -1) | (x > 2**31 - 1)),
    "views": ("view parameters not finite or outside [0, 1]", lambda x: ~(np.isfinite(x) & (x >= 0) & (x <= 1))),
}


def _check_teacher_block(store: FeatureStore, where: str, read: Any, sidx: np.ndarray | None, row0: int,
                         sums: dict[str, Any], t: str, rep: _Report) -> None:
    """One block of one teacher: indices (and ⊇ student's), int8 scales, finite features, running sums."""
    N, int8 = store.meta["num_patches"], store.meta["dtype"] == "int8"
    tidx = read("idx")
    if tidx is not None and _check_idx(rep, f"{where}/idx", tidx, N, row0) and sidx is not None:
        mask = np.zeros(tidx.shape[:-1] + (N,), bool)
        np.put_along_axis(mask, tidx.astype(np.int64), True, axis=-1)
        covered = np.take_along_axis(mask, sidx.astype(np.int64), axis=-1).all(-1)
        _flag(rep, f"{where}/idx", "does not contain every student-visible index", ~covered, row0)
    for part in ("patch", "cls"):
        raw, scale = read(part), read(f"{part}_scale") if int8 else None
        if scale is not None:
            bad_scale = ~(np.isfinite(scale) & (scale >= 0))
            _flag(rep, f"{where}/{part}_scale", "scale not finite or negative", bad_scale, row0)
        if raw is None or (int8 and scale is None):
            if part == "patch":
                sums[t] = None
            continue
        x = decode_features(raw, scale)
        finite = np.isfinite(x).all(-1)
        _flag(rep, f"{where}/{part}", "non-finite features", ~finite, row0)
        if part == "patch" and not finite.all():
            sums[t] = None  # already reported; the statistics cannot be compared
        elif part == "patch" and sums[t] is not None:
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[t] = [sums[t][0] + len(flat), sums[t][1] + flat.sum(0), sums[t][2] + (flat * flat).sum(0)]


def _open_array(group: zarr.Group, path: str, shape: tuple, dtype: str, shards: tuple, where: str,
                rep: _Report) -> zarr.Array | None:
    try:
        a = group[path]
    except KeyError:
        rep.add(where, "array missing")
        return None
    except Exception as e:
        rep.add(where, "array metadata cannot be read", f"{type(e).__name__}: {e}")
        return None
    if not isinstance(a, zarr.Array) or a.shape != shape or str(a.dtype) != dtype:
        got = (a.shape, str(a.dtype)) if isinstance(a, zarr.Array) else "a group"
        rep.add(where, "wrong shape or dtype", f"found {got}, expected {(shape, dtype)}")
        return None
    if a.shards != shards or not isinstance(a.metadata.codecs[0], ShardingCodec):
        rep.add(where, "wrong shard shape", f"found {a.shards}, expected {shards}")
        return None
    return a


def _check_shard_files(a: zarr.Array, n: int, S: int, sizes: dict[str, int], where: str, rep: _Report) -> set[int]:
    """Shard numbers whose file is missing or shorter than its own index (zarr reads both as fill)."""
    codec = a.metadata.codecs[0]
    inner = math.prod(s // c for s, c in zip(a.shards, a.chunks))
    index_bytes = 16 * inner + (4 if any(isinstance(c, Crc32cCodec) for c in codec.index_codecs) else 0)
    bad = set()
    for i in range(-(-n // S)):
        key = f"{a.path}/" + a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))
        rows = f"rows {i * S}-{min(n, (i + 1) * S)}"
        if key not in sizes:
            rep.add(where, "missing shard file", f"{key} ({rows}); zarr would return fill values for it")
            bad.add(i)
        elif sizes[key] < index_bytes:
            rep.add(where, "truncated shard file", f"{key} ({rows}) has {sizes[key]} bytes, less than its "
                    f"{index_bytes}-byte index; zarr would return fill values for it")
            bad.add(i)
    return bad


def _flag(rep: _Report, where: str, kind: str, bad: np.ndarray, row0: int) -> None:
    """Report `kind` when any entry of `bad` (rows first) is set, naming the first bad row."""
    if bad.any():
        row = row0 + int(np.argwhere(bad)[0][0])
        rep.add(where, kind, f"first at row {row}, {int(bad.sum())} entries in rows {row0}-{row0 + len(bad)}")


def _check_idx(rep: _Report, where: str, idx: np.ndarray, n: int, row0: int) -> bool:
    out_of_range = ((idx < 0) | (idx >= n)).any(-1)
    _flag(rep, where, f"token index out of range [0, {n})", out_of_range, row0)
    unsorted = (np.diff(idx.astype(np.int64), axis=-1) <= 0).any(-1)
    _flag(rep, where, "token indices not strictly increasing (unsorted or repeated)", unsorted, row0)
    return not (out_of_range.any() or unsorted.any())


def _check_unit_stats(store: FeatureStore, name: str, t: str, n: int, sums: list | None,
                      rep: _Report) -> RunningStats | None:
    """The unit's recorded statistics: count, shapes, symmetry, and agreement with the decoded features."""
    where = f"units/{name}/teachers/{t}"
    tm, V = store.meta["teachers"][t], store.num_views
    try:
        s = store.unit_stats(name, t)
    except Exception as e:
        rep.add(where, "statistics cannot be read", f"{type(e).__name__}: {e}")
        return None
    if s.count != n * V * tm["tokens"]:
        rep.add(where, "statistics count is wrong", f"{s.count}, expected n·V·Kt = {n * V * tm['tokens']}")
    if s.mean.shape != (tm["dim"],) or s.m2.shape != (tm["dim"], tm["dim"]):
        rep.add(where, "statistics have the wrong shape", f"mean {s.mean.shape}, m2 {s.m2.shape}")
        return None
    if not (np.isfinite(s.mean).all() and np.isfinite(s.m2).all()) or not np.allclose(s.m2, s.m2.T) \
            or (np.diag(s.m2) < -1e-6 * (1 + np.abs(s.m2).max())).any():
        rep.add(where, "statistics are not finite, or m2 is not symmetric with a non-negative diagonal")
        return None
    if sums is not None and sums[0] == s.count and s.count > 0:
        mean = sums[1] / sums[0]
        var = np.maximum(sums[2] / sums[0] - mean * mean, 0)
        tol = STATS_TOLERANCE[store.meta["dtype"]]
        # Channels far smaller than the rest carry the storage dtype's error at the scale of the rest.
        sd = np.sqrt(var) + np.sqrt(var.mean()) + 1e-12
        stored_var = np.diag(s.m2) / s.count
        if (np.abs(mean - s.mean) > tol * sd).any() or (np.abs(var - stored_var) > tol * (var + var.mean())).any():
            c = int(np.argmax(np.abs(mean - s.mean) / sd))
            rep.add(where, "statistics disagree with the stored features",
                    f"channel {c}: recorded mean {s.mean[c]:.4g}, features give {mean[c]:.4g} (sd {sd[c]:.3g})")
    return s


def _check_final_stats(store: FeatureStore, complete: list[str], unit_stats: dict[str, Any], rep: _Report) -> None:
    for t in store.teachers:
        where = f"stats/{t}"
        try:
            if where not in store.group:
                rep.add(where, "finalised statistics missing",
                        "comad-extract writes them when a run finishes; readers merge the units' meanwhile")
                continue
            rec = dict(store.group[where].attrs).get(TEACHER_ATTR, {})
            if rec.get("units_digest") != store.units_digest()[1]:
                rep.add(where, "finalised statistics are stale",
                        f"they cover {rec.get('n_units')} units, the store has {len(complete)} complete units; "
                        "rerun comad-extract to finalise them")
                continue
            parts = [unit_stats.get(u, {}) or {} for u in complete]
            if any(p.get(t) is None for p in parts):
                continue  # a unit's statistics are already reported as unreadable
            merged = RunningStats(store.teacher_meta(t).dim)
            for p in parts:
                merged.merge(p[t])
            g = store.group[where]
            mean, m2, cov = g["mean"][:], g["m2"][:], g["cov"][:]
            scale = 1e-9 * (1 + np.abs(merged.m2).max())
            if rec.get("count") != merged.count or mean.shape != merged.mean.shape or m2.shape != merged.m2.shape \
                    or not np.allclose(mean, merged.mean, rtol=1e-9, atol=1e-9 * (1 + np.abs(merged.mean).max())) \
                    or not np.allclose(m2, merged.m2, rtol=1e-9, atol=scale) \
                    or not np.allclose(cov, merged.cov, rtol=1e-9, atol=scale):
                rep.add(where, "finalised statistics are not the merge of the units'",
                        f"count {rec.get('count')} vs {merged.count}")
        except Exception as e:
            rep.add(where, "finalised statistics cannot be read", f"{type(e).__name__}: {e}")
