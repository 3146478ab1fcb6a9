"""Reused shared-memory batch buffers between the store's loader workers and the trainer (issue 14, item 3).

Measured (BENCHMARKS.md, "Session 5: issue 14"): with torch's transport a loader worker puts every batch
into *new* shared memory (allocation, a page fault per 4 KiB, the copy) and the trainer maps each one
anew, so a worker spent ~4x the CPU of the same read in the trainer's own process. Here each worker owns
`slots` fixed buffers in anonymous shared memory, mapped by the trainer process *before* the workers are
forked (so both sides see the same pages, faulted in once): a worker gathers a batch straight into a free
buffer and sends only its layout (a few numbers); the trainer's tensors are views of that buffer.

A buffer is handed back to its worker only when every tensor (and view, and numpy view) of the batch is
gone — a finaliser on the batch's one storage — so a trainer that keeps a batch, or part of it, never
sees it overwritten. A worker that finds no free buffer (the trainer holds them all) or a batch that
does not fit falls back to torch's transport for that batch: never a wait, never a deadlock. Without
the `fork` start method (nothing is inherited) there is no pool, and torch's transport is used.
"""
from __future__ import annotations

import mmap
import os
import weakref
from typing import Any, Callable

import numpy as np
import torch

POOLED = "__comad_pooled__"  # the key of a pooled batch's layout, as sent through the loader
_ALIGN = 64  # every leaf starts on a cache line (and on its dtype's alignment)

Leaves = list[tuple[tuple[str, ...], np.ndarray]]  # (path in the nested dict, first part's array)


def flatten(tree: Any, path: tuple[str, ...] = ()) -> Leaves:
    """[(path, leaf)] of a nested dict, in key order."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in flatten(v, (*path, k))]
    return [(path, tree)]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class BatchPool:
    """`slots` buffers of `slot_bytes` for each of `workers` loader workers; create it in the trainer
    process before the workers start (see the module docstring)."""

    def __init__(self, workers: int, slot_bytes: int, slots: int = 4):
        if not 0 < slots < 256:
            raise ValueError(f"slots = {slots}: 1..255 (a slot id travels as one byte)")
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.slots = slots
        self.mem = [mmap.mmap(-1, self.slot_bytes * slots) for _ in range(workers)]  # MAP_SHARED | ANONYMOUS
        self.pipes = [os.pipe() for _ in range(workers)]  # free slot ids, trainer -> worker
        for r, w in self.pipes:
            os.set_blocking(r, False)
            os.write(w, bytes(range(slots)))
        weakref.finalize(self, _close, [fd for p in self.pipes for fd in p])
        self.pooled = self.fresh = 0  # batches through the pool / not (trainer side: counted on unpack)

    # ------------------------------------------------------------------ worker side
    def pack(self, worker: int, parts: list[dict[str, Any]], rows: int,
             fill: Callable[..., None]) -> dict[str, Any] | None:
        """Gather one batch of `rows` rows into a free buffer of `worker`: fill(out, *part_arrays) writes
        one leaf. Returns the layout to send, or None (no free buffer, or it does not fit)."""
        layout, size = [], 0
        for path, x0 in flatten(parts[0]):
            shape = (rows, *x0.shape[1:])
            layout.append((path, size, x0.dtype.str, shape))
            size += -(-int(np.prod(shape)) * x0.dtype.itemsize // _ALIGN) * _ALIGN
        if size > self.slot_bytes:
            return None
        try:
            slot = os.read(self.pipes[worker][0], 1)[0]
        except BlockingIOError:  # every buffer is still held by the trainer
            return None
        base = slot * self.slot_bytes
        for path, off, dtype, shape in layout:
            out = np.frombuffer(self.mem[worker], dtype=dtype, count=int(np.prod(shape)), offset=base + off)
            fill(out.reshape(shape), *(_get(p, path) for p in parts))
            del out  # no export of the mapping stays behind in the worker
        return {POOLED: (worker, slot, layout)}

    # ------------------------------------------------------------------ trainer side
    def unpack(self, item: Any) -> Any:
        """A batch as the loader delivered it -> tensors (views of the worker's buffer when pooled)."""
        if not (isinstance(item, dict) and POOLED in item):
            self.fresh += 1
            return item
        worker, slot, layout = item[POOLED]
        whole = torch.frombuffer(self.mem[worker], dtype=torch.uint8, count=self.slot_bytes,
                                 offset=slot * self.slot_bytes)
        # One storage for the whole batch: it dies when the last tensor or view of the batch does.
        weakref.finalize(whole.untyped_storage(), self._give_back, worker, slot)
        out: dict[str, Any] = {}
        for path, off, dtype, shape in layout:
            dt = np.dtype(dtype)
            n = int(np.prod(shape)) * dt.itemsize
            _set(out, path, whole[off:off + n].view(TORCH_DTYPES[dt.str.lstrip("<|=")]).view(shape))
        self.pooled += 1
        return out

    def _give_back(self, worker: int, slot: int) -> None:
        try:
            os.write(self.pipes[worker][1], bytes([slot]))
        except OSError:  # the pool was closed (the loader is gone): nothing to give back to
            pass


# numpy dtype code (no byte order) -> torch dtype, for every array a store batch holds (store_dataset uses it too)
TORCH_DTYPES = {np.dtype(d).str.lstrip("<|="): getattr(torch, d) for d in
                ("uint8", "int8", "int32", "int64", "float16", "float32", "float64")}


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
