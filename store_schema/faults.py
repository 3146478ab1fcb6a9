"""Fault points for the reliability tests.

`COMAD_FAULT=<point>:<n>` in the environment kills the process with SIGKILL the n-th time it reaches
`fault_point("<point>")` — the way a preempted machine dies: no cleanup, no exception handlers.
Without the variable a fault point is one string comparison. Points: decode, teacher_forward,
shard_write, between_units, stats_merge (extraction); train_step, checkpoint_write (training).
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("COMAD_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if name != target:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
