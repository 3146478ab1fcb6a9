"""Stage-2 reader: equal batches per rank, each sample once per epoch at one view, exact resume."""
from __future__ import annotations

import multiprocessing
import os
import pickle
from itertools import islice

import numpy as np
import pytest
import torch

from distill.store_dataset import StoreBatches, check_store_matches, make_loader
from store_schema.fingerprint import StoreMismatchError
from store_schema.store import FeatureStore, StoreError, unit_name
from store_fixtures import teacher_meta, write_unit
from conftest import tiny_config

# Units of uneven sizes (13 = 3 chunks + 1 row, 5, 22); chunk 4, batch 4, window 8 = 2 batches.
UNITS = {"data/a.tar": 13, "data/b.tar": 5, "data/c.tar": 22}
EXCLUDED = {"data/c.tar": [2, 9]}  # rows a duplicate check took out
SMALL = ["train.batch_size=4", "train.shuffle_window=8"]
USABLE = 40 - 2


def _build(root, extra=()):
    cfg = tiny_config(root, SMALL + list(extra))
    store = FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    written = {}
    for i, (src, n) in enumerate(UNITS.items()):
        written[unit_name(src)] = write_unit(store, cfg, src, n, seed=i)
    for src, rows in EXCLUDED.items():
        store.exclude_rows(unit_name(src), rows, ["duplicate key"] * len(rows))
    return cfg, written


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    """(root, fabricated rows per unit, pixels bytes -> (unit, row, view)) of one float16 store."""
    root = tmp_path_factory.mktemp("ds")
    cfg, written = _build(root)
    ident = {}
    for unit, rows in written.items():
        for i in range(len(rows)):
            for v in range(cfg.views.num_views):
                ident[rows.student_pixels[i, v].tobytes()] = (unit, i, v)
    assert len(ident) == 40 * cfg.views.num_views  # random pixels identify a (unit, row, view)
    return root, written, ident


def _cfg(fab, extra=()):
    return tiny_config(fab[0], SMALL + list(extra))


def _take(ds, n):
    return list(islice(iter(ds), n))


def _samples(batches, ident):
    return [ident[px.numpy().tobytes()] for b in batches for px in b["pixels"]]


def _check_contents(batch, written, ident, cfg):
    B, ks, p = 4, cfg.student_tokens, cfg.data.patch_size
    cls = cfg.loss.cls_weight > 0  # CLS features are read only for the CLS term
    assert set(batch) == {"pixels", "student_idx", "teacher_idx", "teacher_patch"} | ({"teacher_cls"} if cls else set())
    assert batch["pixels"].shape == (B, ks, 3, p, p) and batch["pixels"].dtype == torch.uint8
    assert batch["student_idx"].shape == (B, ks) and batch["student_idx"].dtype == torch.int64
    for key in ("teacher_idx", "teacher_patch"):
        assert list(batch[key]) == list(cfg.teachers)  # store order
    for k in range(B):
        unit, i, v = ident[batch["pixels"][k].numpy().tobytes()]
        rows = written[unit]
        np.testing.assert_array_equal(batch["student_idx"][k].numpy(), rows.student_idx[i, v])
        for t, tr in rows.teachers.items():
            assert batch["teacher_idx"][t].dtype == torch.int64
            # A float16 store's targets arrive as stored; the model converts them on its device.
            assert batch["teacher_patch"][t].dtype == torch.float16
            np.testing.assert_array_equal(batch["teacher_idx"][t][k].numpy(), tr.idx[i, v])
            np.testing.assert_array_equal(batch["teacher_patch"][t][k].numpy(), tr.patch[i, v].astype(np.float16))
            if cls:
                np.testing.assert_array_equal(batch["teacher_cls"][t][k].numpy(), tr.cls[i, v].astype(np.float16))


@pytest.mark.parametrize("world,expect_T", [(1, 9), (2, 4), (3, 3)])
def test_ranks_get_equal_batches_and_each_sample_once(fab, world, expect_T):
    root, written, ident = fab
    cfg = _cfg(fab)
    datasets = [StoreBatches(cfg, r, world) for r in range(world)]
    assert [d.steps_per_epoch for d in datasets] == [expect_T] * world  # floor(38 / (world * 4))
    assert datasets[0].num_samples == USABLE
    for epoch in range(2):
        seen = []
        for d in datasets:
            batches = _take(d, 2 * expect_T)[epoch * expect_T:(epoch + 1) * expect_T]
            for b in batches:
                assert b["pixels"].shape[0] == 4
                _check_contents(b, written, ident, cfg)
            seen += _samples(batches, ident)
        assert len(seen) == world * expect_T * 4
        images = [(u, i) for u, i, _ in seen]
        assert len(set(images)) == len(images)  # no image twice in an epoch, so never two views of one
        excluded = {(unit_name(s), r) for s, rows in EXCLUDED.items() for r in rows}
        assert not excluded & set(images)


def test_views_per_block_change_across_epochs_and_runs_repeat(fab):
    root, written, ident = fab
    cfg = _cfg(fab)
    ds = StoreBatches(cfg, 0, 1)
    T = ds.steps_per_epoch
    first, again = _take(ds, 2 * T), _take(StoreBatches(cfg, 0, 1), 2 * T)
    for x, y in zip(first, again):
        for key in ("pixels", "student_idx"):
            assert torch.equal(x[key], y[key])
        for t in cfg.teachers:
            assert torch.equal(x["teacher_patch"][t], y["teacher_patch"][t])
    view_of = []
    for e in range(2):
        per_block: dict = {}
        for unit, i, v in _samples(first[e * T:(e + 1) * T], ident):
            per_block.setdefault((unit, i // 4), set()).add(v)
        assert all(len(vs) == 1 for vs in per_block.values())  # one view per chunk-aligned block
        view_of.append({blk: vs.pop() for blk, vs in per_block.items()})
    changed = [blk for blk in view_of[0] if blk in view_of[1] and view_of[0][blk] != view_of[1][blk]]
    assert changed
    assert _samples(first[:T], ident) != _samples(first[T:2 * T], ident)  # reshuffled


def _loader_batches(cfg, workers, rank, world, start, n):
    loader = make_loader(StoreBatches(cfg, rank, world, start_step=start), workers)
    return [b["pixels"] for b in islice(loader, n)]


@pytest.mark.parametrize("workers,rank,world", [(0, 0, 1), (1, 1, 2), (2, 0, 1), (2, 1, 2)])
def test_resume_continues_exactly(fab, workers, rank, world):
    cfg = _cfg(fab, [f"train.num_workers={workers}"])
    T = StoreBatches(cfg, rank, world).steps_per_epoch
    n = 2 * T + 2
    fresh = _loader_batches(cfg, workers, rank, world, 0, n)
    if workers == 2:  # the loader's round-robin over two workers still yields a whole epoch, each sample once
        images = [(u, i) for u, i, _ in _samples([{"pixels": p} for p in fresh[:T]], fab[2])]
        assert len(set(images)) == len(images) == T * 4
    for s in (T - 1, T + 1):  # the last batch of epoch 0; inside epoch 1, part-way through a window
        resumed = _loader_batches(cfg, workers, rank, world, s, n - s)
        assert len(resumed) == n - s
        for i, (x, y) in enumerate(zip(resumed, fresh[s:])):
            assert torch.equal(x, y), f"start {s}: batch {s + i} differs"


def test_dataset_pickles_without_zarr_objects(fab):
    cfg = _cfg(fab)
    ds = StoreBatches(cfg, 0, 1)
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers receive it this way
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(_take(ds, 3), _take(clone, 3)))


def test_reads_are_whole_chunk_aligned_blocks(fab, monkeypatch):
    cfg = _cfg(fab)
    calls = []
    orig = FeatureStore.read_block

    def spy(self, unit, start, stop, view, *args, **kwargs):
        calls.append((unit, start, stop, view))
        return orig(self, unit, start, stop, view, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "read_block", spy)
    ds = StoreBatches(cfg, 0, 1)
    _take(ds, 2 * ds.steps_per_epoch)
    sizes = {unit_name(s): n for s, n in UNITS.items()}
    assert calls
    for unit, start, stop, view in calls:
        assert start % 4 == 0 and stop == min(start + 4, sizes[unit]), (unit, start, stop)
        assert 0 <= view < cfg.views.num_views


def test_a_window_smaller_than_a_chunk_reads_each_chunk_once(fab, monkeypatch):
    cfg = _cfg(fab, ["train.shuffle_window=4"])  # window = batch = 4: blocks of 1-4 rows are cut by windows
    root, written, ident = fab
    calls = []
    orig = FeatureStore.read_block

    def spy(self, unit, start, stop, view, *args, **kwargs):
        calls.append((unit, start))
        return orig(self, unit, start, stop, view, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "read_block", spy)
    ds = StoreBatches(cfg, 0, 1)
    batches = _take(ds, ds.steps_per_epoch)  # exactly epoch 0: reads are lazy, nothing of epoch 1 yet
    # Windows of epoch 0 over the block order: some block must straddle two windows for this to test anything.
    order = np.random.default_rng([cfg.seed, 0, 0]).permutation(len(ds.blocks))
    ends = np.cumsum(ds.block_sizes[order])
    windows_per_block = [len({w for w in range(e - n, e) if w < ds.steps_per_epoch * 4 for w in [w // 4]})
                         for e, n in zip(ends, ds.block_sizes[order])]
    assert max(windows_per_block) > 1
    assert len(calls) == len(set(calls)) == sum(1 for w in windows_per_block if w)  # each block read once
    for b in batches:
        _check_contents(b, written, ident, cfg)
    seen = _samples(batches, ident)
    assert len({(u, i) for u, i, _ in seen}) == len(seen) == ds.steps_per_epoch * 4


def test_fingerprint_mismatch_names_each_field(fab):
    cfg = _cfg(fab, ["masks.student_visible=0.3", "views.num_views=3", "teachers.ibot.visible=0.8"])
    with pytest.raises(StoreMismatchError) as err:
        check_store_matches(cfg)
    msg = str(err.value)
    for field in ("student_visible", "student_tokens", "views.num_views", "teachers.ibot.visible",
                  "teachers.ibot.tokens"):
        assert field in msg, field
    assert "teachers.mae" not in msg and "config_toml" in msg
    with pytest.raises(StoreMismatchError, match="image_size"):
        StoreBatches(_cfg(fab, ["data.image_size=64"]), 0, 1)


def test_refuses_empty_or_too_small_store(fab, tmp_path):
    cfg = tiny_config(tmp_path, SMALL)
    FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    with pytest.raises(StoreError, match="no complete unit"):
        StoreBatches(cfg, 0, 1)
    with pytest.raises(StoreError, match=r"holds 38 usable samples in 3 complete units.*= 40"):
        StoreBatches(_cfg(fab), 0, 10)  # 10 processes x batch 4
    with pytest.raises(StoreError, match=r"3 batches per process.*train.num_workers <= 3"):
        StoreBatches(_cfg(fab, ["train.num_workers=4"]), 0, 3)
    with pytest.raises(ValueError, match="train.num_workers = 2"):
        make_loader(StoreBatches(_cfg(fab, ["train.num_workers=2"]), 0, 1), 1)


def test_int8_store_is_dequantised(tmp_path):
    cfg = tiny_config(tmp_path, SMALL + ['store.dtype="int8"'])
    rows = write_unit(FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg)), cfg, "data/a.tar", 9)
    ident = {rows.student_pixels[i, v].tobytes(): (i, v) for i in range(9) for v in range(cfg.views.num_views)}
    for b in _take(StoreBatches(cfg, 0, 1), 2):
        for k, px in enumerate(b["pixels"]):
            i, v = ident[px.numpy().tobytes()]
            for t, tr in rows.teachers.items():
                got, want = b["teacher_patch"][t][k].numpy(), tr.patch[i, v]
                assert got.dtype == np.float32
                scale = np.abs(want).max(axis=-1, keepdims=True)  # int8 keeps one scale per token
                np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * scale.max())
                assert np.all(np.abs(got - want) <= 0.01 * scale)
                assert not np.array_equal(got, want)  # really went through int8


def _nice_after_worker_init(q):
    from distill.store_dataset import _lower_priority
    before = os.nice(0)
    _lower_priority(0)
    q.put((before, os.nice(0)))


def test_loader_workers_run_at_lower_cpu_priority(fab):
    loader = make_loader(StoreBatches(_cfg(fab, ["train.num_workers=1"]), 0, 1), 1)
    assert loader.worker_init_fn is not None  # the trainer's workers get it
    ctx = multiprocessing.get_context("spawn")  # a child: renicing pytest itself would slow every later test
    q = ctx.Queue()
    p = ctx.Process(target=_nice_after_worker_init, args=(q,))
    p.start()
    before, after = q.get(timeout=60)
    p.join()
    assert after == min(19, before + 10)
