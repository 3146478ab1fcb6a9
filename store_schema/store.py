"""The teacher-feature store: create, write one unit at a time, read contiguous blocks.

The layout is documented in store_schema/README.md (the contract); this module is its one reference
implementation. Write rules (DESIGN.md §4, from zarr-python 3.1's failure modes):

- a *unit* is one input tar; it is written by exactly one process, into its own group, so no two
  writers ever share a zarr shard or a metadata document;
- rows are buffered and written one whole shard per call, at shard-aligned offsets;
- a unit is complete only when its completion record is written, after every array of it is durable;
  an incomplete unit is deleted and redone on resume, a complete one is skipped;
- root metadata is created once, before any parallel writer starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .codec import compressors_for, decode_features, encode_features
from .config import PipelineConfig, config_to_dict, dumps_toml
from .faults import fault_point
from .fingerprint import (SCHEMA_VERSION, StoreMismatchError, diff_fingerprints,
                          fingerprint_from_config, flatten)
from .stats import RunningStats

ROOT_ATTR, UNIT_ATTR, TEACHER_ATTR = "comad", "comad_unit", "comad_teacher"
VIEW_PARAMS = 5  # top, left, height, width (normalised to the source image), flip
LOCK_KEY = "extract.lock"
# What a read returns where a chunk is missing: impossible values, so a lost shard can never pass as data
# (uint8 pixels have no impossible value; shard presence is checked separately, see missing_shards).
_MISSING = {"float32": np.nan, "float16": np.nan, "int32": -1, "int64": -1, "int8": 0, "uint8": 0}


class StoreError(RuntimeError):
    """The store is missing, damaged or incompatible; the message says which and what to do."""


@dataclass(frozen=True)
class TeacherMeta:
    dim: int
    tokens: int
    weights_sha256: str


@dataclass
class TeacherRows:
    idx: np.ndarray  # (m, V, Kt) visible token indices, sorted
    patch: np.ndarray  # (m, V, Kt, D) float32 features after the final norm
    cls: np.ndarray  # (m, V, D) float32


@dataclass
class UnitRows:
    """m samples of one unit, all V views each. Base fields are None when only adding a teacher."""
    keys: list[str]
    index: np.ndarray  # (m,) int64 ordinal of the sample in its tar
    label: np.ndarray | None  # (m,) int64, -1 where the sample has no `cls`
    views: np.ndarray | None  # (m, V, 5) float32
    student_idx: np.ndarray | None  # (m, V, Ks)
    student_pixels: np.ndarray | None  # (m, V, Ks, 3, p, p) uint8
    teachers: dict[str, TeacherRows] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class UnitInfo:
    name: str
    source: str
    n_samples: int
    complete: bool
    teachers_complete: tuple[str, ...]
    excluded_rows: tuple[int, ...] = ()


def unit_name(source_url: str) -> str:
    """Stable group name of the unit that holds one input tar."""
    return "u" + hashlib.sha1(source_url.encode()).hexdigest()[:16]


class FeatureStore:
    def __init__(self, group: zarr.Group, root: str):
        self.group, self.root = group, root
        meta = dict(group.attrs).get(ROOT_ATTR)
        if not isinstance(meta, dict):
            raise StoreError(f"{root} is a zarr group but not a CoMAD store (no '{ROOT_ATTR}' attribute)")
        self.meta = meta
        self._arrays: dict[str, zarr.Array] = {}
        self._checked_units: set[str] = set()  # units whose shard files were found complete

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, root: str, cfg: PipelineConfig, teachers: dict[str, TeacherMeta],
               storage_options: dict | None = None) -> "FeatureStore":
        """Create the root metadata, or reopen a store written with the same fingerprint (resume)."""
        fp = fingerprint_from_config(cfg, {k: v.weights_sha256 for k, v in teachers.items()})
        if _group_exists(root, storage_options):
            store = cls.open(root, mode="r+", storage_options=storage_options)
            diffs = diff_fingerprints(store.fingerprint, fp)
            if diffs:
                raise StoreMismatchError(
                    f"{root} already holds a store written with another configuration:\n  - "
                    + "\n  - ".join(diffs) + "\nUse a new store.root, or the configuration it was written with.")
            return store
        group = zarr.open_group(root, mode="w-", storage_options=storage_options)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fp,
            "teachers": {k: {"dim": v.dim, "tokens": v.tokens, "weights_sha256": v.weights_sha256}
                         for k, v in teachers.items()},
            "teacher_order": list(teachers),
            "num_views": cfg.views.num_views,
            "image_size": cfg.data.image_size,
            "patch_size": cfg.data.patch_size,
            "num_patches": cfg.num_patches,
            "student_tokens": cfg.student_tokens,
            "dtype": cfg.store.dtype,
            "compression": cfg.store.compression,
            "compression_level": cfg.store.compression_level,
            "chunk_samples": cfg.store.chunk_samples,
            "shard_samples": cfg.store.shard_samples,
            "config": config_to_dict(cfg),
            "config_toml": dumps_toml(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        group.attrs.put({ROOT_ATTR: meta})
        group.require_group("units")
        return cls(group, root)

    @classmethod
    def open(cls, root: str, mode: str = "r", expect: dict[str, Any] | None = None,
             fields: tuple[str, ...] | None = None, storage_options: dict | None = None) -> "FeatureStore":
        """Open an existing store; with `expect`, refuse one whose fingerprint differs (fields named)."""
        if not _group_exists(root, storage_options):
            raise StoreError(f"no store at {root!r}: run comad-extract first, or fix store.root")
        store = cls(zarr.open_group(root, mode=mode, storage_options=storage_options), root)
        found = str(store.meta.get("schema_version", "0"))
        if found.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise StoreMismatchError(
                f"{root}: store schema version {found} is not readable by this code (schema {SCHEMA_VERSION}); "
                "re-extract, or use the pipeline version that wrote it")
        if expect is not None:
            # A caller without the teacher weights (stage 2 on another machine) cannot check their hashes.
            knows_hashes = any(k.endswith("weights_sha256") for k in flatten(expect))
            diffs = diff_fingerprints(store.fingerprint, expect, fields=fields,
                                      ignore=() if knows_hashes else ("weights_sha256",))
            if diffs:
                raise StoreMismatchError(f"{root}: the store does not match the configuration:\n  - "
                                         + "\n  - ".join(diffs))
        return store

    # ------------------------------------------------------------------ metadata
    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]

    @property
    def teachers(self) -> list[str]:
        return list(self.meta["teacher_order"])

    @property
    def num_views(self) -> int:
        return int(self.meta["num_views"])

    def teacher_meta(self, name: str) -> TeacherMeta:
        return TeacherMeta(**self.meta["teachers"][name])

    def units(self, complete_only: bool = True) -> list[UnitInfo]:
        """Units in name order; a unit is complete when its record and every teacher's are written."""
        out = []
        units = self.group["units"]
        for name in sorted(units.group_keys()):
            info = self.unit_info(name)
            if info.complete or not complete_only:
                out.append(info)
        return out

    def unit_info(self, name: str) -> UnitInfo:
        g = self.group[f"units/{name}"]
        rec = dict(g.attrs).get(UNIT_ATTR, {})
        done = []
        if "teachers" in g:
            for t in g["teachers"].group_keys():
                if dict(g[f"teachers/{t}"].attrs).get(TEACHER_ATTR, {}).get("status") == "complete":
                    done.append(t)
        base_done = rec.get("status") == "complete"
        complete = base_done and all(t in done for t in self.teachers)
        return UnitInfo(name, rec.get("source", "?"), int(rec.get("n_samples", 0)), complete,
                        tuple(t for t in self.teachers if t in done), tuple(rec.get("excluded_rows", ())))

    def unit_record(self, name: str) -> dict[str, Any]:
        return dict(self.group[f"units/{name}"].attrs).get(UNIT_ATTR, {})

    def is_complete(self, source_url: str, teachers: list[str] | None = None) -> bool:
        name = unit_name(source_url)
        if name not in self.group["units"]:
            return False
        info = self.unit_info(name)
        rec = self.unit_record(name)
        need = self.teachers if teachers is None else teachers
        return rec.get("status") == "complete" and all(t in info.teachers_complete for t in need)

    def skipped(self) -> list[dict[str, Any]]:
        out = []
        for info in self.units(complete_only=False):
            for s in self.unit_record(info.name).get("skipped", []):
                out.append({"unit": info.name, "source": info.source, **s})
        return out

    # ------------------------------------------------------------------ reading
    def array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def keys(self, unit: str) -> list[str]:
        return list(self.unit_record(unit).get("keys", []))

    def missing_shards(self, unit: str, teachers: list[str] | None = None) -> list[str]:
        """Shard files a complete unit should have but does not (one listing per unit)."""
        info = self.unit_info(unit)
        n, shard = info.n_samples, int(self.meta["shard_samples"])
        if n == 0:
            return []
        prefix = f"{self.group.path}/units/{unit}/" if self.group.path else f"units/{unit}/"
        present = set(sync(_collect(self.group.store.list_prefix(prefix))))
        paths = ["index", "label", "views", "student_idx", "student_pixels"]
        for t in teachers or self.teachers:
            paths += [f"teachers/{t}/{a}" for a in ("idx", "patch", "cls")]
            if self.meta["dtype"] == "int8":
                paths += [f"teachers/{t}/patch_scale", f"teachers/{t}/cls_scale"]
        missing = []
        for path in paths:
            ndim = self.array(f"units/{unit}/{path}").ndim
            for i in range((n + shard - 1) // shard):
                key = prefix + path + "/c/" + "/".join([str(i)] + ["0"] * (ndim - 1))
                if key not in present:
                    missing.append(key)
        return missing

    def read_block(self, unit: str, start: int, stop: int, view: int, teachers: list[str] | None = None,
                   pixels: bool = True) -> dict[str, Any]:
        """Samples [start, stop) of one unit at one view: a contiguous, chunk-aligned read.

        Returns numpy arrays: student_idx (m,Ks), pixels (m,Ks,3,p,p) uint8, views (m,5), index (m,),
        label (m,), and teachers[name] = {idx (m,Kt), patch (m,Kt,D) float32, cls (m,D) float32}.
        Raises StoreError when the data is damaged (a missing shard, non-finite features, bad indices):
        zarr would otherwise hand back fill values as if they were data.
        """
        if unit not in self._checked_units:
            missing = self.missing_shards(unit, teachers)
            if missing:
                raise StoreError(f"{self.root}: unit {unit} is damaged: {len(missing)} shard file(s) missing, e.g. "
                                 f"{missing[0]}. Run `comad-store validate {self.root}`; re-extract that unit.")
            self._checked_units.add(unit)
        u = f"units/{unit}"
        out: dict[str, Any] = {
            "student_idx": self.array(f"{u}/student_idx")[start:stop, view].astype(np.int64),
            "views": self.array(f"{u}/views")[start:stop, view],
            "index": self.array(f"{u}/index")[start:stop],
            "label": self.array(f"{u}/label")[start:stop],
            "teachers": {},
        }
        if pixels:
            out["pixels"] = self.array(f"{u}/student_pixels")[start:stop, view]
        int8 = self.meta["dtype"] == "int8"
        n_patches = int(self.meta["num_patches"])
        where = f"{self.root}: unit {unit} rows {start}-{stop} view {view}"
        _check_indices(out["student_idx"], n_patches, f"{where} student_idx")
        for t in teachers or self.teachers:
            tp = f"{u}/teachers/{t}"
            ps = self.array(f"{tp}/patch_scale")[start:stop, view] if int8 else None
            cs = self.array(f"{tp}/cls_scale")[start:stop, view] if int8 else None
            got = {
                "idx": self.array(f"{tp}/idx")[start:stop, view].astype(np.int64),
                "patch": decode_features(self.array(f"{tp}/patch")[start:stop, view], ps),
                "cls": decode_features(self.array(f"{tp}/cls")[start:stop, view], cs),
            }
            _check_indices(got["idx"], n_patches, f"{where} teachers/{t}/idx")
            if not (np.isfinite(got["patch"]).all() and np.isfinite(got["cls"]).all()):
                raise StoreError(f"{where}: teacher {t!r} features are not finite (a lost or corrupt chunk). "
                                 f"Run `comad-store validate {self.root}`; re-extract that unit.")
            out["teachers"][t] = got
        return out

    def unit_stats(self, unit: str, teacher: str) -> RunningStats:
        tp = f"units/{unit}/teachers/{teacher}"
        rec = dict(self.group[tp].attrs)[TEACHER_ATTR]
        dim = self.teacher_meta(teacher).dim
        return RunningStats(dim, int(rec["count"]), self.array(f"{tp}/stats_mean")[:], self.array(f"{tp}/stats_m2")[:])

    def units_digest(self) -> tuple[list[str], str]:
        """Complete units and a digest of their identities (a re-extracted unit gets a new write id)."""
        units = [u.name for u in self.units()]
        ids = [f"{u}:{self.unit_record(u).get('write_id', '')}:{self.unit_record(u).get('n_samples', 0)}" for u in units]
        return units, _digest(ids)

    def teacher_stats(self, teacher: str) -> RunningStats:
        """Store-level statistics: the finalised ones when they cover exactly the complete units."""
        units, digest = self.units_digest()
        path = f"stats/{teacher}"
        if path in self.group:
            rec = dict(self.group[path].attrs).get(TEACHER_ATTR, {})
            if rec.get("units_digest") == digest:
                g = self.group[path]
                return RunningStats(g["mean"].shape[0], int(rec["count"]), g["mean"][:], g["m2"][:])
        return self._merge_stats(teacher, units)

    def _merge_stats(self, teacher: str, units: list[str]) -> RunningStats:
        total = RunningStats(self.teacher_meta(teacher).dim)
        for u in units:
            total.merge(self.unit_stats(u, teacher))
        return total

    def finalize_stats(self) -> dict[str, int]:
        """Merge the complete units' statistics into stats/<teacher> (single writer: the main process)."""
        units, digest = self.units_digest()
        counts = {}
        for t in self.teachers:
            s = self._merge_stats(t, units)
            g = self.group.require_group(f"stats/{t}")
            g.attrs.put({TEACHER_ATTR: {"status": "writing"}})  # stale arrays are never paired with a valid record
            for name, value in (("mean", s.mean), ("m2", s.m2), ("cov", s.cov)):
                g.create_array(name, data=value, chunks=value.shape, compressors=None, overwrite=True)
            g.attrs.put({TEACHER_ATTR: {"count": s.count, "units_digest": digest, "n_units": len(units)}})
            counts[t] = s.count
            fault_point("stats_merge")
        return counts

    # ------------------------------------------------------------------ writing
    def add_teacher(self, name: str, meta: TeacherMeta, fingerprint_entry: dict[str, Any]) -> None:
        """Register a new teacher in the root metadata; its per-unit arrays come from UnitWriter(teachers=[name])."""
        if name in self.meta["teachers"]:
            raise StoreError(f"teacher {name!r} is already in {self.root}")
        meta_d = json.loads(json.dumps(self.meta))
        meta_d["teachers"][name] = {"dim": meta.dim, "tokens": meta.tokens, "weights_sha256": meta.weights_sha256}
        meta_d["teacher_order"].append(name)
        meta_d["fingerprint"]["teachers"][name] = fingerprint_entry
        self.group.attrs.put({ROOT_ATTR: meta_d})
        self.meta = meta_d

    def exclude_rows(self, unit: str, rows: list[int], reasons: list[str]) -> None:
        """Mark rows of a complete unit unusable (e.g. a key already stored by another unit)."""
        g = self.group[f"units/{unit}"]
        rec = dict(g.attrs)[UNIT_ATTR]
        keys = rec["keys"]
        rec["excluded_rows"] = sorted(set(rec.get("excluded_rows", [])) | set(rows))
        rec["skipped"] = rec.get("skipped", []) + [
            {"index": int(self.array(f"units/{unit}/index")[r]), "key": keys[r], "reason": why}
            for r, why in zip(rows, reasons)]
        g.attrs.put({UNIT_ATTR: rec})


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
        self.compressors = compressors_for(m["compression"], m["compression_level"])
        units = store.group["units"]
        if self.base:
            if self.name in units:  # an interrupted earlier attempt: redo from scratch
                _delete_dir(store, self.path)
            self.group = units.create_group(self.name, attributes={UNIT_ATTR: {"source": source_url, "status": "writing"}})
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
        self._create_arrays()
        self.stats = {t: RunningStats(store.teacher_meta(t).dim) for t in self.teachers}
        self.buffer: list[UnitRows] = []
        self.buffered = 0
        self.written = 0
        self.keys: list[str] = []
        self.skips: list[dict[str, Any]] = []

    def _new(self, path: str, row_shape: tuple[int, ...], dtype: str, per_view: bool = True) -> None:
        lead = (0, self.V) if per_view else (0,)
        chunks = (self.chunk, 1, *row_shape) if per_view else (self.chunk,)
        shards = (self.shard, self.V, *row_shape) if per_view else (self.shard,)
        self._arrays[path] = self.group.create_array(
            path, shape=lead + row_shape, chunks=chunks, shards=shards, dtype=dtype,
            compressors=self.compressors, fill_value=_MISSING[dtype],
            config={"write_empty_chunks": True})  # an all-fill shard (unlabelled: all -1) must exist too

    def _create_arrays(self) -> None:
        m = self.store.meta
        p, ks = m["patch_size"], m["student_tokens"]
        if self.base:
            self._new("index", (), "int64", per_view=False)
            self._new("label", (), "int64", per_view=False)
            self._new("views", (VIEW_PARAMS,), "float32")
            self._new("student_idx", (ks,), "int32")
            self._new("student_pixels", (ks, 3, p, p), "uint8")
        for t in self.teachers:
            tm = self.store.teacher_meta(t)
            self.group.create_group(f"teachers/{t}", attributes={TEACHER_ATTR: {"status": "writing"}})
            self._new(f"teachers/{t}/idx", (tm.tokens,), "int32")
            self._new(f"teachers/{t}/patch", (tm.tokens, tm.dim), self.dtype)
            self._new(f"teachers/{t}/cls", (tm.dim,), self.dtype)
            if self.dtype == "int8":
                self._new(f"teachers/{t}/patch_scale", (tm.tokens,), "float32")
                self._new(f"teachers/{t}/cls_scale", (), "float32")

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

    def skip(self, index: int, key: str | None, reason: str) -> None:
        self.skips.append({"index": int(index), "key": key, "reason": reason})

    def commit(self) -> UnitInfo:
        """Write the last partial shard, the statistics, and then — once durable — the completion records."""
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
            self.group.attrs.put({UNIT_ATTR: {"source": self.source, "status": "complete", "n_samples": self.written,
                                              "keys": self.keys, "skipped": self.skips,
                                              "write_id": uuid.uuid4().hex}})
        return self.store.unit_info(self.name)

    def fail(self, reason: str) -> None:
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
            "skipped": [{"index": 0, "key": None, "reason": reason}]}})
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
        head, tail = _split(rows, n)
        self.buffer, self.buffered = ([tail], len(tail)) if len(tail) else ([], 0)
        a, b = self.written, self.written + n
        data: dict[str, np.ndarray] = {}
        if self.base:
            data.update(index=head.index, label=head.label, views=head.views,
                        student_idx=head.student_idx, student_pixels=head.student_pixels)
        for t in self.teachers:
            tr = head.teachers[t]
            patch, pscale = encode_features(tr.patch, self.dtype)
            cls, cscale = encode_features(tr.cls, self.dtype)
            data[f"teachers/{t}/idx"], data[f"teachers/{t}/patch"], data[f"teachers/{t}/cls"] = tr.idx, patch, cls
            if pscale is not None:
                data[f"teachers/{t}/patch_scale"], data[f"teachers/{t}/cls_scale"] = pscale, cscale
        for i, (path, value) in enumerate(data.items()):
            arr = self._arrays[path]
            arr.resize((b, *arr.shape[1:]))
            arr[a:b] = value  # one whole shard (or the unit's last, partial one) per call
            if i == 0:
                fault_point("shard_write")
        self.written = b


# ---------------------------------------------------------------------------------------------- helpers

def _concat(parts: list[UnitRows]) -> UnitRows:
    if len(parts) == 1:
        return parts[0]
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
    return UnitRows(
        keys=[k for p in parts for k in p.keys], index=cat([p.index for p in parts]),
        label=cat([p.label for p in parts]), views=cat([p.views for p in parts]),
        student_idx=cat([p.student_idx for p in parts]), student_pixels=cat([p.student_pixels for p in parts]),
        teachers={t: TeacherRows(*(np.concatenate([getattr(p.teachers[t], f) for p in parts])
                                   for f in ("idx", "patch", "cls"))) for t in parts[0].teachers})


def _split(rows: UnitRows, n: int) -> tuple[UnitRows, UnitRows]:
    def cut(x, sl):
        return None if x is None else x[sl]
    halves = []
    for sl in (slice(0, n), slice(n, None)):
        halves.append(UnitRows(
            keys=rows.keys[sl], index=cut(rows.index, sl), label=cut(rows.label, sl), views=cut(rows.views, sl),
            student_idx=cut(rows.student_idx, sl), student_pixels=cut(rows.student_pixels, sl),
            teachers={t: TeacherRows(tr.idx[sl], tr.patch[sl], tr.cls[sl]) for t, tr in rows.teachers.items()}))
    return halves[0], halves[1]


def _check_indices(idx: np.ndarray, n: int, where: str) -> None:
    """Visible-token indices must be strictly increasing within [0, n): anything else is damage."""
    if idx.size and (idx.min() < 0 or idx.max() >= n or (idx.shape[-1] > 1 and (np.diff(idx, axis=-1) <= 0).any())):
        raise StoreError(f"{where}: token indices out of range or not strictly increasing (damaged store); "
                         "run `comad-store validate` and re-extract that unit")


async def _collect(agen) -> list[str]:
    return [k async for k in agen]


def _digest(units: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(units)).encode()).hexdigest()


def _group_exists(root: str, storage_options: dict | None) -> bool:
    try:
        zarr.open_group(root, mode="r", storage_options=storage_options)
        return True
    except FileNotFoundError:
        return False


def _delete_dir(store: FeatureStore, path: str) -> None:
    zstore = store.group.store
    prefix = store.group.path
    full = f"{prefix}/{path}" if prefix else path
    sync(zstore.delete_dir(full))


def _local_dir(store: FeatureStore, path: str) -> Path | None:
    zstore = store.group.store
    if isinstance(zstore, LocalStore):
        prefix = store.group.path
        return Path(zstore.root) / (f"{prefix}/{path}" if prefix else path)
    return None


def _fsync_tree(store: FeatureStore, path: str) -> None:
    """Make a unit's files durable before its completion record (object stores are durable on PUT)."""
    base = _local_dir(store, path)
    if base is None:
        return
    for dirpath, _, files in os.walk(base):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------- the lock

def acquire_writer_lock(store: FeatureStore, run_id: str) -> None:
    """One extraction run per store. A lock left by a dead process on this host is taken over."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    local = _local_dir(store, "")
    if local is not None:
        path = local / LOCK_KEY
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                held = _read_lock(path)
                if held.get("run_id") == run_id:
                    return
                if held.get("host") == info["host"] and not _pid_alive(int(held.get("pid", -1))):
                    path.unlink(missing_ok=True)  # its owner died: a preempted run, safe to resume
                    continue
                raise StoreError(
                    f"{store.root} is being written by another extraction (host {held.get('host')}, pid "
                    f"{held.get('pid')}, started {held.get('started')}). Two writers would corrupt it. If no such "
                    f"run is alive, delete {path} and rerun.")
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise StoreError(f"could not take the writer lock {path}")
    # Object stores have no exclusive create through fsspec: check, write, read back (best effort).
    fs_store = store.group.store
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    proto = default_buffer_prototype()
    cur = sync(fs_store.get(key, prototype=proto))
    if cur is not None:
        held = json.loads(cur.to_bytes())
        if held.get("run_id") != run_id:
            raise StoreError(f"{store.root} is locked by run {held.get('run_id')} on {held.get('host')} "
                             f"(started {held.get('started')}); delete {key} if no such run is alive")
        return
    sync(fs_store.set(key, proto.buffer.from_bytes(json.dumps(info).encode())))
    back = json.loads(sync(fs_store.get(key, prototype=proto)).to_bytes())
    if back.get("run_id") != run_id:
        raise StoreError(f"{store.root}: another extraction took the lock at the same moment ({back})")


def release_writer_lock(store: FeatureStore, run_id: str) -> None:
    local = _local_dir(store, "")
    if local is not None:
        path = local / LOCK_KEY
        if path.exists() and _read_lock(path).get("run_id") == run_id:
            path.unlink(missing_ok=True)
        return
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    cur = sync(store.group.store.get(key, prototype=default_buffer_prototype()))
    if cur is not None and json.loads(cur.to_bytes()).get("run_id") == run_id:  # never release another run's lock
        sync(store.group.store.delete(key))


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn lock file: its writer died while writing it


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
