"""What a feature store holds: `inspect_store`'s numbers, and the layout facts validate.py shares.

`expected_arrays` (the data arrays of one unit, from the root record), `object_sizes` (one listing),
the `extract_runs` group and the "failed" unit status are read here and checked in validate.py.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from .layout import unit_arrays
from .lock import LOCK_KEY
from .skips import count_kinds
from .store import TEACHER_ATTR, FeatureStore

RUNS_GROUP = "extract_runs"  # attrs["runs"]: comad-extract appends one summary (a dict) per finished run
FAILED = "failed"  # unit status of an input tar that could not be read; the reason is its one skip record


def expected_arrays(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """Data arrays of one unit (store_schema.layout): path -> (shape after the row (and view) axis, dtype,
    per_view)."""
    return {a.path: (a.row_shape, a.dtype, a.per_view) for a in unit_arrays(meta)}


def object_sizes(store: FeatureStore, prefix: str) -> dict[str, int]:
    """Size of every object under `prefix` (keys relative to the zarr store root), from one listing."""
    zstore, base_path = store.group.store, store.group.path
    full = f"{base_path}/{prefix}" if base_path else prefix
    if isinstance(zstore, FsspecStore):  # one LIST with sizes instead of a HEAD per object
        base = zstore.path.rstrip("/")
        try:
            found = sync(zstore.fs._find(f"{base}/{full.rstrip('/')}", detail=True))
            return {k[len(base) + 1:]: int(v.get("size") or 0) for k, v in found.items()}
        except (AttributeError, NotImplementedError):
            pass

    async def listing() -> dict[str, int]:
        return {k: await zstore.getsize(k) async for k in zstore.list_prefix(full)}
    return sync(listing())


# ---------------------------------------------------------------------------------------------- inspect

def inspect_store(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Numbers that describe a store: samples, views, teachers, dtype, sizes, units, skipped inputs
    (each record, and `skipped_by_kind`: {kind: count}, store_schema/skips.py).

    Sizes count the data arrays of complete units: stored_bytes (chunk/shard files) against
    decoded_bytes (the arrays in memory); stored_fraction = stored / decoded; bytes_per_view =
    stored_bytes / (rows · views), also split per part (student, each teacher).
    """
    store = FeatureStore.open(root, storage_options=storage_options)
    meta, V = store.meta, store.num_views
    runs = run_summaries(store)
    infos = store.units(complete_only=False)
    complete = [u for u in infos if u.complete]
    digest = store.units_digest()[1]  # once, not per teacher: it reads every unit record
    rows = sum(u.n_samples for u in complete)
    arrays = expected_arrays(meta)
    stored = {part: 0 for part in ["student", *store.teachers]}
    decoded = 0
    for u in complete:
        sizes = object_sizes(store, f"units/{u.name}/")
        for path, (row, dtype, per_view) in arrays.items():
            part = path.split("/")[1] if path.startswith("teachers/") else "student"
            chunk_prefix = f"{store.group.path + '/' if store.group.path else ''}units/{u.name}/{path}/c/"
            stored[part] += sum(s for k, s in sizes.items() if k.startswith(chunk_prefix))
            decoded += u.n_samples * (V if per_view else 1) * math.prod(row) * np.dtype(dtype).itemsize
    total = sum(stored.values())
    per_view = lambda b: b / (rows * V) if rows else 0.0  # noqa: E731
    skipped = store.skipped()
    return {
        "root": root, "schema_version": meta["schema_version"], "created": meta.get("created"),
        "samples": rows - sum(len(u.excluded_rows) for u in complete), "rows": rows, "views": V,
        "image_size": meta["image_size"], "patch_size": meta["patch_size"], "num_patches": meta["num_patches"],
        "student_tokens": meta["student_tokens"],
        "teachers": {t: dict(meta["teachers"][t]) for t in store.teachers},
        "dtype": meta["dtype"], "compression": meta["compression"], "compression_level": meta["compression_level"],
        "chunk_samples": meta["chunk_samples"], "shard_samples": meta["shard_samples"],
        "units": {"complete": len(complete), "incomplete": len(infos) - len(complete),
                  "incomplete_units": [_incomplete_entry(store, u) for u in infos if not u.complete]},
        "stored_bytes": total, "decoded_bytes": decoded,
        "stored_fraction": total / decoded if decoded else 0.0,
        "bytes_per_view": per_view(total), "bytes_per_view_by_part": {k: per_view(b) for k, b in stored.items()},
        "stats_finalised": {t: _final_stats_state(store, t, digest) for t in store.teachers},
        "skipped": skipped, "skipped_by_kind": count_kinds(skipped), "sample_notes": store.sample_notes(),
        "runs": len(runs), "last_run": runs[-1] if runs else None,
        "lock": _read_lock(store),
    }


def _incomplete_entry(store: FeatureStore, info: Any) -> dict[str, Any]:
    rec = store.unit_record(info.name)
    out = {"unit": info.name, "source": info.source, "status": rec.get("status", "missing")}
    if out["status"] == FAILED:
        out["reason"] = failure_reason(rec)
    return out


def failure_reason(rec: dict[str, Any]) -> str:
    """Why a failed unit was not written: its skip records' reasons, joined."""
    reasons = [s.get("reason") for s in rec.get("skipped", []) if isinstance(s, dict) and s.get("reason")]
    return "; ".join(map(str, reasons)) or "no reason recorded"


def run_summaries(store: FeatureStore) -> list[dict[str, Any]]:
    """The summaries comad-extract appended to extract_runs, oldest first ([] before the first finished run)."""
    if RUNS_GROUP not in store.group:
        return []
    runs = dict(store.group[RUNS_GROUP].attrs).get("runs", [])
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _final_stats_state(store: FeatureStore, teacher: str, digest: str) -> str:
    """'current' when stats/<teacher> covers exactly the complete units, else 'stale' or 'missing'."""
    if f"stats/{teacher}" not in store.group:
        return "missing"
    rec = dict(store.group[f"stats/{teacher}"].attrs).get(TEACHER_ATTR, {})
    return "current" if rec.get("units_digest") == digest else "stale"


def _read_lock(store: FeatureStore) -> dict[str, Any] | None:
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    raw = sync(store.group.store.get(key, prototype=default_buffer_prototype()))
    if raw is None:
        return None
    try:
        return json.loads(raw.to_bytes())
    except ValueError:
        return {"unreadable": True}
