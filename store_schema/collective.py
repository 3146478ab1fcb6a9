"""Small helpers both stages use around their processes (one definition each).

`gather_objects`: every rank's small Python object, on every rank (run summaries, "did the store change",
error messages); `identity`: the DataLoader collate of datasets that yield whole batches (a module-level
function, so worker processes can unpickle it).
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(obj: Any, world: int, group: Any = None) -> list[Any]:
    """[rank 0's obj, rank 1's, ...] on every rank; [obj] alone without a process group (or world 1).
    `group`: the process group to use (None: the default one)."""
    if world == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def identity(x: Any) -> Any:
    return x
