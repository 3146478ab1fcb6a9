"""A store on a real S3-compatible HTTP server (moto's server on loopback): written here, read back in
another process, inspected and validated, with the writer lock on an object store."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from store_schema.lock import acquire_writer_lock, release_writer_lock  # noqa: E402
from store_schema.store import FeatureStore, StoreError, unit_name  # noqa: E402
from store_schema.inspection import inspect_store  # noqa: E402
from store_schema.validate import validate_store  # noqa: E402
from store_fixtures import teacher_meta, write_unit  # noqa: E402
from conftest import REPO, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # a server, HTTP round trips and subprocesses: ~45 s on a busy 2-core machine

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# Opens the store in a fresh process and prints, per unit and view, a hash of everything read_block returns.
READER = r"""
import hashlib, json, sys
import numpy as np
from store_schema.store import FeatureStore
root, options = sys.argv[1], json.loads(sys.argv[2])
store = FeatureStore.open(root, storage_options=options)
out = {}
for u in store.units():
    for v in range(store.num_views):
        b = store.read_block(u.name, 0, u.n_samples, v)
        parts = [b["student_idx"], b["pixels"], b["views"], b["index"], b["label"]]
        parts += [b["teachers"][t][k] for t in store.teachers for k in ("idx", "patch", "cls")]
        out[f"{u.source}/{v}"] = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes() for p in parts)).hexdigest()
print(json.dumps({"keys": {u.source: store.keys(u.name) for u in store.units()}, "hashes": out}))
"""


def _expected_hashes(rows, source: str, views: int, teachers: list[str]) -> dict[str, str]:
    out = {}
    for v in range(views):
        parts = [rows.student_idx[:, v].astype(np.int64), rows.student_pixels[:, v], rows.views[:, v],
                 rows.index, rows.label]
        for t in teachers:
            tr = rows.teachers[t]
            parts += [tr.idx[:, v].astype(np.int64), tr.patch[:, v].astype(np.float16).astype(np.float32),
                      tr.cls[:, v].astype(np.float16).astype(np.float32)]
        out[f"{source}/{v}"] = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes() for p in parts)).hexdigest()
    return out


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 at a free port, with one empty bucket."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="bucket")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    yield {"endpoint": endpoint, "client": client, "options": options}
    server.stop()


def _env() -> dict[str, str]:
    env = {**os.environ, **CREDS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def written(s3, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("s3cfg"))
    root = "s3://bucket/store"
    store = FeatureStore.create(root, cfg, teacher_meta(cfg), storage_options=s3["options"])
    acquire_writer_lock(store, "run-1")
    rows = {"data/a.tar": write_unit(store, cfg, "data/a.tar", 11, seed=1),
            "data/b.tar": write_unit(store, cfg, "data/b.tar", 5, seed=2)}
    rows["data/b.tar"] = write_unit(store, cfg, "data/b.tar", 6, seed=3)  # a redo deletes the first attempt on S3
    store.finalize_stats()
    return {"root": root, "cfg": cfg, "rows": rows, "store": store}


def test_a_new_process_reads_back_exactly_what_was_written(s3, written):
    r = subprocess.run([sys.executable, "-c", READER, written["root"], json.dumps(s3["options"])],
                       capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    cfg, rows = written["cfg"], written["rows"]
    expected = {}
    for source, rw in rows.items():
        expected.update(_expected_hashes(rw, source, cfg.views.num_views, list(cfg.teachers)))
    assert got["hashes"] == expected
    assert got["keys"] == {s: rw.keys for s, rw in rows.items()}


def test_inspect_and_validate_work_on_s3(s3, written):
    root, options, client = written["root"], s3["options"], s3["client"]
    info = inspect_store(root, options)
    assert info["samples"] == 17 and info["units"] == {"complete": 2, "incomplete": 0, "incomplete_units": []}
    listing = client.list_objects_v2(Bucket="bucket", Prefix="store/units/")["Contents"]
    data = sum(o["Size"] for o in listing if "/c/" in o["Key"] and "stats_" not in o["Key"])
    assert info["stored_bytes"] == data > 0 and info["bytes_per_view"] == pytest.approx(data / (17 * 2))
    assert info["lock"]["run_id"] == "run-1"
    assert validate_store(root, options) == []
    exe = shutil.which("comad-store") or pytest.skip("comad-store is not installed (pip install -e .)")
    opts = [f"--storage-option=endpoint_url={s3['endpoint']}", "--storage-option=client_kwargs.region_name=us-east-1"]
    r = subprocess.run([exe, "validate", root, *opts], capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0 and "ok (2 complete units, 17 rows" in r.stdout, r.stdout + r.stderr[-2000:]


def test_writer_lock_on_an_object_store(s3, written):
    store = written["store"]
    acquire_writer_lock(store, "run-1")  # re-entrant for the same run
    with pytest.raises(StoreError, match="locked by run run-1"):
        acquire_writer_lock(store, "run-2")
    release_writer_lock(store, "run-1")
    assert "Contents" not in s3["client"].list_objects_v2(Bucket="bucket", Prefix="store/extract.lock")
    acquire_writer_lock(store, "run-2")
    release_writer_lock(store, "run-2")


def test_missing_store_on_s3_is_a_clear_error(s3):
    with pytest.raises(StoreError, match="no store at 's3://bucket/nothing'"):
        FeatureStore.open("s3://bucket/nothing", storage_options=s3["options"])


def test_a_deleted_shard_object_is_reported_by_validate_in_a_new_process(s3, written):
    """Runs last in this module: it damages the shared store."""
    client, name = s3["client"], unit_name("data/a.tar")
    key = f"store/units/{name}/teachers/ibot/patch/c/1/0/0/0"
    client.head_object(Bucket="bucket", Key=key)
    client.delete_object(Bucket="bucket", Key=key)
    r = subprocess.run([sys.executable, "-m", "store_schema", "validate", written["root"], "--json",
                        f"--storage-option=endpoint_url={s3['endpoint']}"],
                       capture_output=True, text=True, timeout=180, env=_env(), cwd=REPO)
    report = json.loads(r.stdout)
    assert r.returncode == 1 and not report["ok"], r.stderr[-2000:]
    assert [(p["where"], p["what"].split(":")[0]) for p in report["problems"]] == [
        (f"units/{name}/teachers/ibot/patch", "missing shard file")]


def test_object_store_lock_is_released_only_by_its_owner(s3, written):
    """A refused run that 'releases' on its way out must not free the lock of the run that holds it."""
    store = written["store"]
    acquire_writer_lock(store, "run-a")
    with pytest.raises(StoreError):
        acquire_writer_lock(store, "run-b")
    release_writer_lock(store, "run-b")
    with pytest.raises(StoreError, match="locked by run run-a"):
        acquire_writer_lock(store, "run-c")
    release_writer_lock(store, "run-a")
    acquire_writer_lock(store, "run-c")
    release_writer_lock(store, "run-c")


# ---------------------------------------------------------------------------------------------- the lock's race

def _fresh_store(s3, written) -> FeatureStore:
    return FeatureStore.open(written["root"], mode="r+", storage_options=s3["options"])


def test_of_runs_starting_together_exactly_one_takes_the_lock(s3, written):
    import threading
    winners = []
    for round_ in range(6):
        stores = [_fresh_store(s3, written) for _ in range(5)]
        barrier, results = threading.Barrier(len(stores)), {}

        def take(i):
            barrier.wait()
            try:
                acquire_writer_lock(stores[i], f"race{round_}-{i}")
                results[i] = "won"
            except StoreError as e:
                results[i] = str(e)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [i for i, r in results.items() if r == "won"]
        assert len(won) == 1, results
        assert all(f"locked by run race{round_}-{won[0]}" in r for i, r in results.items() if i != won[0])
        winners.append(won[0])
        release_writer_lock(stores[won[0]], f"race{round_}-{won[0]}")


def test_a_lock_created_between_the_check_and_the_write_is_not_overwritten(s3, written, monkeypatch):
    """The interleaving that let two runs both hold the check-write-read-back lock: B's lock appears after
    A looked. The conditional create refuses A, and B's lock object is left as B wrote it."""
    a, b = _fresh_store(s3, written), _fresh_store(s3, written)
    acquire_writer_lock(b, "run-B")
    real_get = type(a.group.store).get
    calls = {"n": 0}

    async def stale_get(self, key, prototype=None, byte_range=None):
        calls["n"] += 1
        if key.endswith("extract.lock") and calls["n"] == 1:
            return None  # A's check ran before B's PUT landed
        return await real_get(self, key, prototype=prototype, byte_range=byte_range)

    monkeypatch.setattr(type(a.group.store), "get", stale_get)
    with pytest.raises(StoreError, match="locked by run run-B"):
        acquire_writer_lock(a, "run-A")
    monkeypatch.undo()
    body = s3["client"].get_object(Bucket="bucket", Key="store/extract.lock")["Body"].read()
    assert json.loads(body)["run_id"] == "run-B"
    release_writer_lock(b, "run-B")


def test_a_server_ignoring_the_condition_is_named_best_effort(s3, written, monkeypatch, caplog):
    import logging
    store = _fresh_store(s3, written)
    fs = store.group.store.fs
    real = type(fs)._pipe_file

    async def ignoring(self, path, data, *args, mode="overwrite", **kw):  # an old server: no If-None-Match
        return await real(self, path, data, *args, **kw)

    monkeypatch.setattr(type(fs), "_pipe_file", ignoring)
    with caplog.at_level(logging.WARNING, logger="comad.extract"):
        acquire_writer_lock(store, "run-old")
    assert any("best effort" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match="locked by run run-old"):  # a held lock is still seen and refused
        acquire_writer_lock(_fresh_store(s3, written), "run-other")
    release_writer_lock(store, "run-old")
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comad.extract"):
        acquire_writer_lock(store, "run-new")  # moto honours it: no warning
    assert not [r for r in caplog.records if "best effort" in r.getMessage()]
    release_writer_lock(store, "run-new")


def test_an_input_on_s3_is_identified_by_size_and_etag(s3, monkeypatch):
    from extract.resume import source_identity
    for k, v in {**CREDS, "AWS_ENDPOINT_URL": s3["endpoint"]}.items():
        monkeypatch.setenv(k, v)
    client = s3["client"]
    client.put_object(Bucket="bucket", Key="data/x.tar", Body=b"a" * 100)
    first = source_identity("s3://bucket/data/x.tar")
    assert first["size"] == 100 and first["etag"] == hashlib.md5(b"a" * 100).hexdigest()
    client.put_object(Bucket="bucket", Key="data/x.tar", Body=b"b" * 100)  # same size, other bytes
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # a new run is a new process: no cached listing
    second = source_identity("s3://bucket/data/x.tar")
    assert second["size"] == 100 and second["etag"] != first["etag"]
