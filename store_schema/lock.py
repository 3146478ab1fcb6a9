"""The writer lock: one extraction run per store (README "Writer lock").

`ROOT/extract.lock` is a plain JSON object, not a zarr node. Local stores create it exclusively (O_EXCL);
a lock left by a dead process on this host is taken over. On object stores it is a conditional create
(PUT with If-None-Match: *, which S3, GCS, Azure and MinIO implement; s3fs: pipe_file(mode="create")):
of two runs starting together exactly one gets it. Whether the server honours the condition is checked
by creating the lock a second time, which must fail; where it does not (an older S3-compatible server),
or the file system has no exclusive create, it falls back to check-write-read-back, which two runs
starting within the same moment can both pass: a warning says so.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .store import FeatureStore, StoreError, local_dir

LOCK_KEY = "extract.lock"
# An unreadable local lock this old is a writer that died writing it (a younger one may be a run that has
# created the file and not yet written it: taking that over would let two runs in).
TORN_LOCK_AGE_S = 60.0
log = logging.getLogger("comad.extract")
# zarr's LocalStore writes every file as `<path stem>.<uuid4 hex>.partial` and renames it into place.
ZARR_TEMPORARY = re.compile(r".*\.[0-9a-f]{32}\.partial")


def remove_dead_writer_temporaries(store: FeatureStore) -> list[str]:
    """Delete the temporary files a killed writer left in a local store; returns their paths.

    Called by the lock holder, the store's only writer, so every such file is debris. zarr creates the
    parent groups' `zarr.json` on each array it creates (write-temporary-then-rename), so a kill can leave
    `zarr.<hex>.partial` in the root, `units/` or a unit. Chunk directories (`units/.../c/`) are not walked:
    a unit is complete only after all its chunks are durable, and an incomplete one is deleted whole
    when it is redone. Object stores write whole objects and leave no temporaries.
    """
    root = local_dir(store, "")
    removed = []
    for dirpath, dirnames, filenames in os.walk(root) if root is not None else ():
        if Path(dirpath).relative_to(root).parts[:1] == ("units",):
            dirnames[:] = [d for d in dirnames if d != "c"]
        for f in filenames:
            if ZARR_TEMPORARY.fullmatch(f):
                Path(dirpath, f).unlink(missing_ok=True)
                removed.append(str(Path(dirpath, f).relative_to(root)))
    if removed:
        log.warning("%s: removed %d temporary file(s) a killed writer left behind: %s", store.root, len(removed),
                    ", ".join(sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def acquire_writer_lock(store: FeatureStore, run_id: str) -> None:
    """One extraction run per store. A lock left by a dead process on this host is taken over."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    local = local_dir(store, "")
    if local is not None:
        path = local / LOCK_KEY
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                held = _read_lock(path)
                if held.get("run_id") == run_id:
                    return
                if held.get("host") == info["host"] and not _pid_alive(int(held.get("pid", -1))):
                    path.unlink(missing_ok=True)  # its owner died: a preempted run, safe to resume
                    continue
                if not held and _age(path) > TORN_LOCK_AGE_S:  # empty or torn, long ago: its writer died writing it
                    path.unlink(missing_ok=True)
                    continue
                raise StoreError(
                    f"{store.root} is being written by another extraction (host {held.get('host')}, pid "
                    f"{held.get('pid')}, started {held.get('started')}). Two writers would corrupt it. If no such "
                    f"run is alive, delete {path} and rerun.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # e.g. a full disk: an empty lock file would refuse every later run
                path.unlink(missing_ok=True)
                raise
            return
        raise StoreError(f"could not take the writer lock {path}")
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    data = json.dumps(info).encode()
    fs_store, proto = store.group.store, default_buffer_prototype()
    if sync(fs_store.get(key, prototype=proto)) is not None:  # held (or ours: re-entrant)
        _refuse_or_reenter(store, key, run_id)
        return
    how = _create_exclusive(store, key, data, run_id)
    if how == "exclusive":
        return
    # No exclusive create here: write (unless the ignored create already did), read back (best effort).
    log.warning("%s: this object store does not honour conditional writes (If-None-Match); the writer lock "
                "is best effort: two extractions started at the same moment could both take it", store.root)
    if how == "unsupported":
        sync(fs_store.set(key, proto.buffer.from_bytes(data)))
    back = _held(store, key)
    if back.get("run_id") != run_id:
        raise StoreError(f"{store.root}: another extraction took the lock at the same moment ({back})")


def _create_exclusive(store: FeatureStore, key: str, data: bytes, run_id: str) -> str:
    """'exclusive' once the lock object is ours by a conditional create (StoreError when another run's);
    'ignored' when the server wrote it without honouring the condition; 'unsupported' when nothing was written."""
    zstore = store.group.store
    fs = getattr(zstore, "fs", None)
    if fs is None or not hasattr(fs, "_pipe_file"):
        return "unsupported"
    path = f"{zstore.path.rstrip('/')}/{key}"
    try:
        sync(fs._pipe_file(path, data, mode="create"))
    except FileExistsError:  # s3fs's translation of 412 PreconditionFailed: another run created it first
        _refuse_or_reenter(store, key, run_id)
        return "exclusive"
    except (TypeError, NotImplementedError):  # this file system has no mode="create"
        return "unsupported"
    except OSError as e:
        if "not implemented" in str(e).lower():  # 501 NotImplemented: the server rejects the condition
            return "unsupported"
        raise
    try:  # a server that ignores If-None-Match overwrites silently: then the first create proved nothing
        sync(fs._pipe_file(path, data, mode="create"))
    except FileExistsError:
        return "exclusive"
    return "ignored"


def _held(store: FeatureStore, key: str) -> dict[str, Any]:
    raw = sync(store.group.store.get(key, prototype=default_buffer_prototype()))
    try:
        return json.loads(raw.to_bytes()) if raw is not None else {}
    except ValueError:
        return {}  # a torn lock object


def _refuse_or_reenter(store: FeatureStore, key: str, run_id: str) -> None:
    held = _held(store, key)
    if held.get("run_id") != run_id:
        raise StoreError(f"{store.root} is locked by run {held.get('run_id')} on {held.get('host')} "
                         f"(started {held.get('started')}); delete {key} if no such run is alive")


def release_writer_lock(store: FeatureStore, run_id: str) -> None:
    local = local_dir(store, "")
    if local is not None:
        path = local / LOCK_KEY
        if path.exists() and _read_lock(path).get("run_id") == run_id:
            path.unlink(missing_ok=True)
        return
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    cur = sync(store.group.store.get(key, prototype=default_buffer_prototype()))
    if cur is not None and json.loads(cur.to_bytes()).get("run_id") == run_id:  # never release another run's lock
        sync(store.group.store.delete(key))


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn lock file: its writer died while writing it


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
