"""The store contract: layout, shard-whole writes, completion, dtypes, statistics, fingerprints."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from store_schema.codec import all_finite, decode_features, encode_features
from store_schema.fingerprint import StoreMismatchError, fingerprint_from_config
from store_schema.lock import acquire_writer_lock, release_writer_lock
from store_schema.store import FeatureStore, StoreError, TeacherMeta, unit_name
from store_schema.writer import UnitWriter
from store_fixtures import heavy_tailed, make_rows, teacher_meta, write_unit
from conftest import tiny_config


def _create(cfg):
    return FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))


def test_round_trip_every_view_and_teacher(tiny_cfg):
    store = _create(tiny_cfg)
    rows = write_unit(store, tiny_cfg, "data/a.tar", n=21)  # 21 = 2 whole shards of 8 + a partial one
    (info,) = store.units()
    assert info.complete and info.n_samples == 21 and info.source == "data/a.tar"
    assert store.keys(info.name) == rows.keys
    for v in range(tiny_cfg.views.num_views):
        block = store.read_block(info.name, 3, 17, v)
        np.testing.assert_array_equal(block["student_idx"], rows.student_idx[3:17, v])
        np.testing.assert_array_equal(block["pixels"], rows.student_pixels[3:17, v])
        np.testing.assert_array_equal(block["index"], rows.index[3:17])
        np.testing.assert_array_equal(block["label"], rows.label[3:17])
        for t, tr in rows.teachers.items():
            got = block["teachers"][t]
            np.testing.assert_array_equal(got["idx"], tr.idx[3:17, v])
            np.testing.assert_allclose(got["patch"], tr.patch[3:17, v].astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(got["cls"], tr.cls[3:17, v].astype(np.float16).astype(np.float32))


def test_each_write_is_one_whole_aligned_shard(tiny_cfg, monkeypatch):
    store = _create(tiny_cfg)
    writes = []
    orig = zarr.Array.__setitem__

    def spy(self, sel, value):
        writes.append((self.path, sel, self.shape[0]))
        return orig(self, sel, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    write_unit(store, tiny_cfg, "data/a.tar", n=21, batch=3)
    shard = tiny_cfg.store.shard_samples
    data_writes = [w for w in writes if "stats_" not in w[0]]
    assert data_writes
    for path, sel, rows in data_writes:
        assert isinstance(sel, slice) and sel.start % shard == 0, (path, sel)
        assert sel.stop - sel.start == shard or sel.stop == rows == 21, (path, sel)
    per_array = {}
    for path, sel, _ in data_writes:
        per_array.setdefault(path, []).append(sel.start)
    assert all(starts == [0, 8, 16] for starts in per_array.values())  # each shard written exactly once


def test_interrupted_unit_is_invisible_and_redone(tiny_cfg):
    store = _create(tiny_cfg)
    rng = np.random.default_rng(1)
    w = UnitWriter(store, "data/a.tar")
    w.append(make_rows(tiny_cfg, [f"k{i}" for i in range(10)], rng))  # one shard written, never committed
    assert store.units() == [] and not store.is_complete("data/a.tar")
    assert [u.complete for u in store.units(complete_only=False)] == [False]
    rows = write_unit(store, tiny_cfg, "data/a.tar", n=6, seed=2)
    (info,) = store.units()
    assert info.n_samples == 6 and store.keys(info.name) == rows.keys
    assert store.group[f"units/{info.name}/student_idx"].shape[0] == 6  # nothing of the first attempt remains


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("compression", ["zstd", "blosc", "none"])
def test_dtypes_and_compressions_read_back(tmp_path, dtype, compression):
    cfg = tiny_config(tmp_path, [f'store.dtype="{dtype}"', f'store.compression="{compression}"'])
    store = _create(cfg)
    rows = write_unit(store, cfg, "a.tar", n=9)
    got = store.read_block(unit_name("a.tar"), 0, 9, 1)["teachers"]["ibot"]["patch"]
    ref = rows.teachers["ibot"].patch[:, 1]
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= {"float32": 1 - 1e-6, "float16": 0.99999, "int8": 0.999}[dtype]


def massive_activation_features(rng, shape):
    """Gaussian channels with log-normal scales plus four heavy-tailed 'massive activation' channels."""
    d = shape[-1]
    scale = np.exp(rng.normal(0, 0.5, d))
    x = rng.normal(size=shape) * scale
    x[..., :4] = rng.standard_t(3, size=shape[:-1] + (4,)) * 12 * scale[:4]
    return (x + rng.normal(0, 0.5, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["student_t_everywhere", "massive_activations", "gaussian"])
def test_int8_per_token_scale_on_heavy_tailed_features(kind):
    rng = np.random.default_rng(0)
    x = {"student_t_everywhere": lambda: heavy_tailed(rng, (4096, 768)),
         "massive_activations": lambda: massive_activation_features(rng, (4096, 768)),
         "gaussian": lambda: rng.normal(size=(4096, 768)).astype(np.float32)}[kind]()
    q, scale = encode_features(x, "int8")
    y = decode_features(q, scale)
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert q.dtype == np.int8 and scale.shape == (4096,)
    assert cos.min() >= 0.999, cos.min()
    zero = np.zeros((2, 8), np.float32)
    assert np.array_equal(decode_features(*encode_features(zero, "int8")), zero)
    sizes = {d: encode_features(x, d)[0].nbytes + (0 if d != "int8" else scale.nbytes)
             for d in ("float32", "float16", "int8")}
    print("bytes per 768-d token:", {d: s / 4096 for d, s in sizes.items()})
    assert sizes["float16"] * 2 == sizes["float32"] and sizes["int8"] < sizes["float16"] * 0.6


def test_all_finite_matches_numpy_on_every_float16_class():
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, 1.0], dtype=np.float16)  # subnormal, max
    assert all_finite(special) and np.isfinite(special).all()
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65,536 bit patterns
    assert [all_finite(every[i:i + 1]) for i in range(2 ** 16)] == np.isfinite(every).tolist()
    assert all_finite(every[:0])  # nothing to refuse
    for bad in (np.inf, -np.inf, np.nan):
        x = np.ones((3, 5, 8), np.float16)
        x[2, 4, 7] = bad
        assert not all_finite(x) and not all_finite(x[:, ::2])  # strided views too
        assert not all_finite(x.astype(np.float32))


def test_statistics_merge_exactly_and_redo_does_not_double_count(tiny_cfg):
    store = _create(tiny_cfg)
    a = write_unit(store, tiny_cfg, "a.tar", n=13, seed=1)
    write_unit(store, tiny_cfg, "b.tar", n=5, seed=2)
    b = write_unit(store, tiny_cfg, "b.tar", n=7, seed=3)  # a redo replaces the first b
    store.finalize_stats()
    for t in tiny_cfg.teachers:
        feats = np.concatenate([r.teachers[t].patch.reshape(-1, 32) for r in (a, b)]).astype(np.float64)
        s = store.teacher_stats(t)
        assert s.count == len(feats)
        np.testing.assert_allclose(s.mean, feats.mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(s.cov, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)


def test_teacher_added_later_leaves_others_untouched(tiny_cfg):
    store = _create(tiny_cfg)
    rows = write_unit(store, tiny_cfg, "a.tar", n=10)
    root = Path(tiny_cfg.store.root)

    def digest():
        return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*")
                if p.is_file() and "/teachers/dino" not in str(p) and p != root / "zarr.json"}

    before = digest()
    store.add_teacher("dino", TeacherMeta(32, 7, "sha-dino"), {"arch": "x", "visible": 0.45, "tokens": 7})
    assert [u.name for u in store.units()] == []  # the new teacher is missing everywhere: not yet usable
    new = make_rows(tiny_cfg, rows.keys, np.random.default_rng(5), teachers=[], base=False)
    new.teachers["dino"] = make_rows(tiny_cfg, rows.keys, np.random.default_rng(6), teachers=["ibot"]).teachers["ibot"]
    new.teachers["dino"].idx = new.teachers["dino"].idx[..., :7]
    new.teachers["dino"].patch = new.teachers["dino"].patch[..., :7, :]
    w = UnitWriter(store, "a.tar", teachers=["dino"])
    w.append(new)
    w.commit()
    assert digest() == before
    reopened = FeatureStore.open(tiny_cfg.store.root, mode="r+")
    assert reopened.teachers == ["mae", "mocov3", "ibot", "dino"] and len(reopened.units()) == 1
    got = reopened.read_block(unit_name("a.tar"), 0, 10, 0, teachers=["dino"])["teachers"]["dino"]["idx"]
    np.testing.assert_array_equal(got, new.teachers["dino"].idx[:, 0])
    wrong = make_rows(tiny_cfg, ["x"] + rows.keys[1:], np.random.default_rng(7), teachers=[], base=False)
    with pytest.raises(StoreError, match="keys"):
        UnitWriter(reopened, "a.tar", teachers=["dino"]).append(wrong)


def test_plain_zarr_reader_following_the_layout_document(tiny_cfg):
    """store_schema/README.md is enough to read a store with zarr alone."""
    store = _create(tiny_cfg)
    rows = write_unit(store, tiny_cfg, "a.tar", n=11)
    root = zarr.open_group(tiny_cfg.store.root, mode="r")
    meta = root.attrs["comad"]
    assert meta["schema_version"].startswith("1.")
    (name,) = [n for n in root["units"].group_keys() if root[f"units/{n}"].attrs["comad_unit"]["status"] == "complete"]
    unit = root[f"units/{name}"]
    assert unit.attrs["comad_unit"]["keys"] == rows.keys
    view = 1
    for t in meta["teacher_order"]:
        patch = unit[f"teachers/{t}/patch"][:, view].astype(np.float32)
        np.testing.assert_allclose(patch, rows.teachers[t].patch[:, view].astype(np.float16).astype(np.float32))
        assert unit[f"teachers/{t}/idx"].shape == (11, 2, meta["teachers"][t]["tokens"])
    np.testing.assert_array_equal(unit["student_pixels"][:, view], rows.student_pixels[:, view])


def test_reopen_with_other_config_names_each_field(tmp_path):
    cfg = tiny_config(tmp_path)
    _create(cfg)
    other = tiny_config(tmp_path, ["teachers.mae.visible=0.5", "views.num_views=3"])
    with pytest.raises(StoreMismatchError) as e:
        FeatureStore.create(cfg.store.root, other, teacher_meta(other))
    assert "teachers.mae.visible: store has 0.4, expected 0.5" in str(e.value)
    assert "views.num_views: store has 2, expected 3" in str(e.value)
    with pytest.raises(StoreMismatchError, match="teachers.mae.tokens"):
        FeatureStore.open(cfg.store.root, expect=fingerprint_from_config(other), fields=("teachers",))
    FeatureStore.open(cfg.store.root, expect=fingerprint_from_config(cfg), fields=("teachers", "views"))


def test_schema_major_version_is_checked(tiny_cfg):
    store = _create(tiny_cfg)
    meta = dict(store.group.attrs)["comad"]
    meta["schema_version"] = "2.0"
    store.group.attrs.put({"comad": meta})
    with pytest.raises(StoreMismatchError, match="schema version 2.0"):
        FeatureStore.open(tiny_cfg.store.root)


def test_missing_store_and_foreign_group(tmp_path):
    with pytest.raises(StoreError, match="run comad-extract first"):
        FeatureStore.open(str(tmp_path / "nope"))
    zarr.open_group(str(tmp_path / "foreign"), mode="w")
    with pytest.raises(StoreError, match="not a CoMAD store"):
        FeatureStore.open(str(tmp_path / "foreign"))


def test_writer_lock_refuses_a_second_run_and_takes_over_a_dead_one(tiny_cfg):
    store = _create(tiny_cfg)
    acquire_writer_lock(store, "run-1")
    acquire_writer_lock(store, "run-1")  # re-entrant for the same run (its other processes)
    with pytest.raises(StoreError, match="another extraction"):
        acquire_writer_lock(store, "run-2")
    release_writer_lock(store, "run-1")
    lock = Path(tiny_cfg.store.root) / "extract.lock"
    import json
    import socket
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "run_id": "dead"}))
    acquire_writer_lock(store, "run-3")
    assert json.loads(lock.read_text())["run_id"] == "run-3"


def test_non_finite_features_are_refused(tiny_cfg):
    store = _create(tiny_cfg)
    rows = make_rows(tiny_cfg, ["a", "b"], np.random.default_rng(0))
    rows.teachers["mae"].patch[1, 0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        UnitWriter(store, "x.tar").append(rows)


def test_damaged_units_are_refused_on_read_not_returned_as_fill_values(tiny_cfg):
    store = _create(tiny_cfg)
    write_unit(store, tiny_cfg, "a.tar", n=12)
    name = unit_name("a.tar")
    root = Path(tiny_cfg.store.root) / "units" / name
    store.read_block(name, 0, 4, 0)  # healthy
    shard = root / "teachers" / "mocov3" / "patch" / "c" / "1" / "0" / "0" / "0"
    assert shard.is_file()
    shard.unlink()
    fresh = FeatureStore.open(tiny_cfg.store.root)
    assert any("teachers/mocov3/patch/c/1" in k for k in fresh.missing_shards(name))
    with pytest.raises(StoreError, match="shard file"):
        fresh.read_block(name, 8, 12, 0)
    fresh._checked_units.add(name)  # even past the listing check, fill values are not finite
    with pytest.raises(StoreError, match="not finite"):
        fresh.read_block(name, 8, 12, 0)
    with pytest.raises(StoreError, match="not finite"):  # the trainer's float16 path checks too
        fresh.read_block(name, 8, 12, 0, meta=False, cls=False, keep_float16=True)


def test_writer_refuses_float16_overflow_and_unsorted_indices(tiny_cfg):
    store = _create(tiny_cfg)
    rows = make_rows(tiny_cfg, ["a", "b"], np.random.default_rng(0))
    rows.teachers["mae"].patch[0, 0, 0, 0] = 7e4  # finite in float32, inf in float16
    with pytest.raises(StoreError, match="float16 range"):
        UnitWriter(store, "x.tar").append(rows)
    rows = make_rows(tiny_cfg, ["a", "b"], np.random.default_rng(0))
    rows.teachers["ibot"].idx[1, 0] = rows.teachers["ibot"].idx[1, 0][::-1].copy()  # MAE-style unsorted order
    with pytest.raises(StoreError, match="strictly increasing"):
        UnitWriter(store, "y.tar").append(rows)


def test_redone_unit_invalidates_finalised_statistics(tiny_cfg):
    store = _create(tiny_cfg)
    write_unit(store, tiny_cfg, "a.tar", n=6, seed=1)
    store.finalize_stats()
    before = store.teacher_stats("mae").mean.copy()
    redo = write_unit(store, tiny_cfg, "a.tar", n=6, seed=2)  # same unit name and size, new content
    after = store.teacher_stats("mae")
    ref = redo.teachers["mae"].patch.reshape(-1, 32).astype(np.float64).mean(0)
    np.testing.assert_allclose(after.mean, ref, rtol=1e-10, atol=1e-10)
    assert not np.allclose(after.mean, before)


def test_read_block_can_skip_what_training_does_not_use(tiny_cfg, monkeypatch):
    store = _create(tiny_cfg)
    write_unit(store, tiny_cfg, "a.tar", n=8)
    name = unit_name("a.tar")
    full = store.read_block(name, 0, 4, 1)
    paths = []
    orig = FeatureStore.array
    monkeypatch.setattr(FeatureStore, "array", lambda self, p: (paths.append(p), orig(self, p))[1])
    slim = store.read_block(name, 0, 4, 1, meta=False, cls=False)
    assert not any(p.endswith(("/views", "/index", "/label", "/cls")) for p in paths), paths
    assert set(slim) == {"student_idx", "pixels", "teachers"} and set(slim["teachers"]["mae"]) == {"idx", "patch"}
    for t in tiny_cfg.teachers:
        np.testing.assert_array_equal(slim["teachers"][t]["patch"], full["teachers"][t]["patch"])


def _blosc_blocksize(store: FeatureStore, unit: str) -> int:
    """The block size in the blosc header of the first inner chunk of a unit's ibot patch array (view 0)."""
    from store_schema.chunkread import ChunkReader
    reader = ChunkReader(store)
    path = f"units/{unit}/teachers/ibot/patch"
    plan = reader.plan(path)
    raw = reader._local(plan.key + "/c/0/0/0/0", 0, plan)
    return int.from_bytes(raw[8:12].tobytes(), "little")  # blosc 1 header: 4 bytes of flags, nbytes, blocksize


def test_blosc_writes_its_configured_block_and_an_older_store_keeps_blosc_s_own(tmp_path):
    cfg = tiny_config(tmp_path, ['store.compression="blosc"', "store.blosc_block_kib=1"])
    store = _create(cfg)
    rows = write_unit(store, cfg, "a.tar", n=8)
    assert _blosc_blocksize(store, unit_name("a.tar")) == 1024  # a chunk here is 4 x 11 x 32 float16 = 2,816 bytes
    plain = zarr.open_group(cfg.store.root, mode="r")[f"units/{unit_name('a.tar')}/teachers/ibot/patch"][:, 1]
    assert np.array_equal(plain, rows.teachers["ibot"].patch[:, 1].astype(np.float16))  # plain zarr reads it
    # A store written before the key existed has none in its saved config: its units keep blosc's own block.
    root = dict(store.group.attrs)
    del root["comad"]["config"]["store"]["blosc_block_kib"]
    store.group.attrs.put(root)
    write_unit(FeatureStore.open(cfg.store.root, mode="r+"), cfg, "b.tar", n=8)
    assert _blosc_blocksize(store, unit_name("b.tar")) == 2816  # blosc's choice for so small a chunk: all of it
