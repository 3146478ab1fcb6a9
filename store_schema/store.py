"""The teacher-feature store: create, open, read contiguous blocks, statistics.

The layout is documented in store_schema/README.md (the contract); this module, with writer.py (one unit
at a time: UnitWriter) and lock.py (one extraction run per store), is its one reference
implementation. Write rules (from zarr-python 3.1's failure modes; the contract in store_schema/README.md):

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
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .chunkread import ChunkReader, Unsupported
from .codec import all_finite, decode_features
from .config import PipelineConfig, config_to_dict, dumps_toml
from .faults import fault_point
from .layout import FEATURES, READ_KEYS, TEACHER_SPECS, unit_arrays
from .fingerprint import (SCHEMA_VERSION, StoreMismatchError, diff_fingerprints,
                          fingerprint_from_config, flatten)
from .oserrors import STORE_OS_ERRORS, raise_store_error
from .skips import SkipKind, skip_record
from .stats import RunningStats

ROOT_ATTR, UNIT_ATTR, TEACHER_ATTR = "comad", "comad_unit", "comad_teacher"
UNREADABLE = "unreadable"  # unit_record()'s status for a unit whose zarr.json is missing or torn


class StoreError(RuntimeError):
    """The store is missing, damaged or incompatible; the message says which and what to do."""


@dataclass(frozen=True)
class TeacherMeta:
    dim: int
    tokens: int
    weights_sha256: str


@dataclass(frozen=True)
class UnitInfo:
    name: str
    source: str
    n_samples: int
    complete: bool
    teachers_complete: tuple[str, ...]
    excluded_rows: tuple[int, ...] = ()


UNIT_NAME = re.compile(r"u[0-9a-f]{16}")


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
        try:
            return cls._create(root, cfg, teachers, storage_options)
        except STORE_OS_ERRORS as e:
            raise_store_error(root, e, "creating or opening the store")

    @classmethod
    def _create(cls, root: str, cfg: PipelineConfig, teachers: dict[str, TeacherMeta],
                storage_options: dict | None) -> "FeatureStore":
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
        try:
            if not _group_exists(root, storage_options):
                raise StoreError(f"no store at {root!r}: run comad-extract first, or fix store.root")
            store = cls(zarr.open_group(root, mode=mode, storage_options=storage_options), root)
        except STORE_OS_ERRORS as e:
            raise_store_error(root, e, "opening the store")
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

    def unit_names(self) -> list[str]:
        """Unit groups by a listing: zarr's group_keys() fails outright on the first torn zarr.json.

        Only names a unit can have: a writer killed while zarr wrote `units/zarr.json` leaves its
        temporary `zarr.<hex>.partial` there, which is no unit (the next extraction deletes it)."""
        prefix = f"{self.group.path}/units" if self.group.path else "units"
        return sorted(n.strip("/") for n in sync(_collect(self.group.store.list_dir(prefix)))
                      if UNIT_NAME.fullmatch(n.strip("/")))

    def units(self, complete_only: bool = True) -> list[UnitInfo]:
        """Units in name order; a unit is complete when its record and every teacher's are written."""
        out = []
        for name in self.unit_names():
            info = self.unit_info(name)
            if info.complete or not complete_only:
                out.append(info)
        return out

    def unit_info(self, name: str) -> UnitInfo:
        """A unit whose metadata is missing or torn (a killed write, a full disk) is incomplete: redone on resume."""
        try:
            g = self.group[f"units/{name}"]
            rec = dict(g.attrs).get(UNIT_ATTR, {})
            done = []
            if "teachers" in g:
                for t in g["teachers"].group_keys():
                    if dict(g[f"teachers/{t}"].attrs).get(TEACHER_ATTR, {}).get("status") == "complete":
                        done.append(t)
        except (KeyError, ValueError):  # no zarr.json / not JSON (json.JSONDecodeError is a ValueError)
            return UnitInfo(name, "?", 0, False, ())
        base_done = rec.get("status") == "complete"
        complete = base_done and all(t in done for t in self.teachers)
        return UnitInfo(name, rec.get("source", "?"), int(rec.get("n_samples", 0)), complete,
                        tuple(t for t in self.teachers if t in done), tuple(rec.get("excluded_rows", ())))

    def unit_record(self, name: str) -> dict[str, Any]:
        try:
            return dict(self.group[f"units/{name}"].attrs).get(UNIT_ATTR, {})
        except (KeyError, ValueError):
            return {"status": UNREADABLE}

    def is_complete(self, source_url: str, teachers: list[str] | None = None) -> bool:
        name = unit_name(source_url)
        info = self.unit_info(name)  # a unit that does not exist reads as incomplete
        rec = self.unit_record(name)
        need = self.teachers if teachers is None else teachers
        return rec.get("status") == "complete" and all(t in info.teachers_complete for t in need)

    def skipped(self) -> list[dict[str, Any]]:
        out = []
        for info in self.units(complete_only=False):
            for s in self.unit_record(info.name).get("skipped", []):
                out.append({"unit": info.name, "source": info.source, **s})
        return out

    def sample_notes(self) -> list[dict[str, Any]]:
        """Stored samples with a remark (an invalid `cls` stored as label -1, extra image members)."""
        return [{"unit": info.name, "source": info.source, **n} for info in self.units()
                for n in self.unit_record(info.name).get("notes", [])]

    # ------------------------------------------------------------------ reading
    def array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            try:
                self._arrays[path] = self.group[path]
            except (KeyError, ValueError) as e:  # a deleted or torn zarr.json inside a complete unit
                unit = path.split("/")[1] if path.startswith("units/") else None
                raise StoreError(
                    f"{self.root}: {path} cannot be opened ({type(e).__name__}: {e}): the store is damaged; run "
                    f"`comad-store validate {self.root}`" + (f", then delete units/{unit} and rerun comad-extract to "
                                                             "re-extract it" if unit else "")) from e
        return self._arrays[path]

    def keys(self, unit: str) -> list[str]:
        return list(self.unit_record(unit).get("keys", []))

    def missing_shards(self, unit: str, teachers: list[str] | None = None) -> list[str]:
        """Shard files a complete unit should have but does not (one listing per unit). Opens every array of
        the unit (store_schema/layout.py), so a torn zarr.json is a StoreError here too."""
        info = self.unit_info(unit)
        n, shard = info.n_samples, int(self.meta["shard_samples"])
        if n == 0:
            return []
        prefix = f"{self.group.path}/units/{unit}/" if self.group.path else f"units/{unit}/"
        present = set(sync(_collect(self.group.store.list_prefix(prefix))))
        missing = []
        for array in unit_arrays(self.meta, teachers or self.teachers):
            path, ndim = array.path, self.array(f"units/{unit}/{array.path}").ndim
            for i in range((n + shard - 1) // shard):
                key = prefix + path + "/c/" + "/".join([str(i)] + ["0"] * (ndim - 1))
                if key not in present:
                    missing.append(key)
        return missing

    def read_block(self, unit: str, start: int, stop: int, view: int, teachers: list[str] | None = None,
                   pixels: bool = True, meta: bool = True, cls: bool = True,
                   keep_float16: bool = False, keep_int8: bool = False, engine: str = "zarr") -> dict[str, Any]:
        """Samples [start, stop) of one unit at one view: a contiguous, chunk-aligned read.

        Returns numpy arrays: student_idx (m,Ks), pixels (m,Ks,3,p,p) uint8, views (m,5), index (m,),
        label (m,), and teachers[name] = {idx (m,Kt), patch (m,Kt,D) float32, cls (m,D) float32}.
        `meta=False` skips views/index/label and `cls=False` the CLS features: the trainer uses neither,
        and every array skipped is one zarr read (index fetch, checksum, decode) fewer per block.
        `keep_float16=True` returns a float16 store's features as stored: the trainer converts them on
        its device, and the loader moves half the bytes (numpy's float16 -> float32 is slow).
        `keep_int8=True` returns an int8 store's features as stored, int8, with their scales beside them
        (teachers[name]["patch_scale"] (m,Kt), ["cls_scale"] (m,) float32): decoded where the model runs
        (distill.store_dataset.dequantize_targets), a quarter of float32's bytes through the loader.
        `engine`: "zarr" reads through zarr-python; "direct" reads the same chunks with
        store_schema.chunkread (same checksums, same refusals; several times less CPU per block).
        Raises StoreError when the data is damaged (a missing shard, non-finite features, bad indices):
        zarr would otherwise hand back fill values as if they were data.
        """
        if engine not in ("zarr", "direct"):
            raise ValueError(f"engine = {engine!r}: choose zarr or direct")
        if unit not in self._checked_units:
            missing = self.missing_shards(unit, teachers)
            if missing:
                raise StoreError(f"{self.root}: unit {unit} is damaged: {len(missing)} shard file(s) missing, e.g. "
                                 f"{missing[0]}. Run `comad-store validate {self.root}`; re-extract that unit.")
            self._checked_units.add(unit)
        teachers = teachers or self.teachers
        parts = ("core",) + ("meta",) * meta + ("pixels",) * pixels + ("cls",) * cls
        arrays = unit_arrays(self.meta, teachers, parts=parts)
        got_raw = self._read_rows([(f"units/{unit}/{a.path}", a.per_view) for a in arrays], start, stop, view, engine)
        base = {READ_KEYS.get(arr.spec.name, arr.spec.name): x
                for arr, x in zip(arrays, got_raw) if arr.teacher is None}
        stored: dict[str, dict[str, np.ndarray]] = {t: {} for t in teachers}  # teacher -> array name -> rows
        for arr, x in zip(arrays, got_raw):
            if arr.teacher is not None:
                stored[arr.teacher][arr.spec.name] = x
        out: dict[str, Any] = {"student_idx": base.pop("student_idx").astype(np.int64), "teachers": {}}
        out.update(base)  # pixels with pixels=True; views, index, label with meta=True
        n_patches = int(self.meta["num_patches"])
        where = f"{self.root}: unit {unit} rows {start}-{stop} view {view}"
        _check_indices(out["student_idx"], n_patches, f"{where} student_idx")
        for t in teachers:
            got = _decoded_teacher(stored[t], keep_int8, keep_float16)
            _check_indices(got["idx"], n_patches, f"{where} teachers/{t}/idx")
            checked = [got[k] for k in ("patch", "cls", "patch_scale", "cls_scale")
                       if k in got and got[k].dtype.kind == "f"]
            if not all(all_finite(x) for x in checked):
                raise StoreError(f"{where}: teacher {t!r} features are not finite (a lost or corrupt chunk). "
                                 f"Run `comad-store validate {self.root}`; re-extract that unit.")
            out["teachers"][t] = got
        return out

    def _read_rows(self, want: list[tuple[str, bool]], start: int, stop: int, view: int,
                   engine: str) -> list[np.ndarray]:
        """Rows [start, stop) (at `view` where per view) of each array; engine as in read_block."""
        def by_zarr(path: str, per_view: bool) -> np.ndarray:
            arr = self.array(path)
            return arr[start:stop, view] if per_view else arr[start:stop]

        if engine == "zarr":
            return [by_zarr(p, pv) for p, pv in want]
        reader = self.chunk_reader()
        pieces = []  # (position in want, (path, a, b, view)): one piece per inner chunk the rows touch
        for i, (path, per_view) in enumerate(want):
            try:
                c = reader.plan(path).chunk[0]
            except Unsupported:  # not laid out as the contract says: zarr reads it
                continue
            for a in range(start - start % c, stop, c):
                pieces.append((i, (path, max(a, start), min(a + c, stop), view if per_view else None)))
        got = reader.read_many([req for _, req in pieces])
        parts: dict[int, list[np.ndarray]] = {}
        for (i, _), x in zip(pieces, got):
            parts.setdefault(i, []).append(x)
        return [(parts[i][0] if len(parts[i]) == 1 else np.concatenate(parts[i])) if i in parts
                else by_zarr(*want[i]) for i in range(len(want))]

    def chunk_reader(self):
        """This store's store_schema.chunkread.ChunkReader (one per open store: it caches shard indices)."""
        if getattr(self, "_chunk_reader", None) is None:
            self._chunk_reader = ChunkReader(self)
        return self._chunk_reader

    def unit_stats(self, unit: str, teacher: str) -> RunningStats:
        tp = f"units/{unit}/teachers/{teacher}"
        rec = dict(self.group[tp].attrs)[TEACHER_ATTR]
        dim = self.teacher_meta(teacher).dim
        return RunningStats(dim, int(rec["count"]), self.array(f"{tp}/stats_mean")[:], self.array(f"{tp}/stats_m2")[:])

    def units_digest(self) -> tuple[list[str], str]:
        """Complete units and a digest of their identities (a re-extracted unit gets a new write id)."""
        units = [u.name for u in self.units()]
        records = [self.unit_record(u) for u in units]
        ids = [f"{u}:{r.get('write_id', '')}:{r.get('n_samples', 0)}" for u, r in zip(units, records)]
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

    def exclude_rows(self, unit: str, rows: list[int], reasons: list[str], kind: SkipKind | None = None) -> None:
        """Mark rows of a complete unit unusable (e.g. a key already stored by another unit), each with its
        reason; `kind`, the skip kind of all of them (without it the records read by their text)."""
        g = self.group[f"units/{unit}"]
        rec = dict(g.attrs)[UNIT_ATTR]
        keys = rec["keys"]
        rec["excluded_rows"] = sorted(set(rec.get("excluded_rows", [])) | set(rows))
        rec["skipped"] = rec.get("skipped", []) + [
            skip_record(int(self.array(f"units/{unit}/index")[r]), keys[r], why, kind) for r, why in zip(rows, reasons)]
        g.attrs.put({UNIT_ATTR: rec})


# ---------------------------------------------------------------------------------------------- helpers

def _decoded_teacher(stored: dict[str, np.ndarray], keep_int8: bool, keep_float16: bool) -> dict[str, np.ndarray]:
    """One teacher's arrays as read_block returns them: features decoded (store_schema.codec) unless kept as
    stored, an int8 feature's scale consumed by it (kept beside it with keep_int8), indices int64, any
    other array as stored."""
    got = {}
    for name, x in stored.items():
        spec = TEACHER_SPECS[name]
        if spec.dtype == FEATURES:
            scale = stored.get(f"{name}_scale")
            if keep_int8 and scale is not None:
                got[name], got[f"{name}_scale"] = x, scale
            else:
                got[name] = decode_features(x, scale, keep_float16)
        elif not spec.int8_only:  # the scales are their feature's
            got[name] = x.astype(np.int64) if name == "idx" else x
    return got


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


def local_dir(store: FeatureStore, path: str) -> Path | None:
    """The local directory of a node of the store; None on an object store."""
    zstore = store.group.store
    if isinstance(zstore, LocalStore):
        prefix = store.group.path
        return Path(zstore.root) / (f"{prefix}/{path}" if prefix else path)
    return None
