"""Reruns on an existing store: keys stay unique across runs; settings the store keeps are named, not ignored."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from _extract_fixtures import all_rows, extract_config
from extract.pipeline import SUMMARY_GROUP, run_extraction
from store_schema.store import FeatureStore, unit_name
from store_schema.validate import validate_store
from wds_fixtures import good_samples, make_image_bytes, write_tar


def tar(tmp_path: Path, name: str, keys: list[int], seed: int = 0, prefix: str = "") -> Path:
    """A tar of samples with the given key numbers; `seed` changes the pixels, so copies are told apart."""
    samples = [{"__key__": f"{prefix}{k:06d}", "png": make_image_bytes("RGB", (30, 22), "png", seed=1000 * seed + k),
                "cls": k % 10} for k in keys]
    return write_tar(tmp_path / "data" / f"{name}.tar", samples)


def usable(root: str) -> dict[str, tuple[str, int]]:
    """key -> (unit, seed of its pixels' source tar) over the usable rows; asserts keys are unique."""
    store = FeatureStore.open(root)
    seen: dict[str, str] = {}
    for u in store.units():
        excluded = set(u.excluded_rows)
        for r, key in enumerate(store.keys(u.name)):
            if r not in excluded:
                assert key not in seen, f"{key} usable in {seen[key]} and {u.name}"
                seen[key] = u.name
    return seen


# ---------------------------------------------------------------------------------------------- class 2

@pytest.mark.parametrize("runs, expect", [
    # each run: tars (name, keys); expect: excluded per run, and which tar keeps each key of the first tar
    ([[("a", range(0, 6))], [("b", range(3, 9))]], [0, 3]),
    ([[("a", range(0, 6)), ("b", range(6, 10))], [("c", [1, 7, 20]), ("d", [2, 8, 20, 21])]], [0, 5]),
    ([[("a", range(0, 4))], [("b", range(2, 6))], [("c", range(0, 8))]], [0, 2, 6]),
    ([[("a", range(0, 4))], [("b", range(10, 14))], [("c", [0, 10, 30])]], [0, 0, 2]),
])
def test_duplicates_across_runs_are_excluded(tmp_path, runs, expect):
    first_unit: dict[str, str] = {}
    for i, run in enumerate(runs):
        tars = [tar(tmp_path, name, list(keys), seed=ord(name)) for name, keys in run]
        cfg = extract_config(tmp_path, tars)
        summary = run_extraction(cfg)
        assert summary["duplicate_keys_excluded"] == expect[i], i
        for name, keys in run:
            for k in keys:
                first_unit.setdefault(f"{k:06d}", unit_name(str(tmp_path / "data" / f"{name}.tar")))
        assert validate_store(cfg.store.root) == []
    assert usable(cfg.store.root) == first_unit  # the unit that stored a key first keeps it


def test_an_earlier_unit_listed_again_keeps_its_keys(tmp_path):
    a = tar(tmp_path, "a", list(range(0, 5)), seed=1)
    run_extraction(extract_config(tmp_path, [a]))
    b = tar(tmp_path, "b", list(range(2, 8)), seed=2)
    summary = run_extraction(extract_config(tmp_path, [b, a]))  # b first in input order, but a was stored first
    assert summary["duplicate_keys_excluded"] == 3 and summary["tars_already_complete"] == 1
    keep = usable(str(tmp_path / "store"))
    assert all(keep[f"{k:06d}"] == unit_name(str(a)) for k in range(0, 5))
    again = run_extraction(extract_config(tmp_path, [b, a]))  # idempotent
    assert again["duplicate_keys_excluded"] == 0 and usable(str(tmp_path / "store")) == keep


def test_duplicates_excluded_across_runs_reach_the_trainer_once(tmp_path):
    run_extraction(extract_config(tmp_path, [tar(tmp_path, "a", list(range(0, 6)), seed=1)]))
    cfg = extract_config(tmp_path, [tar(tmp_path, "b", list(range(0, 9)), seed=2)])
    run_extraction(cfg)
    rows = all_rows(FeatureStore.open(cfg.store.root))  # what readers see: excluded rows left out
    assert sorted({k for k, _ in rows}) == [f"{k:06d}" for k in range(9)]
    assert {rows[(f"{k:06d}", 0)]["source"] for k in range(6)} == {str(tmp_path / "data" / "a.tar")}


# ---------------------------------------------------------------------------------------------- class 5

@pytest.mark.parametrize("key, first, second", [
    ("store.shard_samples", 8, 16), ("store.shard_samples", 8, 4), ("store.chunk_samples", 4, 2),
    ("store.compression", '"zstd"', '"blosc"'), ("store.compression", '"zstd"', '"none"'),
    ("store.compression_level", 3, 9), ("store.blosc_block_kib", 1024, 1), ("data.max_image_pixels", 89478485, 1000),
])
def test_a_setting_the_store_keeps_is_named_with_the_value_in_force(tmp_path, caplog, key, first, second):
    a = tar(tmp_path, "a", list(range(0, 5)), seed=1)
    run_extraction(extract_config(tmp_path, [a], [f"{key}={first}"]))
    b = tar(tmp_path, "b", list(range(5, 14)), seed=2)
    cfg = extract_config(tmp_path, [a, b], [f"{key}={second}"])
    with caplog.at_level(logging.WARNING, logger="comad.extract"):
        summary = run_extraction(cfg)
    first_v = str(first).strip('"')
    want = f"{key} = {second!r}" if isinstance(second, int) else f"{key} = '{second.strip(chr(34))}'"
    warned = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(warned) == 1 and want in warned[0] and "stays in force" in warned[0] and first_v in warned[0]
    assert summary["config_ignored"] == warned
    assert summary["images"] == 9 and summary["skipped"] == 0  # the store's pixel limit, not 1000, applied
    store = FeatureStore.open(cfg.store.root)
    section, name = key.split(".")
    assert str(store.meta.get(name, store.meta["config"][section][name])) == first_v
    new = store.array(f"units/{unit_name(str(b))}/teachers/mae/patch")
    old = store.array(f"units/{unit_name(str(a))}/teachers/mae/patch")
    assert new.metadata.to_dict()["codecs"] == old.metadata.to_dict()["codecs"]  # same shards, chunks, codec
    assert validate_store(cfg.store.root) == []
    runs = dict(store.group[SUMMARY_GROUP].attrs)["runs"]
    assert runs[0]["config_ignored"] == []


def test_an_unchanged_configuration_warns_nothing(tmp_path, caplog):
    a = tar(tmp_path, "a", list(range(0, 5)), seed=1)
    run_extraction(extract_config(tmp_path, [a]))
    with caplog.at_level(logging.WARNING, logger="comad.extract"):
        summary = run_extraction(extract_config(tmp_path, [a, tar(tmp_path, "b", [9], seed=2)]))
    assert summary["config_ignored"] == [] and not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_the_store_pixel_limit_filters_new_units_alike(tmp_path):
    big = {"__key__": "big", "png": make_image_bytes("RGB", (60, 50), "png")}
    a = write_tar(tmp_path / "data" / "a.tar", good_samples(2) + [big])
    run_extraction(extract_config(tmp_path, [a], ["data.max_image_pixels=2000"]))
    b = write_tar(tmp_path / "data" / "b.tar", good_samples(2, start=10) + [{**big, "__key__": "big2"}])
    summary = run_extraction(extract_config(tmp_path, [a, b], ["data.max_image_pixels=100000"]))
    assert summary["skipped_by_reason"] == {"decompression bomb": 1}  # big2 refused like big was
    skipped = FeatureStore.open(str(tmp_path / "store")).skipped()
    assert {s["key"] for s in skipped} == {"big", "big2"}
    assert all("data.max_image_pixels = 2000" in s["reason"] for s in skipped)


@pytest.mark.parametrize("codec, level, fixed", [("zstd", 30, 22), ("zstd", 23, 22), ("blosc", 15, 9)])
def test_a_store_holding_an_unwritable_compression_level_is_repaired(tmp_path, caplog, codec, level, fixed):
    """Stores written before levels were range-checked kept the bad level in their root record for good."""
    import zarr
    a = tar(tmp_path, "a", list(range(0, 5)), seed=1)
    run_extraction(extract_config(tmp_path, [a], [f'store.compression="{codec}"']))
    g = zarr.open_group(str(tmp_path / "store"), mode="r+")
    g.attrs.put({**dict(g.attrs), "comad": {**dict(g.attrs)["comad"], "compression_level": level}})
    b = tar(tmp_path, "b", list(range(5, 9)), seed=2)
    cfg = extract_config(tmp_path, [a, b], [f'store.compression="{codec}"'])
    with caplog.at_level(logging.WARNING, logger="comad.extract"):
        summary = run_extraction(cfg)
    assert summary["errors"] == [] and summary["images"] == 4
    assert any(f"store.compression_level = {level}, above {codec}'s maximum {fixed}" in r.getMessage()
               for r in caplog.records)
    assert FeatureStore.open(cfg.store.root).meta["compression_level"] == fixed
    assert validate_store(cfg.store.root) == []
