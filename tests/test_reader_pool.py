"""Loader workers hand batches over in reused shared buffers (distill/batch_pool.py, issue 14 item 3):
the same batches as torch's transport, a held batch (or a view of it) never overwritten, buffers reused."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from conftest import tiny_config
from distill.batch_pool import POOLED, BatchPool, flatten
from distill.store_dataset import StoreBatches, make_loader
from store_fixtures import teacher_meta, write_unit
from store_schema.store import FeatureStore

SMALL = ["train.batch_size=4", "train.shuffle_window=8", "train.num_workers=2"]


@pytest.fixture(scope="module", params=["float16", "int8"])
def cfg(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"pool-{request.param}")
    c = tiny_config(root, SMALL + [f'store.dtype="{request.param}"'])
    store = FeatureStore.create(c.store.root, c, teacher_meta(c))
    for i, (src, n) in enumerate({"data/a.tar": 20, "data/b.tar": 12}.items()):
        write_unit(store, c, src, n, seed=i)
    return c


def _batches(cfg, n: int, pool: bool, hold: bool = True):
    """n batches of a 2-worker loader as numpy copies (hold=False: the tensors are dropped at once)."""
    loader = make_loader(StoreBatches(cfg, 0, 1, int8_targets=True), 2, pool=pool)
    out = [{"/".join(p): x.numpy().copy() for p, x in flatten(b)} for b in islice(loader, n)]
    return out, loader.last_pool


def _equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pooled_batches_equal_torchs_transport_and_reuse_the_buffers(cfg):
    n = 3 * StoreBatches(cfg, 0, 1).steps_per_epoch + 1  # several epochs: each buffer reused many times
    want, none = _batches(cfg, n, pool=False)
    got, pool = _batches(cfg, n, pool=True)
    assert none is None and pool is not None
    _equal(got, want)
    assert pool.pooled == n and pool.fresh == 0  # every buffer came back in time
    if cfg.store.dtype == "int8":
        assert any(k.startswith("teacher_patch_scale/") for k in got[0])  # int8 + scale went through the pool


def test_a_held_batch_or_view_is_never_overwritten(cfg):
    n = 12  # more than a pool's buffers (2 workers x 4)
    want, _ = _batches(cfg, n, pool=False)
    loader = make_loader(StoreBatches(cfg, 0, 1, int8_targets=True), 2)
    held, views = [], []
    for i, b in enumerate(islice(loader, n)):
        if i % 2:
            held.append((i, b))  # the whole batch
        else:
            views.append((i, b["pixels"][1:3].view(-1)))  # a view only: the batch dict itself is dropped
        del b
    pool = loader.last_pool
    assert pool.fresh > 0  # the trainer held every buffer: later batches came the other way, no wait
    for i, b in held:
        _equal([{"/".join(p): x.numpy() for p, x in flatten(b)}], [want[i]])
    for i, v in views:
        np.testing.assert_array_equal(v.numpy(), want[i]["pixels"][1:3].reshape(-1))


def test_pack_unpack_in_one_process():
    pool = BatchPool(1, 4096, slots=2)
    rng = np.random.default_rng(0)
    parts = [{"a": rng.integers(0, 255, (5, 7), dtype=np.uint8), "t": {"x": rng.standard_normal((5, 3)).astype(np.float16)}}
             for _ in range(2)]
    pairs = [(1, 4), (0, 0), (1, 2)]

    def fill(o, *xs):
        for j, (k, r) in enumerate(pairs):
            o[j] = xs[k][r]

    first = pool.pack(0, parts, 3, fill)
    second = pool.pack(0, parts, 3, fill)
    assert POOLED in first and POOLED in second
    assert pool.pack(0, parts, 3, fill) is None  # both buffers out
    a = pool.unpack(first)
    assert a["a"].dtype == torch.uint8 and a["t"]["x"].dtype == torch.float16
    np.testing.assert_array_equal(a["a"].numpy(), np.stack([parts[k]["a"][r] for k, r in pairs]))
    np.testing.assert_array_equal(a["t"]["x"].numpy(), np.stack([parts[k]["t"]["x"][r] for k, r in pairs]))
    keep = a["t"]["x"][0]
    del a
    assert pool.pack(0, parts, 3, fill) is None  # a view still holds the first buffer
    del keep
    assert POOLED in pool.pack(0, parts, 3, fill)  # back once the last view is gone
    assert pool.pack(0, parts, 1000, fill) is None  # does not fit: the caller uses torch's transport
