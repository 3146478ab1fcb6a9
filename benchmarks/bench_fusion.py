"""Fusion benchmark (issue 10, item 6): teachers complementary by construction, ONE store, every variant.

The digits are written with one horizontal band of the digit per RGB channel (top, middle, bottom);
three small teacher ViTs each read exactly one channel (their patch embedding is zero on the others), and
are trained supervised on it, CLS and every patch token (benchmarks/complementary_teachers.py: why no
teacher can know more than its band, while the three together see the whole digit; and why teachers
trained on partitions of the labels were tried and dropped). They run once, through `comad-extract`, into
ONE store; every student below is trained from that store with distill.sweep.run_sweep, per seed:
every single-teacher student, the three-teacher student with each gate variant, and each alignment
option with the joint gate (the VARIANTS table; a row whose resolved config equals an earlier row's,
e.g. align-cca and cls-on with fusion.toml's defaults, reuses that row's run instead of training it
twice); baselines are each teacher's own evaluation and a random-init student (not part of the goal:
the student sees all three bands, so a random-init ViT is already a strong linear-probe baseline).
Metrics (digits test split): kNN@20 and linear probe, on CLS and mean patch.

Goal (measured, reported as measured): the fused student ([bench] fused in fusion.toml) beats every
single-teacher student and every single teacher on all four metrics, on each seed; the joint gate is
>= the mean gate. Verdicts are printed per seed and metric.

    python -m benchmarks.bench_fusion [--out /tmp/bench_fusion] [--seeds 0 1 2] [--steps N]
                                      [--variants NAME ...] [--curve] [--curve-only] [--curve-steps N ...]
                                      [--set section.key=value ...]

--variants runs a subset of VARIANTS (names as in the table); --curve additionally trains the
[bench] curve_teachers single-teacher students for each of [bench] curve_steps (a separate run of each
length, full schedule), so the plateau against the teacher's own accuracy is visible: that is how the
benchmark shows a single-teacher student has reached its teacher at the step count used. Reruns reuse
the cached teachers, the data and the store (re-extracted only when the teachers' weights changed);
students are retrained.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from benchmarks.common import print_json, print_table
from benchmarks.complementary_teachers import TeacherRecipe, ensure_band_teachers, write_band_shards
from distill.cli import main as distill_main
from distill.sweep import run_sweep, write_tables
from extract.cli import main as extract_main
from store_schema.config import apply_override, config_from_dict, config_to_dict, dumps_toml, load_config

FUSION_TOML = Path(__file__).with_name("fusion.toml")

# name, overrides (on top of fusion.toml), what it tests. Single-teacher names must match fusion.toml's teachers.
VARIANTS: list[tuple[str, list[str], str]] = [
    ("single-A", ['train.teachers=["A"]'], "student of teacher A alone"),
    ("single-B", ['train.teachers=["B"]'], "student of teacher B alone"),
    ("single-C", ['train.teachers=["C"]'], "student of teacher C alone"),
    ("gate-mean", ['gate.variant="mean"'], "three teachers, uniform weights"),
    ("gate-affinity", ['gate.variant="affinity"'], "three teachers, affinity gate"),
    ("gate-agreement", ['gate.variant="agreement"'], "three teachers, agreement gate"),
    ("gate-joint", ['gate.variant="joint"'], "three teachers, joint gate (the default)"),
    ("align-pca", ['gate.variant="joint"', 'heads.adapter_init="pca"'], "joint, per-teacher PCA adapters"),
    ("align-cca", ['gate.variant="joint"', 'heads.adapter_init="cca"'], "joint, shared multi-set CCA basis"),
    ("align-trainable", ['gate.variant="joint"', 'heads.adapter_init="cca"', "heads.adapter_trainable=true"],
     "joint, trainable adapters from the CCA init"),
    ("fusion-loss", ['gate.variant="joint"', 'heads.fusion="loss"'],
     "joint, one student head per teacher, gated per-teacher losses"),
    ("cls-off", ['gate.variant="joint"', "loss.cls_weight=0.0"], "joint, without the CLS term (lambda_cls = 0)"),
    ("cls-on", ['gate.variant="joint"', "loss.cls_weight=1.0"], "joint, with the CLS term (lambda_cls = 1)"),
    ("prior-none", ['gate.variant="joint"', 'gate.prior="none"'], "joint, without the rank prior (the session-3 default)"),
    ("prior-power-1", ['gate.variant="joint"', "gate.prior_power=1.0"], "joint, rank prior to the power 1 (session 5)"),
    ("prior-power-4", ['gate.variant="joint"', "gate.prior_power=4.0"], "joint, rank prior to the power 4"),
    ("cls-gate", ['gate.variant="joint"', 'loss.cls_fusion="gate"'], "joint, the CLS term on the gated CLS targets"),
]
# Smoke-tested (--steps 100 --seeds 0, every variant trained and evaluated): all of them since the model code for
# cca / fusion = "loss" / cls_weight landed; `--variants working` runs this set.
WORKING_TODAY = [n for n, _, _ in VARIANTS]
METRICS = ("cls/knn@20", "mean_patch/knn@20", "cls/linear", "mean_patch/linear")


def metric(result: dict, name: str) -> float | None:
    """A metric 'feature/key' from an eval JSON ({feature: {key: v}}) or a sweep row ({'feature/key': v})."""
    if name in result:
        return result[name]
    feature, key = name.split("/", 1)
    ev = result.get(feature)
    return ev.get(key) if isinstance(ev, dict) else None


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def resolve_config(path: Path, out: Path, train_urls: list[str], test_urls: list[str], weights: dict[str, str],
                   user: list[str]) -> tuple[dict, Path]:
    """fusion.toml minus [bench], with this run's paths and the user's overrides -> ([bench], resolved file)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    bench = raw.pop("bench")
    items = [f"data.urls={_toml_list(train_urls)}", f"eval.train_urls={_toml_list(train_urls)}",
             f"eval.test_urls={_toml_list(test_urls)}", f"store.root={json.dumps(str(out / 'store'))}",
             f"train.run_dir={json.dumps(str(out / 'runs'))}"]
    items += [f"teachers.{n}.weights={json.dumps(p)}" for n, p in weights.items()]
    for item in items + user:
        apply_override(raw, item)
    cfg = config_from_dict(raw, source=str(path))
    resolved = out / "fusion.resolved.toml"
    resolved.write_text(dumps_toml(cfg), encoding="utf-8")
    return bench, resolved


def _run(main, argv: list[str]) -> float:
    print(f"\n$ {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc not in (0, None):
        raise SystemExit(f"stage failed (exit {rc}): {' '.join(argv)}")
    return time.perf_counter() - t0


def ensure_store(config: Path, out: Path, manifest: dict) -> float:
    """Extract once; a store written for other teacher weights is removed and re-extracted."""
    stamp = out / "store.teachers.json"
    want = {n: t["sha256"] for n, t in manifest["teachers"].items()}
    if (out / "store").exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != want):
        shutil.rmtree(out / "store")
    seconds = _run(extract_main, ["--config", str(config)])  # complete units are kept: a rerun is quick
    stamp.write_text(json.dumps(want))
    return seconds


def eval_baselines(config: Path, out: Path, teachers: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """Each teacher's own eval (seed 0 probe) and a random-init student per seed -> ({teacher: eval}, {seed: eval})."""
    (out / "eval").mkdir(exist_ok=True)
    teacher_evals, random_evals = {}, {}
    for t in teachers:
        path = out / "eval" / f"teacher_{t}.json"
        _run(distill_main, ["eval", "--config", str(config), "--teacher", t, "--out", str(path)])
        teacher_evals[t] = json.loads(path.read_text())
    for s in seeds:
        path = out / "eval" / f"random_init_seed{s}.json"
        _run(distill_main, ["eval", "--config", str(config), "--set", f"seed={s}", "--random-init", str(s),
                            "--out", str(path)])
        random_evals[s] = json.loads(path.read_text())
    return teacher_evals, random_evals


def distinct(config: Path, variants: list[tuple[str, list[str]]], base: list[str]) -> dict[str, str]:
    """{variant: earlier variant with the same resolved config (run_dir aside)}: those are not trained twice."""
    seen: dict[str, str] = {}
    same: dict[str, str] = {}
    for name, overrides in variants:
        d = config_to_dict(load_config(config, base + overrides))
        d["train"].pop("run_dir")
        key = json.dumps(d, sort_keys=True)
        if key in seen:
            same[name] = seen[key]
        else:
            seen[key] = name
    return same


def train_variants(config: Path, variants: list[tuple[str, list[str]]], run_dir: Path, seed: int,
                   steps: list[str]) -> list[dict[str, Any]]:
    """One run_sweep per distinct variant (timed), rows for every variant; sweep.md / sweep.csv hold them all."""
    base = [f"seed={seed}", f"train.run_dir={json.dumps(str(run_dir))}", *steps]
    same = distinct(config, variants, base)
    rows: dict[str, dict] = {}
    for name, overrides in variants:
        if name in same:
            continue
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)  # a rerun retrains: the measurement is of this run
        t0 = time.perf_counter()
        row = run_sweep(config, [(name, overrides)], base_overrides=base)[0]
        row["seconds"] = round(time.perf_counter() - t0, 1)  # train + eval
        rows[name] = row
    for name, _ in variants:
        if name in same:
            rows[name] = {**rows[same[name]], "variant": name, "same_config_as": same[name]}
    ordered = [rows[n] for n, _ in variants]
    write_tables(run_dir, ordered)
    return ordered


def _fmt(v: float | None) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def _median(xs: list[float | None]) -> float | None:
    """Median of the values that are not None (a failed run has None); None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command line -> (args, the VARIANTS names to train: [] with --curve-only)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(FUSION_TOML))
    ap.add_argument("--out", default="/tmp/bench_fusion")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: [bench] seeds")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: fusion.toml's)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help=f"a subset of: {', '.join(n for n, _, _ in VARIANTS)}; 'working' = {WORKING_TODAY}")
    ap.add_argument("--curve", action="store_true", help="also the single-teacher step curve ([bench] curve_*)")
    ap.add_argument("--curve-only", action="store_true", help="only the curve (with baselines), no variants")
    ap.add_argument("--curve-steps", type=int, nargs="+", default=None, help="default: [bench] curve_steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--cache-dir", default=None, help="teacher cache (default $COMAD_DEMO_CACHE or ~/.cache/comad-demo)")
    args = ap.parse_args(argv)

    table = {n: o for n, o, _ in VARIANTS}
    names = [n for n, _, _ in VARIANTS] if args.variants is None else \
        [m for v in args.variants for m in (WORKING_TODAY if v == "working" else [v])]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(table)} or 'working'")
    return args, [] if args.curve_only else names


def prepare_inputs(args: argparse.Namespace, out: Path,
                   timings: dict[str, float]) -> tuple[dict, list[int], Path, dict]:
    """Band shards, (cached) teachers, the resolved config -> ([bench], seeds, config file, teachers' manifest)."""
    raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    bench = raw["bench"]
    recipe = TeacherRecipe.from_dict(bench["teacher_recipe"])
    seeds = args.seeds if args.seeds is not None else list(bench["seeds"])
    knn_key = f"knn@{bench['knn_metric_k']}"
    if knn_key != "knn@20":
        raise SystemExit(f"[bench] knn_metric_k must be 20 (the goal's kNN@20), got {bench['knn_metric_k']}")

    t0 = time.perf_counter()
    shards = write_band_shards(out / "data", size=raw["data"]["image_size"], bands=bench["bands"],
                               test_fraction=recipe.test_fraction, seed=recipe.split_seed,
                               train_shards=bench["train_shards"], test_shards=bench["test_shards"])
    timings["data"] = time.perf_counter() - t0
    # The teachers' config (architectures) without paths: a throwaway resolution, before the weights exist.
    probe = copy.deepcopy({k: v for k, v in raw.items() if k != "bench"})
    for item in args.overrides:
        apply_override(probe, item)
    base_cfg = config_from_dict(probe, source=args.config)
    t0 = time.perf_counter()
    weights, manifest = ensure_band_teachers(base_cfg, bench["channels"], bench["bands"], recipe,
                                             root=Path(args.cache_dir) if args.cache_dir else None)
    timings["teachers"] = time.perf_counter() - t0
    bench, config = resolve_config(Path(args.config), out, shards.train_urls, shards.test_urls, weights,
                                   args.overrides)
    return bench, seeds, config, manifest


def train_students(config: Path, out: Path, variants: list[tuple[str, list[str]]], seeds: list[int],
                   steps: list[str], timings: dict[str, float]) -> tuple[dict, dict, dict, dict]:
    """Every variant on every seed -> (runs {variant: {metric: [per seed]}}, seconds {variant: [per trained run]},
    status {variant: [per seed]}, same_config_as {variant: the earlier variant whose run it reuses})."""
    names = [n for n, _ in variants]
    runs: dict[str, dict[str, list[float | None]]] = {n: {m: [] for m in METRICS} for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    status: dict[str, list[str]] = {n: [] for n in names}
    alias: dict[str, str] = {}
    for seed in seeds:
        if not names:
            break
        t0 = time.perf_counter()
        rows = train_variants(config, variants, out / f"seed{seed}", seed, steps)
        timings[f"students_seed{seed}"] = time.perf_counter() - t0
        for row in rows:
            n = row["variant"]
            status[n].append(row.get("status", "?") if row.get("eval", "ok") == "ok" else row["eval"])
            if "same_config_as" in row:
                alias[n] = row["same_config_as"]
            elif "seconds" in row:
                seconds[n].append(row["seconds"])
            for m in METRICS:
                v = row.get(m)
                runs[n][m].append(float(v) if isinstance(v, (int, float)) else None)
    return runs, seconds, status, alias


def train_curve(config: Path, out: Path, bench: dict, curve_steps: list[int],
                timings: dict[str, float]) -> dict[str, dict[int, dict[str, float | None]]]:
    """[bench] curve_teachers' single-teacher students, a full run per step count -> {teacher: {steps: metrics}}."""
    curve: dict[str, dict[int, dict[str, float | None]]] = {}
    t0 = time.perf_counter()
    for t in bench["curve_teachers"]:
        curve[t] = {}
        for n in curve_steps:
            row = train_variants(config, [(f"single-{t}-{n}steps", [f'train.teachers=["{t}"]'])],
                                 out / "curve" / f"seed{bench['curve_seed']}", bench["curve_seed"],
                                 [f"train.steps={n}"])[0]
            curve[t][n] = {m: row.get(m) for m in METRICS} | {"seconds": row.get("seconds")}
    timings["curve"] = time.perf_counter() - t0
    return curve


def print_metric_tables(bench: dict, teachers: list[str], names: list[str], teach: dict, rand: dict, runs: dict,
                        alias: dict[str, str], seeds: list[int], n_steps: int) -> None:
    """One table per metric: each teacher, the random-init student, every variant (median and per seed)."""
    for m in METRICS:
        rows = [(f"teacher {t} (channel {bench['channels'][t]}: band {bench['bands'][bench['channels'][t]]})",
                 _fmt(teach[t][m])) for t in teachers]
        rows.append((f"student random-init (median; seeds {seeds})",
                     f"{_fmt(_median(rand[m]))}  [{', '.join(_fmt(x) for x in rand[m])}]"))
        for n in names:
            tag = f" (same config as {alias[n]})" if n in alias else ""
            per_seed = ", ".join(_fmt(x) for x in runs[n][m])
            rows.append((f"student {n}{tag}", f"{_fmt(_median(runs[n][m]))}  [{per_seed}]"))
        print_table(f"Fusion on digits, {m} (test split; {n_steps} steps; median  [runs per seed {seeds}])", rows)


def report_goal(fused: str, names: list[str], singles: list[str], teachers: list[str], teach: dict, rand: dict,
                runs: dict, seeds: list[int]) -> dict[str, dict]:
    """The goal verdicts, printed -> {seed: {metric: fused vs the best single-teacher student, best teacher, random
    init; "goal": bool}}; {} unless the fused and every single-teacher student were trained."""
    if not (fused in names and all(s in names for s in singles)):
        print(f"\n(goal verdicts need {fused} and every single-teacher student in --variants)")
        return {}
    verdicts: dict[str, dict] = {}
    for i, seed in enumerate(seeds):
        v: dict[str, Any] = {}
        for m in METRICS:
            f = runs[fused][m][i]
            best_single = max((runs[s][m][i] for s in singles if runs[s][m][i] is not None), default=None)
            best_teacher = max(x for x in (teach[t][m] for t in teachers) if x is not None)
            r0 = rand[m][i]  # not part of the goal: the student sees all three bands, so random init is strong
            v[m] = {"fused": f, "best_single_student": best_single, "best_teacher": best_teacher,
                    "random_init": r0,
                    "beats_every_single_student": None if f is None or best_single is None else f > best_single,
                    "beats_every_teacher": None if f is None else f > best_teacher,
                    "beats_random_init": None if f is None or r0 is None else f > r0}
            if "gate-mean" in names and fused != "gate-mean":
                mean_v = runs["gate-mean"][m][i]
                v[m]["joint_ge_mean"] = None if f is None or mean_v is None else f >= mean_v
        v["goal"] = all(v[m]["beats_every_single_student"] and v[m]["beats_every_teacher"] for m in METRICS)
        verdicts[str(seed)] = v
    rows = []
    for seed, v in verdicts.items():
        for m in METRICS:
            x = v[m]
            rows.append((f"seed {seed} {m}", f"fused {_fmt(x['fused'])} vs best single {_fmt(x['best_single_student'])}"
                         f" / best teacher {_fmt(x['best_teacher'])}: beats singles {x['beats_every_single_student']},"
                         f" beats teachers {x['beats_every_teacher']}, joint>=mean {x.get('joint_ge_mean')};"
                         f" (info) random-init {_fmt(x['random_init'])}, beats it {x['beats_random_init']}"))
        rows.append((f"seed {seed} GOAL (all four metrics)", str(v["goal"])))
    print_table(f"Goal verdicts: fused student = {fused}", rows)
    return verdicts


def print_curve(curve: dict[str, dict[int, dict]], teach: dict, seed: int) -> None:
    """The step curve beside each curve teacher's own metrics: has the single-teacher student reached it?"""
    rows = []
    for t, pts in curve.items():
        rows.append((f"teacher {t}", "  ".join(f"{m} {_fmt(teach[t][m])}" for m in METRICS)))
        for n, r in pts.items():
            rows.append((f"single-{t} {n} steps", "  ".join(f"{m} {_fmt(r[m])}" for m in METRICS)))
    print_table(f"Single-teacher student vs steps (seed {seed}): has it reached its teacher?", rows)


def print_timings(names: list[str], seconds: dict[str, list[float]], n_steps: int, timings: dict[str, float]) -> None:
    """The median seconds of a trained student run, and each stage's seconds."""
    per_run = [s for n in names for s in seconds[n]]
    if per_run:
        print(f"\nseconds per student run (train {n_steps} steps + eval): median {statistics.median(per_run):.1f}, "
              f"{len(per_run)} runs")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def main(argv: list[str] | None = None) -> int:
    args, names = parse_args(argv)
    table = {n: o for n, o, _ in VARIANTS}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    bench, seeds, config, manifest = prepare_inputs(args, out, timings)
    cfg = load_config(config)
    teachers = list(cfg.teachers)
    singles = [n for n, o in table.items() if n.startswith("single-")]
    if sorted(s.removeprefix("single-") for s in singles) != sorted(teachers):
        raise SystemExit(f"VARIANTS' single-teacher rows {singles} do not match fusion.toml's teachers {teachers}")
    timings["extract"] = ensure_store(config, out, manifest)

    t0 = time.perf_counter()
    teacher_evals, random_evals = eval_baselines(config, out, teachers, seeds)
    timings["baseline_evals"] = time.perf_counter() - t0
    steps = [f"train.steps={args.steps}"] if args.steps else []
    n_steps = args.steps or cfg.train.steps
    runs, seconds, status, alias = train_students(config, out, [(n, table[n]) for n in names], seeds, steps, timings)
    curve = train_curve(config, out, bench, args.curve_steps or bench["curve_steps"], timings) \
        if args.curve or args.curve_only else {}

    # ---------------------------------------------------------------- report
    teach = {t: {m: metric(e, m) for m in METRICS} for t, e in teacher_evals.items()}
    rand = {m: [metric(random_evals[s], m) for s in seeds] for m in METRICS}
    print_metric_tables(bench, teachers, names, teach, rand, runs, alias, seeds, n_steps)
    fused = bench["fused"]
    verdicts = report_goal(fused, names, singles, teachers, teach, rand, runs, seeds)
    if curve:
        print_curve(curve, teach, bench["curve_seed"])
    print_timings(names, seconds, n_steps, timings)
    payload = {"seeds": seeds, "steps": n_steps, "metrics": list(METRICS), "fused": fused,
               "variants": {n: table[n] for n in names}, "same_config_as": alias, "teachers": teach, "random_init": rand,
               "runs": runs, "medians": {n: {m: _median(runs[n][m]) for m in METRICS} for n in names},
               "status": status, "seconds_per_run": seconds, "verdicts": verdicts,
               "curve": {t: {str(k): v for k, v in pts.items()} for t, pts in curve.items()},
               "teacher_fixtures": {"key": manifest.get("key"), "bands": manifest.get("bands"),
                                    "channels": manifest.get("channels"),
                                    "teachers": manifest.get("teachers"), "cka": manifest.get("cka")},
               "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print_json("fusion", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
