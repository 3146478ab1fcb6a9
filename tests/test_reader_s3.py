"""The direct read path on an object store (moto's S3 server): byte-range reads give zarr's values."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from distill.store_dataset import StoreBatches  # noqa: E402
from store_schema.store import FeatureStore, StoreError  # noqa: E402
from test_store_s3 import s3, written  # noqa: E402,F401  (the server and the store, as module fixtures)

pytestmark = pytest.mark.slow


def test_direct_engine_reads_an_s3_store_like_zarr(s3, written):  # noqa: F811
    store = FeatureStore.open(written["root"], storage_options=s3["options"])
    assert store.chunk_reader().local_root is None  # the object-store path, not pread
    for u in store.units():
        for v in range(store.num_views):
            a = store.read_block(u.name, 0, u.n_samples, v)
            b = store.read_block(u.name, 0, u.n_samples, v, engine="direct")
            for k in ("student_idx", "pixels", "views", "index", "label"):
                np.testing.assert_array_equal(a[k], b[k])
            for t in store.teachers:
                for k in ("idx", "patch", "cls"):
                    np.testing.assert_array_equal(a["teachers"][t][k], b["teachers"][t][k])
    cfg = written["cfg"]
    import dataclasses
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=written["root"]),
                              train=dataclasses.replace(cfg.train, batch_size=4, shuffle_window=8))
    x = list(islice(iter(StoreBatches(cfg, 0, 1, storage_options=s3["options"], engine="zarr")), 3))
    y = list(islice(iter(StoreBatches(cfg, 0, 1, storage_options=s3["options"], engine="direct")), 3))
    for p, q in zip(x, y):
        np.testing.assert_array_equal(p["pixels"].numpy(), q["pixels"].numpy())
        for t in store.teachers:
            np.testing.assert_array_equal(p["teacher_patch"][t].numpy(), q["teacher_patch"][t].numpy())


def test_direct_engine_refuses_a_deleted_shard_object(s3, written):  # noqa: F811
    store = FeatureStore.open(written["root"], storage_options=s3["options"])
    u = store.units()[0].name
    key = f"store/units/{u}/teachers/ibot/idx/c/0/0/0"
    body = s3["client"].get_object(Bucket="bucket", Key=key)["Body"].read()
    s3["client"].delete_object(Bucket="bucket", Key=key)
    try:
        fresh = FeatureStore.open(written["root"], storage_options=s3["options"])
        fresh._checked_units.add(u)  # past the listing check: the reader itself must refuse
        with pytest.raises(StoreError, match="shard file missing"):
            fresh.read_block(u, 0, 4, 0, engine="direct")
    finally:
        s3["client"].put_object(Bucket="bucket", Key=key, Body=body)
