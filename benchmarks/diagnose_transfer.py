"""Why the transfer benchmark's joint student falls short (issue 5): the ablations behind BENCHMARKS.md.

Reuses bench_transfer's demo directory (data, teacher fixtures, ONE store) and trains, from that store:
  - two-teacher joint students without each fixture in turn (does one teacher's targets hurt the fusion?),
    over --seeds at the demo's step count;
  - the single-best-teacher and three-teacher joint students for --long-steps (is it under-training?),
    over --long-seeds;
and reports kNN@20 and the linear probe on CLS and on the mean patch token of each, since CoMAD's
targets are patch tokens only.

    python -m benchmarks.diagnose_transfer [--out /tmp/bench_transfer] [--seeds 0 1 2] [--long-steps 1000]
                                           [--long-seeds 0]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import print_json, print_table
from distill.demo.run_demo import run_demo
from distill.sweep import run_sweep

TWO_TEACHER = [
    ("two-mae-mocov3", ['train.teachers=["mae", "mocov3"]']),
    ("two-mocov3-ibot", ['train.teachers=["mocov3", "ibot"]']),
]
LONG = [
    ("single-mocov3", ['train.teachers=["mocov3"]']),
    ("three-joint", ['gate.variant="joint"']),
]
METRICS = ("cls/knn@20", "mean_patch/knn@20", "cls/linear", "mean_patch/linear")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_transfer", help="bench_transfer's --out (its demo/ is reused)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="two-teacher ablation seeds")
    ap.add_argument("--long-steps", type=int, default=1000)
    ap.add_argument("--long-seeds", type=int, nargs="*", default=[0])
    args = ap.parse_args()
    out = Path(args.out)
    config = out / "demo" / "demo.toml"
    if not config.exists():
        config = Path(run_demo(out / "demo")["config"])

    results: dict[str, dict[str, list[float]]] = {}

    def record(rows: list[dict], suffix: str = "") -> None:
        for row in rows:
            if row.get("status") != "ok":
                raise SystemExit(f"variant {row['variant']} failed: {row.get('status')}")
            got = results.setdefault(row["variant"] + suffix, {m: [] for m in METRICS})
            for m in METRICS:
                got[m].append(float(row[m]))

    for seed in args.seeds:
        base = [f"seed={seed}", f'train.run_dir="{out}/diagnose/seed{seed}"']
        record(run_sweep(config, TWO_TEACHER, base_overrides=base))
    for seed in args.long_seeds:
        base = [f"seed={seed}", f'train.run_dir="{out}/diagnose/long{args.long_steps}/seed{seed}"',
                f"train.steps={args.long_steps}"]
        record(run_sweep(config, LONG, base_overrides=base), suffix=f" ({args.long_steps} steps)")

    med = {k: {m: statistics.median(v[m]) for m in METRICS} for k, v in results.items()}
    print_table("Transfer diagnosis: accuracy on the digits test split (median over seeds; runs)", [
        (k, "  ".join(f"{m} {med[k][m]:.4f} {['%.3f' % x for x in v[m]]}" for m in METRICS))
        for k, v in results.items()])
    print_json("transfer_diagnosis", {"seeds": args.seeds, "long_steps": args.long_steps, "long_seeds": args.long_seeds,
                                      "medians": med, "runs": results})


if __name__ == "__main__":
    main()
