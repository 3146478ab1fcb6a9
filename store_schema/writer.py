"""Writing the teacher-feature store: one unit (one input tar) at a time, whole shards per call.

The write rules are in store_schema/store.py's docstring and store_schema/README.md ("Completion
protocol"): a unit is written by one process into its own group, shard-aligned, and is complete only
once its completion record is written after every array of it is durable.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from .codec import compressors_for, encode_features
from .faults import fault_point
from .layout import BASE_ARRAYS, FEATURES, TEACHER_SPECS, unit_arrays
from .skips import SkipKind, skip_record
from .stats import RunningStats
from .store import (TEACHER_ATTR, UNIT_ATTR, FeatureStore, StoreError, UnitInfo, _check_indices, local_dir,
                    unit_name)

# What a read returns where a chunk is missing: impossible values, so a lost shard can never pass as data
# (uint8 pixels have no impossible value; shard presence is checked separately, see FeatureStore.missing_shards).
_MISSING = {"float32": np.nan, "float16": np.nan, "int32": -1, "int64": -1, "int8": 0, "uint8": 0}


@dataclass
class TeacherRows:
    """m samples of one teacher, before encoding; a field per array of store_schema.layout.TEACHER_ARRAYS
    (the int8 scales come from the encoding)."""
    idx: np.ndarray  # (m, V, Kt) visible token indices, sorted
    patch: np.ndarray  # (m, V, Kt, D) float32 features after the final norm
    cls: np.ndarray  # (m, V, D) float32


@dataclass
class UnitRows:
    """m samples of one unit, all V views each: a field per array of store_schema.layout.BASE_ARRAYS.
    Base fields are None when only adding a teacher."""
    keys: list[str]
    index: np.ndarray  # (m,) int64 ordinal of the sample in its tar
    label: np.ndarray | None  # (m,) int64, -1 where the sample has no `cls`
    views: np.ndarray | None  # (m, V, 5) float32
    student_idx: np.ndarray | None  # (m, V, Ks)
    student_pixels: np.ndarray | None  # (m, V, Ks, 3, p, p) uint8
    teachers: dict[str, TeacherRows] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


class UnitWriter:
    """Writes one unit (one input tar): buffers rows, writes whole shards, then the completion record.

    With `teachers=[name]` on a complete unit it only adds that teacher's arrays (rows are matched to
    the stored keys, never by position alone).
    """

    def __init__(self, store: FeatureStore, source_url: str, teachers: list[str] | None = None):
        self.store, self.source = store, source_url
        self.name = unit_name(source_url)
        self.path = f"units/{self.name}"
        self.teachers = list(teachers) if teachers is not None else store.teachers
        self.base = teachers is None
        m = store.meta
        self.V, self.shard, self.chunk = m["num_views"], m["shard_samples"], m["chunk_samples"]
        self.dtype = m["dtype"]
        # a store written before store.blosc_block_kib existed let blosc choose its blocks (0): keep that
        block_kib = m["config"].get("store", {}).get("blosc_block_kib", 0)
        self.compressors = compressors_for(m["compression"], m["compression_level"], block_kib)
        units = store.group["units"]
        if self.base:
            _delete_dir(store, self.path)  # an interrupted (or torn) earlier attempt: redo from scratch
            self.group = units.create_group(self.name,
                                            attributes={UNIT_ATTR: {"source": source_url, "status": "writing"}})
            self.stored_keys = None
        else:
            if not store.is_complete(source_url, teachers=[]):
                raise StoreError(f"cannot add teachers to unit {self.name} ({source_url}): its base data is incomplete")
            self.group = units[self.name]
            self.stored_keys = store.keys(self.name)
            for t in self.teachers:
                if f"teachers/{t}" in self.group:
                    _delete_dir(store, f"{self.path}/teachers/{t}")
        self._arrays: dict[str, zarr.Array] = {}
        self._layout = unit_arrays(m, self.teachers, base=self.base)  # this writer's arrays (store_schema/layout.py)
        self._create_arrays()
        self.stats = {t: RunningStats(store.teacher_meta(t).dim) for t in self.teachers}
        self.buffer: list[UnitRows] = []
        self.buffered = 0
        self.written = 0
        self.keys: list[str] = []
        self.skips: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []

    def _new(self, path: str, row_shape: tuple[int, ...], dtype: str, per_view: bool = True) -> None:
        lead = (0, self.V) if per_view else (0,)
        chunks = (self.chunk, 1, *row_shape) if per_view else (self.chunk,)
        shards = (self.shard, self.V, *row_shape) if per_view else (self.shard,)
        self._arrays[path] = self.group.create_array(
            path, shape=lead + row_shape, chunks=chunks, shards=shards, dtype=dtype,
            compressors=self.compressors, fill_value=_MISSING[dtype],
            config={"write_empty_chunks": True})  # an all-fill shard (unlabelled: all -1) must exist too

    def _create_arrays(self) -> None:
        for t in self.teachers:
            self.group.create_group(f"teachers/{t}", attributes={TEACHER_ATTR: {"status": "writing"}})
        for a in self._layout:
            self._new(a.path, a.row_shape, a.dtype, a.per_view)

    def append(self, rows: UnitRows) -> None:
        if len(rows) == 0:
            return
        self._check(rows)
        for t in self.teachers:
            self.stats[t].update(rows.teachers[t].patch.reshape(-1, rows.teachers[t].patch.shape[-1]))
        self.keys += rows.keys
        self.buffer.append(rows)
        self.buffered += len(rows)
        while self.buffered >= self.shard:
            self._flush(self.shard)

    def skip(self, index: int, key: str | None, reason: str, kind: SkipKind | None = None) -> None:
        """An input not stored; `kind` is what is counted (without it the record reads by its text)."""
        self.skips.append(skip_record(index, key, reason, kind))

    def note(self, index: int, key: str, note: str) -> None:
        """A stored sample with a remark (e.g. its `cls` was not a valid label, so it is stored as -1)."""
        self.notes.append({"index": int(index), "key": key, "note": note})

    def commit(self, source_id: dict[str, Any] | None = None) -> UnitInfo:
        """Write the last partial shard, the statistics, and then — once durable — the completion records.

        `source_id`: the input's size and mtime/ETag when it was read, so a rerun can tell it changed."""
        if self.buffered:
            self._flush(self.buffered)
        if self.stored_keys is not None and self.keys != self.stored_keys:
            raise StoreError(f"unit {self.name}: the new teacher's rows do not cover the stored keys exactly "
                             f"({len(self.keys)} rows for {len(self.stored_keys)} stored samples)")
        for t, s in self.stats.items():
            tp = f"teachers/{t}"
            self.group.create_array(f"{tp}/stats_mean", data=s.mean, chunks=s.mean.shape, compressors=None)
            self.group.create_array(f"{tp}/stats_m2", data=s.m2, chunks=s.m2.shape, compressors=None)
        _fsync_tree(self.store, self.path)
        for t, s in self.stats.items():
            self.group[f"teachers/{t}"].attrs.put({TEACHER_ATTR: {"status": "complete", "count": s.count}})
        if self.base:
            rec = {"source": self.source, "status": "complete", "n_samples": self.written, "keys": self.keys,
                   "skipped": self.skips, "write_id": uuid.uuid4().hex}
            if self.notes:  # optional fields: stores written before them have none
                rec["notes"] = self.notes
            if source_id:
                rec["source_id"] = source_id
            self.group.attrs.put({UNIT_ATTR: rec})
        return self.store.unit_info(self.name)

    def fail(self, reason: str, kind: SkipKind | None = None) -> None:
        """Record that this unit could not be written and why; it stays incomplete (redone on resume).

        The unit's rows written so far are dropped: its group keeps only the record (status "failed",
        the reason as its one skip record, which `store.skipped()` and `comad-store inspect` show).
        When only adding teachers, the base data stays and those teachers are marked failed.
        """
        if not self.base:
            for t in self.teachers:
                self.group[f"teachers/{t}"].attrs.put({TEACHER_ATTR: {"status": "failed", "reason": reason}})
            return
        _delete_dir(self.store, self.path)
        self.group = self.store.group["units"].create_group(self.name, attributes={UNIT_ATTR: {
            "source": self.source, "status": "failed", "n_samples": 0, "keys": [],
            "skipped": [skip_record(0, None, reason, kind)]}})
        self._arrays, self.buffer, self.buffered = {}, [], 0

    def _check(self, rows: UnitRows) -> None:
        m = len(rows)
        if self.stored_keys is not None:
            expect = self.stored_keys[len(self.keys):len(self.keys) + m]
            if rows.keys != expect:
                raise StoreError(f"unit {self.name}: rows arrive with keys {rows.keys[:3]}... but the store holds "
                                 f"{expect[:3]}... at that position; re-read the same tar in the same order")
        for t in self.teachers:
            tr = rows.teachers.get(t)
            if tr is None:
                raise StoreError(f"unit {self.name}: rows lack teacher {t!r}")
            if not (np.isfinite(tr.patch).all() and np.isfinite(tr.cls).all()):
                raise StoreError(f"unit {self.name}: non-finite features of teacher {t!r}; skip those samples first")
            if self.dtype == "float16" and max(np.abs(tr.patch).max(initial=0), np.abs(tr.cls).max(initial=0)) > 65504:
                raise StoreError(f"unit {self.name}: teacher {t!r} features exceed the float16 range (65504); "
                                 "set store.dtype to float32 or int8")
            _check_indices(tr.idx, int(self.store.meta["num_patches"]), f"unit {self.name} teachers/{t}/idx")
        if rows.student_idx is not None:
            _check_indices(rows.student_idx, int(self.store.meta["num_patches"]), f"unit {self.name} student_idx")

    def _flush(self, n: int) -> None:
        rows = _concat(self.buffer)
        head, tail = split_rows(rows, n)
        self.buffer, self.buffered = ([tail], len(tail)) if len(tail) else ([], 0)
        a, b = self.written, self.written + n
        encoded = {t: _encode(head.teachers[t], self.dtype) for t in self.teachers}
        data = {array.path: getattr(head, array.spec.name) if array.teacher is None
                else encoded[array.teacher][array.spec.name]
                for array in self._layout}
        for i, (path, value) in enumerate(data.items()):
            arr = self._arrays[path]
            arr.resize((b, *arr.shape[1:]))
            arr[a:b] = value  # one whole shard (or the unit's last, partial one) per call
            if i == 0:
                fault_point("shard_write")
        self.written = b


# ---------------------------------------------------------------------------------------------- helpers

_BASE_FIELDS = tuple(spec.name for spec in BASE_ARRAYS)
_TEACHER_FIELDS = tuple(f.name for f in fields(TeacherRows))


def _encode(rows: TeacherRows, dtype: str) -> dict[str, np.ndarray | None]:
    """A teacher's rows as stored: TEACHER_ARRAYS name -> array; a feature array f is encoded in the store's
    dtype, with its scale as f + "_scale" (None unless int8)."""
    out = {}
    for f in _TEACHER_FIELDS:
        if TEACHER_SPECS[f].dtype == FEATURES:
            out[f], out[f"{f}_scale"] = encode_features(getattr(rows, f), dtype)
        else:
            out[f] = getattr(rows, f)
    return out


def _concat(parts: list[UnitRows]) -> UnitRows:
    if len(parts) == 1:
        return parts[0]
    def cat(xs):
        return None if xs[0] is None else np.concatenate(xs)
    base = {f: cat([getattr(p, f) for p in parts]) for f in _BASE_FIELDS}
    teachers = {t: TeacherRows(*(cat([getattr(p.teachers[t], f) for p in parts]) for f in _TEACHER_FIELDS))
                for t in parts[0].teachers}
    return UnitRows(keys=[k for p in parts for k in p.keys], **base, teachers=teachers)


def split_rows(rows: UnitRows, n: int) -> tuple[UnitRows, UnitRows]:
    """(the first n rows, the rest); a view of the arrays, not a copy."""
    def cut(x, sl):
        return None if x is None else x[sl]
    return tuple(UnitRows(keys=rows.keys[sl], **{f: cut(getattr(rows, f), sl) for f in _BASE_FIELDS},
                          teachers={t: TeacherRows(*(getattr(tr, f)[sl] for f in _TEACHER_FIELDS))
                                    for t, tr in rows.teachers.items()})
                 for sl in (slice(0, n), slice(n, None)))


def _delete_dir(store: FeatureStore, path: str) -> None:
    zstore = store.group.store
    prefix = store.group.path
    full = f"{prefix}/{path}" if prefix else path
    sync(zstore.delete_dir(full))


def _fsync_tree(store: FeatureStore, path: str) -> None:
    """Make a unit's files durable before its completion record (object stores are durable on PUT)."""
    base = local_dir(store, path)
    if base is None:
        return
    for dirpath, _, files in os.walk(base):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
