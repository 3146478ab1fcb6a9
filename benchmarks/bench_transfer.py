"""Transfer benchmark on scikit-learn's digits, with the demo's three teacher fixtures (issues 5 and 10).

The teachers run once (one store, the demo's); every student comes from that store through
distill.sweep.run_sweep: each single-teacher student, the three-teacher student with the shipped
defaults (`fused`), each gate variant, and each alternative target option (per-teacher PCA, trainable
adapters, loss-level fusion, no CLS term), over several seeds, against the teachers and random-init
students. Metrics: kNN@20 and linear probe on CLS and on the mean patch token (digits test split).

Goal (issue 10): the fused student reaches >= 0.95 of the best teacher on the best feature (the highest
teacher number over the four metrics, compared with the fused student's number on that metric), and is
>= every single-teacher student on that metric; each verdict is printed per seed. Reported as measured.

    python -m benchmarks.bench_transfer [--seeds 0 1 2] [--out /tmp/bench_transfer] [--steps N]
                                        [--variants NAME ...]
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

# name, overrides on top of the shipped demo config (adapter_init "cca", cls_weight 1, gate "joint", prior "rankme",
# prior_power 2).
VARIANTS: list[tuple[str, list[str]]] = [
    ("fused", []),
    ("single-mae", ['train.teachers=["mae"]']),
    ("single-mocov3", ['train.teachers=["mocov3"]']),
    ("single-ibot", ['train.teachers=["ibot"]']),
    ("gate-mean", ['gate.variant="mean"']),
    ("gate-affinity", ['gate.variant="affinity"']),
    ("gate-agreement", ['gate.variant="agreement"']),
    ("align-pca", ['heads.adapter_init="pca"']),
    ("align-trainable", ["heads.adapter_trainable=true"]),
    ("fusion-loss", ['heads.fusion="loss"']),
    ("no-cls-term", ["loss.cls_weight=0.0"]),
    ("prior-none", ['gate.prior="none"']),
    ("gate-mean-prior-none", ['gate.variant="mean"', 'gate.prior="none"']),
    ("prior-power-1", ["gate.prior_power=1.0"]),
    ("prior-power-4", ["gate.prior_power=4.0"]),
    ("cls-gate", ['loss.cls_fusion="gate"']),
]
METRICS = ("cls/knn@20", "cls/linear", "mean_patch/knn@20", "mean_patch/linear")


def metric(ev: dict, name: str) -> float:
    feature, key = name.split("/")
    return float(ev[feature][key]) if isinstance(ev.get(feature), dict) else float(ev[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/bench_transfer")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the demo's)")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of VARIANTS by name")
    args = ap.parse_args()
    chosen = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    if "fused" not in [n for n, _ in chosen]:
        chosen.insert(0, VARIANTS[0])  # the goal needs it
    out = Path(args.out)
    steps = [f"train.steps={args.steps}"] if args.steps else []
    demo = run_demo(out / "demo", overrides=steps)  # data, teachers (cached), store, teacher + baseline evals
    config = demo["config"]
    teachers = {r["name"]: {m: metric(r["eval"], m) for m in METRICS} for r in demo["rows"] if r["kind"] == "teacher"}
    best_metric, best_teacher = max(((m, t) for t in teachers for m in METRICS), key=lambda x: teachers[x[1]][x[0]])
    best = teachers[best_teacher][best_metric]

    runs: dict[str, dict[str, list[float]]] = {n: {m: [] for m in METRICS} for n, _ in chosen}
    random_init: dict[str, list[float]] = {m: [] for m in METRICS}
    verdicts = []
    for seed in args.seeds:
        sweep_dir = out / f"seed{seed}"
        rows = run_sweep(config, chosen, base_overrides=[f"seed={seed}", f'train.run_dir="{sweep_dir}"', *steps])
        for row in rows:
            if row.get("status") != "ok":
                raise SystemExit(f"variant {row['variant']} (seed {seed}) failed: {row.get('status')}")
            for m in METRICS:
                runs[row["variant"]][m].append(float(row[m]))
        rand_json = sweep_dir / "random_init.json"
        distill_main(["eval", "--config", config, "--set", f"seed={seed}", "--random-init", str(seed),
                      "--out", str(rand_json)])
        rand = json.loads(rand_json.read_text())
        for m in METRICS:
            random_init[m].append(metric(rand, m))
        fused = runs["fused"][best_metric][-1]
        singles = {n: v[best_metric][-1] for n, v in runs.items() if n.startswith("single-")}
        verdicts.append({"seed": seed, "fused": fused, "over_best_teacher": fused / best,
                         "goal_95pct_of_best_teacher": fused >= 0.95 * best,
                         "goal_ge_every_single": all(fused >= v for v in singles.values())})

    med = {n: {m: statistics.median(v[m]) for m in METRICS} for n, v in runs.items()}
    rows = [(f"teacher {n}", "  ".join(f"{v[m]:.3f}" for m in METRICS)) for n, v in teachers.items()]
    rows.append(("student random-init (median)", "  ".join(f"{statistics.median(random_init[m]):.3f}" for m in METRICS)))
    rows += [(f"student {n} (median; runs)", "  ".join(f"{med[n][m]:.3f} {['%.3f' % x for x in runs[n][m]]}"
                                                      for m in METRICS)) for n in runs]
    rows += [(f"seed {v['seed']}: fused / best teacher on {best_metric} (>= 0.95), >= every single",
              f"{v['over_best_teacher']:.3f}  {v['goal_95pct_of_best_teacher']}  {v['goal_ge_every_single']}")
             for v in verdicts]
    print_table(f"Transfer on digits ({' | '.join(METRICS)}), seeds {args.seeds}; best teacher: "
                f"{best_teacher} {best_metric} {best:.3f}", rows)
    print_json("transfer", {"metrics": METRICS, "seeds": args.seeds, "teachers": teachers,
                            "best_teacher": [best_teacher, best_metric, best], "random_init": random_init,
                            "runs": runs, "medians": med, "verdicts": verdicts, "demo_timings_s": demo["timings_s"],
                            "steps": args.steps})


if __name__ == "__main__":
    main()
