"""A compact store: each teacher's features already mapped by the frozen adapter basis (issue 14 item 4).

With frozen adapters (heads.adapter_trainable = false, the default) training only ever sees
t̂ = LN(W_k · norm_k(t_k) + b_k): a fixed affine map of each teacher to the target width (192 for
ViT-Tiny), then a LayerNorm without parameters. Storing the 768-d features is 4x the bytes training
needs. `write_compact_store` reads a full store, fits the maps exactly as training would from that
store's statistics (the shared CCA basis by default: distill/basis.py, store_schema/joint_stats.py;
or PCA / the standardisation, whatever the config says), and writes z_k = W_k · norm_k(t_k) + b_k
(float16 by default) into a new store through the same writer, so it is the same contract with
`dim` = the target width. Training from it (distill.train) installs identity adapters, and LN(z_k) is
today's target up to the float16 rounding of z_k (tests/test_reader_compact.py).

Provenance, in the compact store's root attribute `comad_compact`: the source store's root,
fingerprint, units digest, joint-statistics record and each teacher's effective rank (the gate prior's
input: the compact features' own spectrum is the mapped one, not the teacher's), the config fields the maps depend on
(heads.adapter_init, cca_ridge, target width, loss.standardize_targets), and the sha256 of the maps,
which are stored too (`compact_map/<t>/{weight (d, D), bias (d,)}`, float64). Training refuses a
compact store with trainable adapters (there is nothing left to train: the 768-d features are gone)
and when those config fields differ from the ones the maps were fitted with.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from typing import Any

from pathlib import Path

import numpy as np
import torch

from distill.basis import effective_rank
from distill.store_dataset import check_store_matches
from store_schema.config import ConfigError, PipelineConfig, load_config
from store_schema.joint_stats import joint_stats_record
from store_schema.layout import BASE_ARRAYS, READ_KEYS
from store_schema.store import FeatureStore, StoreError, TeacherMeta, _group_exists
from store_schema.writer import TeacherRows, UnitRows, UnitWriter

ATTR = "comad_compact"
MAP_GROUP = "compact_map"
# The compact store's own codec (issue 14: <= 0.30 of a float16 zstd store's bytes), whatever the full
# store's: blosc (zstd after a byte shuffle, in the config's store.blosc_block_kib blocks) separates
# float16's sign/exponent bytes from its mantissa bytes (15 % smaller features than plain zstd, decoded
# 1.2-1.3x faster: BENCHMARKS.md "Session 9"). Level 3: with 1 MiB blocks level 5 stores the same bytes,
# more slowly. `--compression none` reads ~1.5x faster and stores ~0.14x more (the same table).
COMPRESSION, COMPRESSION_LEVEL = "blosc", 3


def compact_record(store: FeatureStore) -> dict[str, Any] | None:
    """The provenance record of a compact store; None for a full store."""
    rec = dict(store.group.attrs).get(ATTR)
    return rec if isinstance(rec, dict) else None


def _map_fields(cfg: PipelineConfig, width: int) -> dict[str, Any]:
    h = cfg.heads
    return {"adapter_init": h.adapter_init, "cca_ridge": h.cca_ridge, "target_dim": width,
            "standardize_targets": cfg.loss.standardize_targets, "teachers": list(cfg.distill_teachers)}


def fit_maps(cfg: PipelineConfig, store: FeatureStore) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """{teacher: (A (d, D), c (d,)) float64} with A x + c = W · norm(x) + b of the frozen adapter that
    training would build from this store, and the width d."""
    # here: distill.train imports this module (check_compact_training), and distill.model comes with it
    from distill.model import CoMADDistiller
    from distill.train import target_statistics
    if cfg.heads.adapter_trainable:
        raise ConfigError("a compact store needs frozen adapters (heads.adapter_trainable = false): a trainable "
                          "adapter changes the map the compact store would bake in")
    dims = {t: store.teacher_meta(t).dim for t in store.teachers}
    stats, joint = target_statistics(cfg, store)
    torch.manual_seed(cfg.seed)
    model = CoMADDistiller(cfg, dims)
    if stats is not None:
        model.init_from_statistics(stats, pca=cfg.heads.adapter_init == "pca", joint=joint)
    maps = {}
    for t in cfg.distill_teachers:
        w = model.adapters[t].proj.weight.detach().double()
        b = model.adapters[t].proj.bias.detach().double()
        if model.standardize:
            mean, std = model.target_norm[t].mean.double(), model.target_norm[t].std.double()
            w, b = w / std, b - (w / std) @ mean
        maps[t] = (w.numpy(), b.numpy())
    return maps, int(model.adapters[cfg.distill_teachers[0]].out_dim)


def _maps_sha256(maps: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for t in sorted(maps):
        for x in maps[t]:
            h.update(t.encode())
            h.update(np.ascontiguousarray(x, dtype="<f8").tobytes())
    return h.hexdigest()


def check_new_root(dst_root: str, storage_options: dict | None = None) -> None:
    """Refuse to write over anything: a compact store is a new store (FeatureStore.create would resume one)."""
    path = Path(dst_root)
    local_taken = "://" not in dst_root and (path.is_file() or (path.is_dir() and any(path.iterdir())))
    if local_taken or _group_exists(dst_root, storage_options):
        raise StoreError(f"{dst_root} already exists: choose a new --out, or delete it first")


def write_compact_store(cfg: PipelineConfig, dst_root: str, dtype: str = "float16",
                        storage_options: dict | None = None, compression: str = COMPRESSION,
                        compression_level: int = COMPRESSION_LEVEL) -> dict[str, Any]:
    """Write the compact store of cfg.store.root at dst_root (a new store, compressed with `compression`
    at `compression_level`); returns its provenance record."""
    src = check_store_matches(cfg, storage_options)
    if compact_record(src) is not None:
        raise StoreError(f"{src.root} is already a compact store; pass the full store it was made from "
                         f"({compact_record(src).get('source_root')}) as store.root")
    limit = {"zstd": 22, "blosc": 9, "none": None}.get(compression, -1)  # none ignores its level
    if limit == -1 or (limit is not None and not 0 <= compression_level <= limit):
        raise ConfigError(f"compact store: compression {compression!r} level {compression_level}: choose none, "
                          "zstd (level 0-22) or blosc (level 0-9)")
    check_new_root(dst_root, storage_options)
    maps, width = fit_maps(cfg, src)
    teachers = list(cfg.distill_teachers)
    _, digest = src.units_digest()
    ranks = {t: effective_rank(torch.from_numpy(np.asarray(src.teacher_stats(t).cov))) for t in teachers}
    rec = {"source_root": str(src.root), "source_fingerprint": src.fingerprint, "source_units_digest": digest,
           "source_joint_stats": joint_stats_record(src), "source_effective_ranks": ranks, **_map_fields(cfg, width),
           "maps_sha256": _maps_sha256(maps), "dtype": dtype}
    precision = src.fingerprint.get("teacher_precision", "float32")  # the source's teachers, not this config's
    dcfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=dst_root, dtype=dtype,
                                                              compression=compression,
                                                              compression_level=compression_level,
                                                              teacher_precision=precision))
    metas = {t: TeacherMeta(width, src.teacher_meta(t).tokens, src.teacher_meta(t).weights_sha256) for t in teachers}
    dst = FeatureStore.create(dst_root, dcfg, metas, storage_options=storage_options)
    dst.group.attrs.put({"comad": dst.meta, ATTR: {**rec, "status": "writing"}})
    for t, (w, b) in maps.items():
        g = dst.group.require_group(f"{MAP_GROUP}/{t}")
        for name, value in (("weight", w), ("bias", b)):
            g.create_array(name, data=value, chunks=value.shape, compressors=None, overwrite=True)
    for u in src.units():
        n, V = u.n_samples, src.num_views
        views = [src.read_block(u.name, 0, n, v, teachers=teachers, engine="direct") for v in range(V)]
        stack = lambda f: np.stack([f(x) for x in views], 1)  # noqa: E731  (n, V, ...)
        trows = {}
        for t in teachers:
            w, b = (torch.from_numpy(x).float() for x in maps[t])

            def mapped(x: np.ndarray) -> np.ndarray:
                return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) @ w.T + b).numpy()
            trows[t] = TeacherRows(stack(lambda x: x["teachers"][t]["idx"]),
                                   stack(lambda x: mapped(x["teachers"][t]["patch"])),
                                   stack(lambda x: mapped(x["teachers"][t]["cls"])))
        base = {s.name: stack(lambda x, k=READ_KEYS.get(s.name, s.name): x[k]) if s.per_view
                else views[0][READ_KEYS.get(s.name, s.name)] for s in BASE_ARRAYS}  # copied as they are
        rows = UnitRows(keys=src.keys(u.name), **base, teachers=trows)
        w_ = UnitWriter(dst, u.source)
        w_.append(rows)
        w_.skips = list(src.unit_record(u.name).get("skipped", []))
        w_.commit()
        if u.excluded_rows:
            g = dst.group[f"units/{u.name}"]
            urec = dict(g.attrs)["comad_unit"]
            urec["excluded_rows"] = list(u.excluded_rows)
            g.attrs.put({"comad_unit": urec})
    dst.finalize_stats()
    dst.group.attrs.put({"comad": dst.meta, ATTR: {**rec, "status": "complete"}})
    return rec


def check_compact_training(cfg: PipelineConfig, store: FeatureStore) -> dict[str, Any] | None:
    """None for a full store; for a compact one its record, after refusing a config it cannot serve."""
    rec = compact_record(store)
    if rec is None:
        return None
    if rec.get("status") != "complete":
        raise StoreError(f"{store.root}: the compact store was not finished (status {rec.get('status')!r}); "
                         "write it again")
    if cfg.train.targets == "online":
        raise ConfigError(f"{store.root} is a compact store (mapped features); online targets come from the live "
                          "teachers unmapped: use train.targets = \"store\", or a full store")
    if cfg.heads.adapter_trainable:
        raise ConfigError(f"{store.root} is a compact store: its features are already mapped by frozen adapters "
                          f"({rec['adapter_init']} basis, width {rec['target_dim']}), so trainable adapters "
                          "(heads.adapter_trainable = true) have nothing to learn from. Train from the full store "
                          f"it was made from ({rec['source_root']}), or set heads.adapter_trainable = false")
    want = _map_fields(cfg, rec["target_dim"])
    diffs = [f"{k}: store {rec.get(k)!r}, config {v!r}" for k, v in want.items() if rec.get(k) != v]
    if diffs:
        raise ConfigError(f"{store.root} is a compact store whose maps were fitted with other settings:\n  - "
                          + "\n  - ".join(diffs) + f"\nUse those settings, or train from {rec['source_root']}")
    if cfg.gate.prior != "none" and not isinstance(rec.get("source_effective_ranks"), dict):
        raise ConfigError(f"{store.root} is a compact store written before it recorded its source's effective "
                          f"ranks, which gate.prior = {cfg.gate.prior!r} needs: write it again (comad-store "
                          f"compact --config ... --out ...) from {rec['source_root']}, or set "
                          "gate.prior = \"none\"")
    return rec


@torch.no_grad()
def install_compact_maps(model, rec: dict[str, Any]) -> None:
    """Identity adapters (the features are mapped already) and the source store's gate prior."""
    install_identity_adapters(model)
    if "source_effective_ranks" in rec:
        model.set_gate_prior(rec["source_effective_ranks"])


@torch.no_grad()
def install_identity_adapters(model) -> None:
    """The compact store's features are W·norm(x)+b already: adapters become LN(I z + 0), norms identity."""
    for t, adapter in model.adapters.items():
        d = adapter.out_dim
        if adapter.in_dim != d:
            raise StoreError(f"teacher {t!r}: compact features are {adapter.in_dim}-d, the target width is {d}")
        adapter.set_map(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))
    if getattr(model, "standardize", False):
        for norm in model.target_norm.values():
            norm.mean.zero_()
            norm.std.fill_(1.0)


def add_arguments(ap) -> None:
    """The options of `python -m distill.compact` and `comad-store compact` (one argparse parser)."""
    ap.add_argument("--config", required=True, help="the configuration training uses; store.root is the full store")
    ap.add_argument("--out", required=True, help="root of the compact store to write (a new store)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--compression", default=COMPRESSION, choices=("none", "zstd", "blosc"),
                    help=f"codec of the compact store (default {COMPRESSION}: zstd after a byte shuffle)")
    ap.add_argument("--compression-level", type=int, default=COMPRESSION_LEVEL,
                    help=f"default {COMPRESSION_LEVEL}")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def run(args) -> dict[str, Any]:
    """Write the compact store that parsed arguments (add_arguments', or `comad-store compact`'s, where an
    unset option is None = the default here) describe; returns a summary of its record."""
    cfg = load_config(args.config, args.set)
    dtype = args.dtype or "float16"
    comp = args.compression or COMPRESSION
    level = COMPRESSION_LEVEL if args.compression_level is None else args.compression_level
    rec = write_compact_store(cfg, args.out, dtype=dtype, storage_options=cfg.store.storage_options or None,
                              compression=comp, compression_level=level)
    return {"out": args.out, **{k: rec[k] for k in ("source_root", "adapter_init", "target_dim", "maps_sha256",
                                                     "dtype")}, "compression": comp, "compression_level": level}


def main(argv: list[str] | None = None) -> int:
    """python -m distill.compact --config pipeline.toml --out ROOT [--dtype float16] [--set k=v ...]"""
    ap = argparse.ArgumentParser(prog="python -m distill.compact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    print(json.dumps(run(ap.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
