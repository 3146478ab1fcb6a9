"""Transfer benchmark (issue 5) on scikit-learn's digits, with the demo's three teachers:

students distilled from each single teacher and from all three with each gate variant (mean, affinity,
agreement, joint), over several seeds, against the teachers and random-init students. The teachers run
once (one store); every student comes from that store (`train.teachers`, `gate.variant`), which is the
"ablate cheaply" promise itself. Target: the three-teacher `joint` student reaches >= 95 % of the best
teacher's kNN accuracy and beats every single-teacher student. The numbers are reported as they come.

    python -m benchmarks.bench_transfer [--seeds 0 1 2] [--out /tmp/bench_transfer] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import print_json, print_table
from distill.cli import main as distill_main
from distill.demo.run_demo import run_demo
from distill.sweep import run_sweep

VARIANTS: list[tuple[str, list[str]]] = [
    ("single-mae", ['train.teachers=["mae"]']),
    ("single-mocov3", ['train.teachers=["mocov3"]']),
    ("single-ibot", ['train.teachers=["ibot"]']),
    ("three-mean", ['gate.variant="mean"']),
    ("three-affinity", ['gate.variant="affinity"']),
    ("three-agreement", ['gate.variant="agreement"']),
    ("three-joint", ['gate.variant="joint"']),
]
METRIC = ("cls", "knn@20")


def knn(row_or_eval: dict) -> float | None:
    feature, key = METRIC
    ev = row_or_eval.get(feature) if isinstance(row_or_eval.get(feature), dict) else None
    if ev is not None:
        return ev.get(key)
    return row_or_eval.get(f"{feature}/{key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/bench_transfer")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the demo's)")
    args = ap.parse_args()
    out = Path(args.out)
    steps = [f"train.steps={args.steps}"] if args.steps else []
    demo = run_demo(out / "demo", overrides=steps)  # data, teachers (cached), store, teacher + baseline evals
    config = demo["config"]
    teachers = {r["name"]: knn(r["eval"]) for r in demo["rows"] if r["kind"] == "teacher"}

    students: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    random_init: list[float] = []
    for seed in args.seeds:
        sweep_dir = out / f"seed{seed}"
        base = [f"seed={seed}", f'train.run_dir="{sweep_dir}"', *steps]
        rows = run_sweep(config, [(n, o) for n, o in VARIANTS], base_overrides=base)
        for row in rows:
            value = knn(row)
            if row.get("status") != "ok" or value is None:
                raise SystemExit(f"variant {row['variant']} (seed {seed}) gave no kNN accuracy: {row.get('status')}")
            students[row["variant"]].append(value)
        rand_json = sweep_dir / "random_init.json"
        distill_main(["eval", "--config", config, "--set", f"seed={seed}", "--random-init", str(seed),
                      "--out", str(rand_json)])
        random_init.append(knn(json.loads(rand_json.read_text())))

    best_teacher = max(teachers.values())
    med = {k: statistics.median(v) for k, v in students.items()}
    joint = med["three-joint"]
    singles = {k: v for k, v in med.items() if k.startswith("single-")}
    verdict = {"joint_over_best_teacher": joint / best_teacher,
               "goal_95pct_of_best_teacher": joint >= 0.95 * best_teacher,
               "goal_beats_every_single": all(joint > v for v in singles.values())}
    rows = [(f"teacher {n}", f"{v:.4f}") for n, v in teachers.items()]
    rows += [(f"student random-init (median of {len(random_init)})", f"{statistics.median(random_init):.4f}")]
    rows += [(f"student {k} (median; runs)", f"{med[k]:.4f}  {['%.4f' % x for x in v]}") for k, v in students.items()]
    rows += [("joint / best teacher (goal >= 0.95)", f"{verdict['joint_over_best_teacher']:.3f}"),
             ("joint beats every single-teacher student", str(verdict["goal_beats_every_single"]))]
    print_table(f"Transfer on digits: kNN@20 on CLS features (test split), seeds {args.seeds}", rows)
    print_json("transfer", {"metric": "/".join(METRIC), "seeds": args.seeds, "teachers": teachers,
                            "random_init": random_init, "students": students, "medians": med, **verdict,
                            "demo_timings_s": demo["timings_s"]})


if __name__ == "__main__":
    main()
