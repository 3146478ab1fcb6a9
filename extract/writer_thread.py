"""The store-writing thread of stage 1: zarr compression and I/O overlap the teachers' forwards.

The main thread sends messages; one thread owns every UnitWriter, so units are written in the order
their messages arrive and a failure stops the run at the next message (extract/pipeline.py).
"""
from __future__ import annotations

import queue
import threading
from typing import Any

from zarr.core.sync import sync

from store_schema.faults import fault_point
from store_schema.oserrors import explain
from store_schema.store import FeatureStore
from store_schema.writer import UnitWriter

WRITE_QUEUE_BATCHES = 8  # batches of rows waiting for the writer thread before the teachers wait


class ExtractionError(RuntimeError):
    """The run could not finish as asked (unreadable tars, too many skipped inputs, a failed process).

    Defined here, not in pipeline.py, because the writer thread raises it too and pipeline.py imports this
    module; callers import it from extract.pipeline, whose functions raise it.
    """


class BackgroundWriter:
    """Writes units in a thread. Messages: (op, url, *args), op in open/rows/skip/note/commit/fail.

    A failure in the thread is raised by the next `put` or by `close`, so the run stops on it.
    """

    def __init__(self, store: FeatureStore, maxsize: int = WRITE_QUEUE_BATCHES):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self.committed: list[dict[str, Any]] = []  # {url, unit, n_samples, bytes}
        self.writers: dict[str, UnitWriter] = {}
        self.thread = threading.Thread(target=self._run, name="comad-store-writer", daemon=True)
        self.thread.start()

    def put(self, msg: tuple | None) -> None:
        """Queue a message (None: stop); raises the thread's failure instead once there is one."""
        while True:
            if msg is not None:
                self.raise_failure()
            try:
                return self.queue.put(msg, timeout=0.2)  # the thread drains even after a failure: no deadlock
            except queue.Full:
                continue

    def close(self, check: bool = True) -> None:
        """Write everything queued and stop the thread; with `check`, raise its failure if any."""
        self.put(None)
        self.thread.join()
        if check:
            self.raise_failure()

    def raise_failure(self) -> None:
        if self.error is not None:
            e = self.error
            why = explain(self.store.root, e, "writing a unit") or f"{type(e).__name__}: {e}"
            raise ExtractionError(f"the store writer failed: {why}") from e

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            if self.error is not None:
                continue  # drain so that the producer never blocks; nothing more is written
            try:
                self._handle(*msg)
            except BaseException as e:  # noqa: BLE001 — re-raised in the main thread
                self.error = e

    def _handle(self, op: str, url: str, *args: Any) -> None:
        if op == "open":
            self.writers[url] = UnitWriter(self.store, url)
        elif op == "rows":
            self.writers[url].append(args[0])
        elif op == "skip":
            self.writers[url].skip(*args)
        elif op == "note":
            self.writers[url].note(*args)
        elif op == "commit":
            info = self.writers.pop(url).commit(*args)
            self.committed.append({"url": url, "unit": info.name, "n_samples": info.n_samples,
                                   "bytes": _stored_bytes(self.store, f"units/{info.name}")})
            fault_point("between_units")  # the unit is complete; the next one has not started writing
        elif op == "fail":
            writer = self.writers.pop(url, None) or UnitWriter(self.store, url)
            writer.fail(args[0])
        else:
            raise ValueError(f"unknown writer message {op!r}")


def _stored_bytes(store: FeatureStore, path: str) -> int:
    prefix = f"{store.group.path}/{path}" if store.group.path else path
    return int(sync(store.group.store.getsize_prefix(prefix)))
