"""The store-writing thread of stage 1: zarr compression and I/O overlap the teachers' forwards.

The main thread calls BackgroundWriter's methods, which queue the step; one thread owns every UnitWriter,
so units are written in the order of the calls, and a failure stops the run at the next call
(extract/pipeline.py).
"""
from __future__ import annotations

import queue
import threading
from typing import Any

from zarr.core.sync import sync

from store_schema.faults import fault_point
from store_schema.oserrors import explain
from store_schema.skips import SkipKind
from store_schema.store import FeatureStore
from store_schema.writer import UnitRows, UnitWriter

WRITE_QUEUE_BATCHES = 8  # batches of rows waiting for the writer thread before the teachers wait


class ExtractionError(RuntimeError):
    """The run could not finish as asked (unreadable tars, too many skipped inputs, a failed process).

    Defined here, not in pipeline.py, because the writer thread raises it too and pipeline.py imports this
    module; callers import it from extract.pipeline, whose functions raise it.
    """


class BackgroundWriter:
    """Writes units in a thread: `open`, `rows`, `skip`, `note`, `commit` and `fail` queue that step for one
    input URL and return at once (a full queue waits).

    A failure in the thread is raised by the next call or by `close`, so the run stops on it.
    """

    def __init__(self, store: FeatureStore, maxsize: int = WRITE_QUEUE_BATCHES):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize)  # (bound _do_* method, args), or None: stop
        self.error: BaseException | None = None
        self.committed: list[dict[str, Any]] = []  # {url, unit, n_samples, bytes}
        self.writers: dict[str, UnitWriter] = {}
        self.thread = threading.Thread(target=self._run, name="comad-store-writer", daemon=True)
        self.thread.start()

    def open(self, url: str) -> None:
        """Start the unit of `url` (its earlier incomplete attempt is replaced)."""
        self._put((self._do_open, (url,)))

    def rows(self, url: str, rows: UnitRows) -> None:
        self._put((self._do_rows, (url, rows)))

    def skip(self, url: str, index: int, key: str | None, reason: str, kind: SkipKind) -> None:
        self._put((self._do_skip, (url, index, key, reason, kind)))

    def note(self, url: str, index: int, key: str, note: str) -> None:
        self._put((self._do_note, (url, index, key, note)))

    def commit(self, url: str, source_id: dict[str, Any] | None) -> None:
        """Complete the unit of `url`; it is added to `committed` once durable."""
        self._put((self._do_commit, (url, source_id)))

    def fail(self, url: str, reason: str) -> None:
        """Record the unit of `url` as failed (its input could not be read), with the reason."""
        self._put((self._do_fail, (url, reason)))

    def close(self, check: bool = True) -> None:
        """Write everything queued and stop the thread; with `check`, raise its failure if any."""
        self._put(None)
        self.thread.join()
        if check:
            self.raise_failure()

    def raise_failure(self) -> None:
        if self.error is not None:
            e = self.error
            why = explain(self.store.root, e, "writing a unit") or f"{type(e).__name__}: {e}"
            raise ExtractionError(f"the store writer failed: {why}") from e

    def _put(self, msg: tuple | None) -> None:
        """Queue a step (None: stop); raises the thread's failure instead once there is one."""
        while True:
            if msg is not None:
                self.raise_failure()
            try:
                return self.queue.put(msg, timeout=0.2)  # the thread drains even after a failure: no deadlock
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            if self.error is not None:
                continue  # drain so that the producer never blocks; nothing more is written
            step, args = msg
            try:
                step(*args)
            except BaseException as e:  # noqa: BLE001 — re-raised in the main thread
                self.error = e

    # The steps, run in the writer thread only.
    def _do_open(self, url: str) -> None:
        self.writers[url] = UnitWriter(self.store, url)

    def _do_rows(self, url: str, rows: UnitRows) -> None:
        self.writers[url].append(rows)

    def _do_skip(self, url: str, index: int, key: str | None, reason: str, kind: SkipKind) -> None:
        self.writers[url].skip(index, key, reason, kind)

    def _do_note(self, url: str, index: int, key: str, note: str) -> None:
        self.writers[url].note(index, key, note)

    def _do_commit(self, url: str, source_id: dict[str, Any] | None) -> None:
        info = self.writers.pop(url).commit(source_id)
        self.committed.append({"url": url, "unit": info.name, "n_samples": info.n_samples,
                               "bytes": _stored_bytes(self.store, f"units/{info.name}")})
        fault_point("between_units")  # the unit is complete; the next one has not started writing

    def _do_fail(self, url: str, reason: str) -> None:
        writer = self.writers.pop(url, None) or UnitWriter(self.store, url)
        writer.fail(reason, SkipKind.UNREADABLE_TAR)


def _stored_bytes(store: FeatureStore, path: str) -> int:
    prefix = f"{store.group.path}/{path}" if store.group.path else path
    return int(sync(store.group.store.getsize_prefix(prefix)))
