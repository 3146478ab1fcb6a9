"""Training wall time against intra-op threads, alone and beside a busy process (issue 12, item 2).

    python -m benchmarks.bench_threads --config demo_out/demo.toml --steps 200 --threads 2 0

runs `comad-distill train` (a fresh run_dir each time, in a subprocess, OMP_NUM_THREADS unset) once per
(--threads value, busy or not): `--threads 0` is the automatic choice (store_schema/threads.py), a number
forces it (2 = torch's default on a 2-core machine). "busy" starts `python -c 'while True: pass'` first, as
another job on a shared machine would. Prints wall seconds and steps/s per case, the chosen count as the
command logged it. Needs a store the config points at (e.g. from `comad-demo`, whose demo.toml it takes).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

BUSY = [sys.executable, "-c", "while True: pass"]


def run_case(config: str, steps: int, threads: int, busy: bool, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    spinner = subprocess.Popen(BUSY) if busy else None
    try:
        if spinner is not None:
            time.sleep(2.0)  # let it take its core before the thread choice samples the load
        with tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, "-m", "distill", "train", "--config", config, "--threads", str(threads),
                   "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={steps}",
                   "--set", f"train.run_dir=\"{run_dir}\"", *[a for s in extra for a in ("--set", s)]]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if r.returncode != 0:
        raise SystemExit(f"bench_threads: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    chosen = re.search(r"using (\d+) intra-op CPU thread\(s\) \(([^;]*)", r.stderr)
    return {"threads": threads, "busy": busy, "wall_s": wall, "steps_per_s": steps / wall,
            "chosen": int(chosen.group(1)) if chosen else None, "why": chosen.group(2) if chosen else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_threads", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a config whose store exists (e.g. demo_out/demo.toml)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 0], help="values of --threads (0 = automatic)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    p.add_argument("--busy", choices=("no", "yes", "both"), default="both")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; {args.steps} steps")
    print("| busy process | --threads | threads used | wall s | steps/s |")
    print("|---|---|---|---|---|")
    for busy in {"no": [False], "yes": [True], "both": [False, True]}[args.busy]:
        for threads in args.threads:
            row = run_case(args.config, args.steps, threads, busy, args.set)
            print(f"| {'yes' if busy else 'no'} | {threads} | {row['chosen']} ({row['why']}) | {row['wall_s']:.1f} | "
                  f"{row['steps_per_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
