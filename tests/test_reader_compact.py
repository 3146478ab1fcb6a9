"""The compact store (distill/compact.py, issue 14 item 4): mapped features, provenance, refusals, training."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import zarr

import distill.train as train_mod
from _train_worker import build_store
from distill.compact import (ATTR, check_compact_training, compact_record, fit_maps, install_compact_maps,
                             install_identity_adapters, write_compact_store)
from distill.model import CoMADDistiller
from distill.store_dataset import check_store_matches
from store_schema.config import ConfigError, load_config
from store_schema.store import FeatureStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    build_store(root)
    cfg = load_config(root / "config.toml")
    compact = {dt: str(root / f"compact-{dt}") for dt in ("float16", "float32")}
    for dt, path in compact.items():
        write_compact_store(cfg, path, dtype=dt)
    return cfg, compact


def _with_root(cfg, root, extra=()):
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=root))
    for k, v in extra:
        section, key = k.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: v})})
    return cfg


def _today_targets(cfg, store, x, t):
    """What training computes from the full store: adapter(norm(x)) with the trainer's own initialisation."""
    torch.manual_seed(0)
    model = CoMADDistiller(cfg, {k: store.teacher_meta(k).dim for k in store.teachers})
    stats, joint = train_mod.target_statistics(cfg, store)
    model.init_from_statistics(stats, pca=cfg.heads.adapter_init == "pca", joint=joint)
    norm = model.target_norm[t] if model.standardize else (lambda v: v)
    return model.adapters[t](norm(torch.from_numpy(x).float()))


@pytest.mark.parametrize("dtype,atol", [("float16", 3e-3), ("float32", 2e-5)])
def test_mapped_targets_equal_todays_targets_to_the_storage_rounding(stores, dtype, atol):
    cfg, compact = stores
    full = check_store_matches(cfg)
    ccfg = _with_root(cfg, compact[dtype])
    small = check_store_matches(ccfg)
    rec = check_compact_training(ccfg, small)
    assert rec["adapter_init"] == cfg.heads.adapter_init and rec["source_root"] == str(full.root)
    torch.manual_seed(0)
    model = CoMADDistiller(ccfg, {t: small.teacher_meta(t).dim for t in small.teachers})
    install_identity_adapters(model)
    worst = 0.0
    for u in full.units():
        for v in range(full.num_views):
            a = full.read_block(u.name, 0, u.n_samples, v)
            b = small.read_block(u.name, 0, u.n_samples, v)
            np.testing.assert_array_equal(a["pixels"], b["pixels"])
            for t in cfg.distill_teachers:
                np.testing.assert_array_equal(a["teachers"][t]["idx"], b["teachers"][t]["idx"])
                for k in ("patch", "cls"):
                    want = _today_targets(cfg, full, a["teachers"][t][k], t)
                    norm = model.target_norm[t] if model.standardize else (lambda z: z)
                    got = model.adapters[t](norm(torch.from_numpy(b["teachers"][t][k]).float()))
                    worst = max(worst, float((got - want).abs().max()))
    assert worst <= atol, worst
    if dtype == "float16":
        assert worst > 0  # the features really went through float16


def test_provenance_and_maps_are_stored(stores):
    cfg, compact = stores
    small = FeatureStore.open(compact["float16"])
    rec = compact_record(small)
    assert rec["status"] == "complete" and rec["source_units_digest"] == check_store_matches(cfg).units_digest()[1]
    assert rec["source_joint_stats"] is not None and len(rec["maps_sha256"]) == 64
    maps, width = fit_maps(cfg, check_store_matches(cfg))
    for t, (w, b) in maps.items():
        np.testing.assert_array_equal(small.group[f"compact_map/{t}/weight"][:], w)
        np.testing.assert_array_equal(small.group[f"compact_map/{t}/bias"][:], b)
        assert small.teacher_meta(t).dim == width == w.shape[0]
    assert compact_record(check_store_matches(cfg)) is None  # the full store is not one


def test_trainable_adapters_and_other_settings_are_refused(stores):
    cfg, compact = stores
    ccfg = _with_root(cfg, compact["float16"])
    store = check_store_matches(ccfg)
    with pytest.raises(ConfigError, match="compact store.*adapter_trainable = false"):
        check_compact_training(_with_root(ccfg, ccfg.store.root, [("heads.adapter_trainable", True)]), store)
    with pytest.raises(ConfigError, match="adapter_init"):
        check_compact_training(_with_root(ccfg, ccfg.store.root, [("heads.adapter_init", "random")]), store)
    with pytest.raises(ConfigError, match="frozen adapters"):
        write_compact_store(_with_root(cfg, cfg.store.root, [("heads.adapter_trainable", True)]), "/nonexistent")


def test_training_runs_from_a_compact_store(stores, tmp_path):
    cfg, compact = stores
    ccfg = _with_root(cfg, compact["float16"], [("train.run_dir", str(tmp_path / "run")), ("train.steps", 2),
                                                ("train.log_every", 1), ("train.checkpoint_every", 2)])
    summary = train_mod.train(ccfg)
    assert summary["step"] == 2 and np.isfinite(summary["last_metrics"]["loss"])
    bad = _with_root(ccfg, ccfg.store.root, [("heads.adapter_trainable", True),
                                            ("train.run_dir", str(tmp_path / "run2"))])
    with pytest.raises(ConfigError, match="compact store"):
        train_mod.train(bad)


def test_the_gate_prior_comes_from_the_source_store(stores, tmp_path):
    # The compact features' spectrum is the mapped one: the prior must be the full store's, not recomputed.
    cfg, compact = stores
    assert cfg.gate.prior == "rankme"
    full = check_store_matches(cfg)
    torch.manual_seed(0)
    want = CoMADDistiller(cfg, {t: full.teacher_meta(t).dim for t in full.teachers})
    stats, joint = train_mod.target_statistics(cfg, full)
    want.init_from_statistics(stats, pca=cfg.heads.adapter_init == "pca", joint=joint)
    assert float(want.gate_prior.max() - want.gate_prior.min()) > 1e-3  # not uniform: the check can fail
    ccfg = _with_root(cfg, compact["float16"])
    small = check_store_matches(ccfg)
    got = CoMADDistiller(ccfg, {t: small.teacher_meta(t).dim for t in small.teachers})
    install_compact_maps(got, check_compact_training(ccfg, small))
    torch.testing.assert_close(got.gate_prior, want.gate_prior, rtol=1e-12, atol=0)

    # A compact store written before the ranks were recorded: refused with the prior, served without it.
    rec = {k: v for k, v in compact_record(small).items() if k != "source_effective_ranks"}
    shutil.copytree(compact["float16"], tmp_path / "old")
    g = zarr.open_group(str(tmp_path / "old"), mode="r+")
    g.attrs.put({**dict(g.attrs), ATTR: rec})
    old = FeatureStore.open(str(tmp_path / "old"))
    with pytest.raises(ConfigError, match="gate.prior.*write it again"):
        check_compact_training(ccfg, old)
    assert check_compact_training(_with_root(ccfg, ccfg.store.root, [("gate.prior", "none")]), old) is not None


def test_the_compact_store_keeps_the_source_teachers_precision(stores, tmp_path):
    cfg, _ = stores
    src = tmp_path / "bf16-store"
    shutil.copytree(cfg.store.root, src)
    full = FeatureStore.open(str(src), mode="r+")  # as if its teachers had run under bf16 autocast
    root = dict(full.group.attrs)
    root["comad"]["fingerprint"]["teacher_precision"] = "bf16"
    full.group.attrs.put(root)
    write_compact_store(_with_root(cfg, str(src)), str(tmp_path / "compact"))  # a float32 config
    assert FeatureStore.open(str(tmp_path / "compact")).fingerprint["teacher_precision"] == "bf16"
