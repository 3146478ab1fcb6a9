"""Intra-op CPU threads per process: the cores left after the loader workers and other busy processes.

Why not torch's default (one thread per core): on a shared 2-core machine training ran at 1.4-1.7 it/s with
two threads and 14.2 it/s with one (issue 12). OpenMP threads spin-wait for each other at every op; when
another process holds a core, each op waits for the preempted thread. So a process gets the cores that
are free for it: its share of the machine (cgroup quota and CPU affinity, divided among the processes
torchrun starts on this node), less its loader workers (each decodes or reads on a core of its own),
less the cores other processes kept busy just before it started (single-process runs only: under
torchrun the siblings' own start-up would count). At least 1.

`threads = N` in the config (train.threads, data.threads) or `--threads N` overrides it; so does
OMP_NUM_THREADS in the environment when the config says 0. The choice is printed. A time-dependent
choice means two runs on a busy machine may use different counts, and kernels may then differ in the last
bits: for bit-identical reruns set the count (the reliability tests run with OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

SAMPLE_SECONDS = 0.3  # how long the load of other processes is sampled at start


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, v1 cfs quota/period); None when unlimited or unknown."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            text = open(path).read().strip()
            if parse:
                quota, period = parse(text)
            else:
                quota, period = text, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()
            if quota in ("max", "-1"):
                return None
            return float(quota) / float(period)
        except (OSError, ValueError):
            continue
    return None


def _system_busy() -> float | None:
    """Busy jiffies of all CPUs (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return float(sum(fields[:8]) - idle)


def busy_cores_of_others(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores kept busy by other processes over `seconds` (this process's own CPU time subtracted); 0 if unknown."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    a, own_a, t_a = _system_busy(), time.process_time(), time.monotonic()
    if a is None:
        return 0.0
    time.sleep(seconds)
    b, own_b, t_b = _system_busy(), time.process_time(), time.monotonic()
    return others_busy(a, b, own_b - own_a, t_b - t_a, ticks)


def others_busy(busy_a: float, busy_b: float, own_seconds: float, wall_seconds: float, ticks: int) -> float:
    """Busy cores of other processes from two /proc/stat busy counts and this process's CPU time between them."""
    if wall_seconds <= 0:
        return 0.0
    return max(0.0, ((busy_b - busy_a) / ticks - own_seconds) / wall_seconds)


def choose_threads(requested: int, loader_workers: int, key: str, cores: int | None = None,
                   local_processes: int | None = None, others: float | None = None,
                   env: dict[str, str] | None = None) -> ThreadChoice:
    """How many intra-op threads a process should use, and why (a sentence for the log).

    `requested` > 0 is used as is; otherwise OMP_NUM_THREADS (if set), otherwise the rule of the module
    docstring. `cores`, `local_processes`, `others` default to this machine's (measured here)."""
    env = os.environ if env is None else env
    if requested > 0:
        return ThreadChoice(requested, f"{key} = {requested}")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"{key} = 0 and OMP_NUM_THREADS={omp} in the environment")
    cores = available_cores() if cores is None else cores
    procs = max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))) if local_processes is None else max(1, local_processes)
    share = cores // procs if cores >= procs else 1
    if others is None:
        others = busy_cores_of_others() if procs == 1 else 0.0
    busy = int(others + 0.5) if procs == 1 else 0  # a core counts as taken when more than half of it is used
    free = max(1, min(share, cores - busy) - loader_workers)
    parts = [f"{cores} core(s)" + (f" / {procs} processes on this node" if procs > 1 else ""),
             f"{loader_workers} loader worker(s)"]
    if procs == 1:
        parts.append(f"{others:.1f} core(s) busy with other processes")
    return ThreadChoice(free, f"{key} = 0: {', '.join(parts)}")


def apply_threads(requested: int, loader_workers: int, key: str, say=None) -> ThreadChoice:
    """Choose (see choose_threads), set torch's intra-op threads, and report the choice through `say`."""
    choice = choose_threads(requested, loader_workers, key)
    torch.set_num_threads(choice.threads)
    if say is not None:
        say(f"using {choice.threads} intra-op CPU thread(s) ({choice.why}; set {key} or --threads to change it)")
    return choice
