"""The writer lock: one extraction run per store (README "Writer lock").

`ROOT/extract.lock` is a plain JSON object, not a zarr node. Local stores create it exclusively; a lock
left by a dead process on this host is taken over. Object stores have no exclusive create through
fsspec, so there it is check-write-read-back (best effort).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .store import FeatureStore, StoreError, local_dir

LOCK_KEY = "extract.lock"


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
                raise StoreError(
                    f"{store.root} is being written by another extraction (host {held.get('host')}, pid "
                    f"{held.get('pid')}, started {held.get('started')}). Two writers would corrupt it. If no such "
                    f"run is alive, delete {path} and rerun.")
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise StoreError(f"could not take the writer lock {path}")
    # Object stores have no exclusive create through fsspec: check, write, read back (best effort).
    fs_store = store.group.store
    key = f"{store.group.path}/{LOCK_KEY}" if store.group.path else LOCK_KEY
    proto = default_buffer_prototype()
    cur = sync(fs_store.get(key, prototype=proto))
    if cur is not None:
        held = json.loads(cur.to_bytes())
        if held.get("run_id") != run_id:
            raise StoreError(f"{store.root} is locked by run {held.get('run_id')} on {held.get('host')} "
                             f"(started {held.get('started')}); delete {key} if no such run is alive")
        return
    sync(fs_store.set(key, proto.buffer.from_bytes(json.dumps(info).encode())))
    back = json.loads(sync(fs_store.get(key, prototype=proto)).to_bytes())
    if back.get("run_id") != run_id:
        raise StoreError(f"{store.root}: another extraction took the lock at the same moment ({back})")


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
