"""`comad-demo [--out DIR] [--quick]`: the whole pipeline, offline, on scikit-learn's digits, in minutes on a CPU.

1. writes the digits as WebDataset shards (stratified, seeded train/test split);
2. trains (or reuses from the cache) three small teachers, each by a small version of its own method
   (MAE masked reconstruction, MoCo v3 momentum contrast, iBOT masked self-distillation; no labels),
   saved in the official MAE / MoCo v3 / iBOT checkpoint layouts, bit-reproducibly;
3. writes `<out>/demo.toml` (the shipped demo config with this run's paths) and runs the same commands a
   user runs: `comad-extract`, `comad-distill train`, `comad-distill eval` for each teacher, a
   random-init student and the distilled student (in this process, through their `main(argv)`);
4. prints a table of kNN / linear-probe accuracies, writes `<out>/results.json` (with each teacher's
   weights sha256, to compare two runs' fixtures) and `<out>/report.png`.

Exit status: 0 done; 1 a stage failed (its command is printed, rerun it alone to debug); 2 a bad
argument, config or output directory.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from distill.cli import main as distill_main
from distill.demo.digits_data import write_digits_shards
from distill.report import ModelResult, format_table, read_metrics, write_report_png
from distill.demo.teacher_fixtures import OBJECTIVES, FixtureRecipe, ensure_teachers
from extract.cli import main as extract_main
from store_schema.config import ConfigError, PipelineConfig, dumps_toml, load_config

DEMO_TOML = Path(__file__).with_name("demo.toml")
MARKER = ".comad-demo"  # marks a directory this command owns, so a rerun may clear what it wrote there
OWNED = ("data", "store", "run", "eval", "demo.toml", "results.json", "report.png")
TRAIN_SHARDS, TEST_SHARDS = 4, 2
# --quick: a short distillation and probe for tests; teachers, data and extraction stay the same.
QUICK_OVERRIDES = ["train.steps=40", "optim.warmup_steps=5", "train.checkpoint_every=20", "train.log_every=5",
                   "eval.probe_epochs=10"]


class DemoError(RuntimeError):
    """The demo cannot run (bad output directory, unsupported teacher); the message says what to do."""


class StageFailed(DemoError):
    """A pipeline command exited non-zero; the message holds the command to rerun alone."""


def prepare_out_dir(out: Path) -> None:
    """Create `out`, or clear what an earlier comad-demo wrote there; refuse a non-empty foreign directory."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"--out {out} is not empty and was not written by comad-demo; "
                            f"pass a new or empty directory (nothing there was changed)")
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by comad-demo; a rerun with --out here replaces its outputs\n")


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"  # JSON string escapes are valid TOML


def path_overrides(out: Path, train_urls: list[str], test_urls: list[str], weights: dict[str, str]) -> list[str]:
    """--set items pointing the config at this run's shards, store, run dir and teacher files."""
    items = [f"data.urls={_toml_list(train_urls)}", f"eval.train_urls={_toml_list(train_urls)}",
             f"eval.test_urls={_toml_list(test_urls)}", f"store.root={json.dumps(str(out / 'store'))}",
             f"train.run_dir={json.dumps(str(out / 'run'))}"]
    return items + [f"teachers.{n}.weights={json.dumps(p)}" for n, p in weights.items()]


def _stage(name: str, main: Callable[[list[str]], int], prog: str, argv: list[str],
           log: Callable[[str], None]) -> float:
    """Run one pipeline command in-process; returns its seconds; a non-zero exit raises StageFailed."""
    cmd = " ".join([prog, *argv])
    log(f"\n$ {cmd}")
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise StageFailed(f"stage {name!r} failed with exit status {rc}; rerun it alone to see why:\n  {cmd}")
    return time.perf_counter() - t0


def _evaluate(cfg: PipelineConfig, conf: list[str], out: Path,
              log: Callable[[str], None]) -> tuple[list[ModelResult], float]:
    """`comad-distill eval` of each teacher, a random-init and the distilled student -> (results, their seconds)."""
    (out / "eval").mkdir()
    models = [(f"teacher {n} ({OBJECTIVES[t.format]})", "teacher", ["--teacher", n], f"teacher_{n}")
              for n, t in cfg.teachers.items()]
    models += [(f"student random-init (seed {cfg.seed})", "random-init", ["--random-init", str(cfg.seed)],
                "random_init"),
               (f"student distilled ({cfg.train.steps} steps)", "distilled", ["--checkpoint", cfg.train.run_dir],
                "distilled")]
    results, t0 = [], time.perf_counter()
    for name, kind, which, file in models:
        path = out / "eval" / f"{file}.json"
        _stage(f"eval {file}", distill_main, "comad-distill", ["eval", *conf, *which, "--out", str(path)], log)
        results.append(ModelResult(name, kind, json.loads(path.read_text(encoding="utf-8"))))
    return results, time.perf_counter() - t0


def _write_results(out: Path, quick: bool, resolved: Path, results: list[ModelResult], manifest: dict,
                   timings: dict[str, float], log: Callable[[str], None]) -> dict:
    """`<out>/results.json` (returned) and the table and timings, logged."""
    summary = {"out": str(out), "quick": quick, "config": str(resolved),
               "rows": [{"name": r.name, "kind": r.kind, "eval": r.eval} for r in results],
               "teacher_fixtures": manifest,
               "teacher_weights_sha256": {n: t["sha256"] for n, t in manifest["teachers"].items()},
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "report_png": str(out / "report.png")}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log("\n" + format_table(results))
    log("\nkNN: DINO weighted kNN (train split -> test split); linear: linear probe; features after the final norm."
        "\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    log(f"wrote {out / 'results.json'} and {out / 'report.png'}; rerun a stage with --config {resolved}")
    return summary


def run_demo(out: Path, quick: bool = False, config: Path = DEMO_TOML, overrides: Sequence[str] = (),
             cache_dir: Path | None = None, recipe: FixtureRecipe = FixtureRecipe(),
             log: Callable[[str], None] = print) -> dict:
    """Run the demo into `out`; returns the results dict also written to `<out>/results.json`."""
    t_start = time.perf_counter()
    out = Path(out).resolve()
    user = (QUICK_OVERRIDES if quick else []) + list(overrides)
    base = load_config(config, user)  # teacher architectures and sizes decide the fixture cache entry
    unknown = [f"{n} (format {t.format!r})" for n, t in base.teachers.items() if t.format not in OBJECTIVES]
    if unknown:
        raise DemoError(f"the demo trains teacher fixtures for formats {sorted(OBJECTIVES)} only; "
                        f"not for {', '.join(unknown)}")
    prepare_out_dir(out)  # only once the config is known good: a rerun clears the previous outputs
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    shards = write_digits_shards(out / "data", size=base.data.image_size, test_fraction=recipe.test_fraction,
                                 seed=recipe.split_seed, train_shards=TRAIN_SHARDS, test_shards=TEST_SHARDS)
    timings["data"] = time.perf_counter() - t0
    log(f"data: {len(shards.train_index)} train / {len(shards.test_index)} test digits in {out / 'data'}")

    t0 = time.perf_counter()
    weights, manifest = ensure_teachers(base, recipe, root=cache_dir, log=log)
    timings["teachers"] = time.perf_counter() - t0

    cfg = load_config(config, path_overrides(out, shards.train_urls, shards.test_urls, weights) + user)
    resolved = out / "demo.toml"
    resolved.write_text(dumps_toml(cfg), encoding="utf-8")
    conf = ["--config", str(resolved)]
    timings["extract"] = _stage("extract", extract_main, "comad-extract", conf, log)
    timings["train"] = _stage("train", distill_main, "comad-distill", ["train", *conf], log)
    results, timings["eval"] = _evaluate(cfg, conf, out, log)

    metrics = read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")
    write_report_png(out / "report.png", metrics, results,
                     title=f"CoMAD demo: {len(cfg.teachers)} teachers -> student on digits "
                           f"({cfg.train.steps} steps, gate {cfg.gate.variant})")
    timings["total"] = time.perf_counter() - t_start
    return _write_results(out, quick, resolved, results, manifest, timings, log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comad-demo", description="Offline end-to-end CoMAD demo on scikit-learn's "
                                "digits: teacher fixtures, extract, distill, evaluate, report (a few CPU minutes).")
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="a short distillation and probe (for tests)")
    p.add_argument("--config", default=str(DEMO_TOML), help="pipeline TOML (default: the shipped demo.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set gate.variant=mean")
    p.add_argument("--cache-dir", default=None,
                   help="teacher fixture cache (default $COMAD_DEMO_CACHE or ~/.cache/comad-demo)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(Path(args.out), quick=args.quick, config=Path(args.config), overrides=args.overrides,
                 cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except ConfigError as e:
        print(f"comad-demo: error: {e}", file=sys.stderr)
        return 2
    except DemoError as e:
        print(f"comad-demo: {e}", file=sys.stderr)
        return 1 if isinstance(e, StageFailed) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
