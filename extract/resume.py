"""What a run does with what earlier runs left in the store: settings in force, duplicate keys, changed inputs.

- Settings a store is written with once (its layout: shard/chunk size, compression; and the decoder's
  pixel limit, which decides what every unit keeps) stay those of the store on a rerun: a configuration
  that asks for other values gets a warning naming the key and the value in force (`settle_config`). The
  values that make data incompatible (fingerprint: masks, views, teachers, dtype, seed) are refused
  earlier, by FeatureStore.create.
- A key stored by several complete units, whichever runs wrote them (`exclude_duplicate_keys`): a unit
  that was complete before this run keeps its keys over one this run wrote (rows readers may already have
  used are never taken away); the order is: earlier units not among this run's inputs (by name), earlier
  units among them (input order), then this run's units (input order). Rows already excluded stay
  excluded, so the pass is idempotent; since the usable rows were unique before the run, only rows of
  units written by this run are excluded (a store written before this rule may have duplicates between
  earlier units: the same order settles them).
- An input tar whose size or mtime/ETag differs from what its complete unit recorded when it was read
  (`source_id`; e.g. a truncated download later replaced by the full file) is named and refused, before
  any work, unless the run is asked to redo such inputs (`comad-extract --redo-changed`). A unit written
  before `source_id` existed, or an input whose identity cannot be read, is not compared.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any


from store_schema.config import PipelineConfig
from store_schema.skips import SkipKind
from store_schema.storage import is_pipe, url_to_fs
from store_schema.store import FeatureStore, StoreError, unit_name

log = logging.getLogger("comad.extract")

# config key -> where the store keeps the value it was written with
_IN_FORCE = {
    "store.shard_samples": ("meta", "shard_samples"),
    "store.chunk_samples": ("meta", "chunk_samples"),
    "store.compression": ("meta", "compression"),
    "store.compression_level": ("meta", "compression_level"),
    "store.blosc_block_kib": ("config", "store", "blosc_block_kib"),
    "data.max_image_pixels": ("config", "data", "max_image_pixels"),
}
_WHY = {"data.max_image_pixels": "so that every unit of the store is filtered alike"}


_MAX_LEVEL = {"zstd": 22, "blosc": 9}  # as checked by config.validate; stores written before it may hold more


def settle_config(cfg: PipelineConfig, store: FeatureStore, repair: bool = True) -> tuple[PipelineConfig, list[str]]:
    """cfg with the store's values of the keys above, and one warning per value that differed.

    A compression level in the root record that its codec cannot write (a store written before levels were
    range-checked: every unit write would fail) is replaced there (`repair`: rank 0 only) by the codec's
    maximum, with a warning: the level only changes how small new chunks are, never how they are read."""
    warnings, changes = [], {}
    level, codec = store.meta.get("compression_level"), store.meta.get("compression")
    if isinstance(level, int) and level > _MAX_LEVEL.get(codec, level):
        warnings.append(f"{store.root}: its root record holds store.compression_level = {level}, above {codec}'s "
                        f"maximum {_MAX_LEVEL[codec]}, which no unit can be written with; set to {_MAX_LEVEL[codec]}")
        store.meta["compression_level"] = _MAX_LEVEL[codec]
        if repair:
            root = dict(store.group.attrs)
            root["comad"] = {**root["comad"], "compression_level": _MAX_LEVEL[codec]}
            store.group.attrs.put(root)
    for key, where in _IN_FORCE.items():
        node: Any = store.meta if where[0] == "meta" else store.meta.get("config", {})
        for part in where[1:]:
            node = node.get(part) if isinstance(node, dict) else None
        section, name = key.split(".")
        given = getattr(getattr(cfg, section), name)
        if node is None or node == given:
            continue  # a store written before the key existed: nothing to compare
        changes.setdefault(section, {})[name] = node
        why = _WHY.get(key, "a store has one layout")
        warnings.append(f"{key} = {given!r} is ignored: {cfg.store.root} was written with {key} = {node!r}, which "
                        f"stays in force ({why}); use a new store.root to change it")
    for section, values in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg, warnings


def exclude_duplicate_keys(store: FeatureStore, urls: list[str], new_units: list[str] = ()) -> int:
    """Exclude the later rows of keys stored by several complete units (order in the module docstring).

    `new_units`: the units this run wrote (all others count as earlier)."""
    complete = {u.name for u in store.units()}
    listed = [unit_name(u) for u in urls]
    new = set(new_units)
    order = sorted(complete - set(listed) - new)
    order += [n for n in listed if n in complete and n not in new]
    order += [n for n in listed if n in complete and n in new]
    first: dict[str, str] = {}
    n = 0
    for name in order:
        rec = store.unit_record(name)
        excluded = set(rec.get("excluded_rows", []))
        rows, reasons = [], []
        for r, key in enumerate(rec.get("keys", [])):
            if r in excluded:
                continue
            if key in first:
                rows.append(r)
                reasons.append(f"duplicate key {key!r}: already stored by unit {first[key]}")
            else:
                first[key] = f"{name} ({rec.get('source', '?')})"
        if rows:
            store.exclude_rows(name, rows, reasons, SkipKind.DUPLICATE_KEY)
            n += len(rows)
    return n


def source_identity(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """{size, mtime and/or etag} of an input as the file system reports it; None when it cannot be read
    (a `pipe:` command has no identity: it is not compared)."""
    if is_pipe(url):
        return None
    try:
        fs, path = url_to_fs(url, storage_options)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 — a missing input is reported when it is read, not here
        return None
    out: dict[str, Any] = {"size": info.get("size")}
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        out["etag"] = str(etag).strip('"')
    mtime = next((info[k] for k in ("mtime", "LastModified", "updated", "last_modified") if info.get(k)), None)
    if mtime is not None:
        out["mtime"] = mtime if isinstance(mtime, (int, float)) else str(mtime)
    return out


def changed_sources(store: FeatureStore, urls: list[str], redo: bool, storage_options: dict | None = None) -> list[str]:
    """Inputs of complete units that changed since they were read: returned when `redo`, else refused."""
    changed = []
    for url in urls:
        if not store.is_complete(url):
            continue
        old = store.unit_record(unit_name(url)).get("source_id")
        new = source_identity(url, storage_options) if old else None
        if old and new and any(old.get(k) != new.get(k) for k in ("size", "etag", "mtime") if k in old):
            diff = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in ("size", "etag", "mtime")
                             if k in old and old.get(k) != new.get(k))
            changed.append((url, diff))
    if changed and not redo:
        names = "; ".join(f"{u} ({d})" for u, d in changed[:5]) + (f"; and {len(changed) - 5} more"
                                                                  if len(changed) > 5 else "")
        raise StoreError(f"{len(changed)} input tar(s) changed since their unit was written: {names}. Rerun with "
                         "--redo-changed to re-extract them, or restore the files they were read from")
    for u, d in changed:
        log.warning("input tar %s changed since its unit was written (%s): re-extracting it", u, d)
    return [u for u, _ in changed]
