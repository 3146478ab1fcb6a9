"""The direct read path (store_schema/chunkread.py, issue 14): the same values as zarr, the same refusals."""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from distill.store_dataset import StoreBatches, dequantize_targets
from store_schema.chunkread import ChunkReader, _Buffers
from store_schema.store import FeatureStore, StoreError, unit_name
from store_fixtures import teacher_meta, write_unit
from conftest import tiny_config

SMALL = ["train.batch_size=4", "train.shuffle_window=8"]


def _store(tmp_path, dtype="float16", compression="zstd", units=(("a.tar", 13), ("b.tar", 6))):
    cfg = tiny_config(tmp_path, SMALL + [f'store.dtype="{dtype}"', f'store.compression="{compression}"'])
    store = FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    rows = {unit_name(src): write_unit(store, cfg, src, n, seed=i) for i, (src, n) in enumerate(units)}
    return cfg, store, rows


def _equal(x, y):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _equal(x[k], y[k])
    else:
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("dtype,compression", [("float16", "zstd"), ("float16", "none"), ("float16", "blosc"),
                                               ("float32", "blosc"), ("int8", "zstd"), ("int8", "none")])
def test_direct_reads_equal_zarr_reads(tmp_path, dtype, compression):
    cfg, store, _ = _store(tmp_path, dtype, compression)
    fresh = FeatureStore.open(cfg.store.root)  # its own shard-index cache
    for name, n in ((unit_name("a.tar"), 13), (unit_name("b.tar"), 6)):
        # chunk 4, shard 8: whole chunks, a partial last chunk, ranges across chunks and shards
        for start, stop in ((0, 4), (8, 12), (12, 13), (3, 11), (0, n)):
            stop = min(stop, n)
            for v in range(cfg.views.num_views):
                for kw in ({}, {"keep_float16": True, "meta": False}, {"keep_int8": True, "cls": False}):
                    _equal(store.read_block(name, start, stop, v, **kw),
                           fresh.read_block(name, start, stop, v, engine="direct", **kw))


@pytest.mark.parametrize("compression", ["none", "blosc"])
def test_reused_buffers_never_change_a_block_still_held(tmp_path, compression):
    cfg, store, _ = _store(tmp_path, "float16", compression)
    fresh = FeatureStore.open(cfg.store.root)
    reads = [(unit_name(src), a, min(a + 4, n), v) for src, n in (("a.tar", 13), ("b.tar", 6))
             for a in range(0, n, 4) for v in range(cfg.views.num_views)]
    held = [fresh.read_block(*r, engine="direct", keep_float16=True) for r in reads * 3]  # all alive at once
    for r, got in zip(reads * 3, held):
        _equal(store.read_block(*r, keep_float16=True), got)
    kept = fresh.chunk_reader()._buffers._kept
    del held, got
    for r in reads:  # nothing held any more: later reads land in the kept buffers
        patch = fresh.read_block(*r, engine="direct", keep_float16=True)["teachers"]["mae"]["patch"]
        assert any(patch.base is b for b in kept)


def test_buffer_pool_hands_out_only_free_buffers():
    pool = _Buffers(keep=2)
    a, b = pool.get(10_000), pool.get(10_000)
    assert a.size == b.size == 10_000 and a.base is not b.base  # `a` is still held
    first = id(a.base)
    del a
    c = pool.get(9_000)  # the same size class: a's buffer, free again
    assert id(c.base) == first and c.size == 9_000
    del b
    d = pool.get(1_000_000)  # the pool is full: the free buffer of another size gives way
    assert len(pool._kept) == 2 and any(k is d.base for k in pool._kept) and any(k is c.base for k in pool._kept)
    e = pool.get(1_000_000)  # nothing free: a fresh buffer, not kept
    assert e.base is not d.base and len(pool._kept) == 2


def test_plain_zarr_still_reads_the_store(tmp_path):
    cfg, store, rows = _store(tmp_path)
    root = zarr.open_group(cfg.store.root, mode="r")
    u = root[f"units/{unit_name('a.tar')}"]
    got = u["teachers/mae/patch"][:, 1]
    np.testing.assert_array_equal(got, rows[unit_name("a.tar")].teachers["mae"].patch[:, 1].astype(np.float16))


@pytest.mark.parametrize("engine_workers", [0, 1])
def test_batches_are_the_same_with_either_engine(tmp_path, engine_workers):
    cfg, _, _ = _store(tmp_path)
    n = 3 * StoreBatches(cfg, 0, 1).steps_per_epoch  # three epochs
    a = list(islice(iter(StoreBatches(cfg, 0, 1, engine="zarr")), n))
    b = list(islice(iter(StoreBatches(cfg, 0, 1, engine="direct")), n))
    assert len(a) == len(b) == n
    for x, y in zip(a, b):
        _equal(_np(x), _np(y))
    # resuming mid-epoch with the direct engine continues exactly as the reference run
    c = list(islice(iter(StoreBatches(cfg, 0, 1, start_step=5, engine="direct")), n - 5))
    for x, y in zip(a[5:], c):
        _equal(_np(x), _np(y))


def _np(tree):
    return {k: _np(v) for k, v in tree.items()} if isinstance(tree, dict) else tree.numpy()


def _shard(cfg, unit="a.tar", path="teachers/mocov3/patch", shard=1) -> Path:
    return Path(cfg.store.root) / "units" / unit_name(unit) / path / "c" / str(shard) / "0" / "0" / "0"


def test_a_missing_shard_is_refused(tmp_path):
    cfg, _, _ = _store(tmp_path)
    _shard(cfg).unlink()
    fresh = FeatureStore.open(cfg.store.root)
    name = unit_name("a.tar")
    with pytest.raises(StoreError, match="shard file"):
        fresh.read_block(name, 8, 12, 0, engine="direct")
    fresh._checked_units.add(name)  # past the per-unit listing, the reader itself refuses
    with pytest.raises(StoreError, match="shard file missing"):
        fresh.read_block(name, 8, 12, 0, engine="direct")
    fresh.read_block(name, 0, 8, 0, engine="direct")  # the other shard is fine


def test_a_flipped_byte_is_a_checksum_error(tmp_path):
    cfg, _, _ = _store(tmp_path)
    f = _shard(cfg, shard=0)
    data = bytearray(f.read_bytes())
    data[10] ^= 0x40  # inside the first inner chunk (rows 0-3, view 0)
    f.write_bytes(bytes(data))
    fresh = FeatureStore.open(cfg.store.root)
    with pytest.raises(StoreError, match="checksum mismatch"):
        fresh.read_block(unit_name("a.tar"), 0, 4, 0, engine="direct")


def test_a_damaged_or_truncated_index_is_refused(tmp_path):
    cfg, _, _ = _store(tmp_path)
    f = _shard(cfg, shard=0)
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01  # inside the shard index
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard index checksum"):
        FeatureStore.open(cfg.store.root).read_block(unit_name("a.tar"), 0, 4, 0, engine="direct")
    f.write_bytes(bytes(data[:20]))  # a torn file, shorter than its index
    with pytest.raises(StoreError, match="shorter than its index"):
        FeatureStore.open(cfg.store.root).read_block(unit_name("a.tar"), 0, 4, 0, engine="direct")


def test_a_chunk_marked_empty_is_refused_not_filled(tmp_path):
    import google_crc32c
    cfg, _, _ = _store(tmp_path)
    f = _shard(cfg, shard=0)
    data = bytearray(f.read_bytes())
    n = 2 * 2  # inner chunks per shard: 8 / 4 rows x 2 views
    index = np.frombuffer(bytes(data[-(16 * n + 4):-4]), dtype="<u8").copy().reshape(-1, 2)
    index[0] = 2**64 - 1  # as zarr writes a chunk that was never written
    body = index.tobytes()
    data[-(16 * n + 4):] = body + np.uint32(google_crc32c.value(body)).tobytes()
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="never written"):
        FeatureStore.open(cfg.store.root).read_block(unit_name("a.tar"), 0, 4, 0, engine="direct")


def test_an_array_with_other_codecs_is_read_by_zarr(tmp_path):
    cfg, store, rows = _store(tmp_path)
    name = unit_name("a.tar")
    ref = store.read_block(name, 0, 13, 1)
    # Rewrite one array with a layout the direct reader does not know (no sharding, no checksum).
    g = zarr.open_group(cfg.store.root, mode="r+")
    path = f"units/{name}/teachers/ibot/cls"
    values = g[path][:]
    del g[path]
    g.create_array(path, data=values, chunks=(4, 1, values.shape[-1]))
    fresh = FeatureStore.open(cfg.store.root)
    _equal(ref, fresh.read_block(name, 0, 13, 1, engine="direct"))
    assert path in fresh.chunk_reader().unsupported


def test_int8_targets_travel_as_int8_and_decode_to_the_same_bits(tmp_path):
    cfg, _, _ = _store(tmp_path, "int8")
    n = 4
    ref = list(islice(iter(StoreBatches(cfg, 0, 1)), n))  # decoded in the reader (numpy), float32
    raw = list(islice(iter(StoreBatches(cfg, 0, 1, int8_targets=True)), n))
    for r, q in zip(ref, raw):
        for t in cfg.teachers:
            assert q["teacher_patch"][t].dtype == torch.int8 and q["teacher_cls"][t].dtype == torch.int8
            assert q["teacher_patch_scale"][t].dtype == torch.float32
            assert q["teacher_patch_scale"][t].shape == q["teacher_patch"][t].shape[:2]
        d = dequantize_targets(q)
        assert set(d) == set(r)
        _equal(_np(r), _np(d))  # bit for bit: the same float32 ops as codec.decode_features
    f16 = _store(tmp_path / "f16")[0]
    b = next(iter(StoreBatches(f16, 0, 1, int8_targets=True)))
    assert "teacher_patch_scale" not in b and dequantize_targets(b) is b  # other stores: unchanged


def test_the_reader_caches_each_shard_index_once(tmp_path, monkeypatch):
    cfg, store, _ = _store(tmp_path, units=(("a.tar", 16),))
    fresh = FeatureStore.open(cfg.store.root)
    reader = fresh.chunk_reader()
    assert isinstance(reader, ChunkReader) and reader is fresh.chunk_reader()
    calls = []
    orig = ChunkReader._parse_index
    monkeypatch.setattr(ChunkReader, "_parse_index", lambda self, *a: (calls.append(a[0]), orig(self, *a))[1])
    for start in (0, 4, 8, 12):
        for v in (0, 1):
            fresh.read_block(unit_name("a.tar"), start, start + 4, v, meta=False, engine="direct")
    assert len(calls) == len(set(calls))  # 2 shards x the arrays read, each once
