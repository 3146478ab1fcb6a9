"""`comad-distill {train,sweep,eval,export,report}` (also `python -m distill ...`).

Every subcommand takes --config and repeatable --set section.key=value. Problems with the config, the
store or a resume print their message and exit 2 (no traceback; COMAD_TRACEBACK=1 shows it); a run
stopped by non-finite losses or a sweep with a failed variant exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

import distill.train as training  # module attributes, looked up at call time (tests patch distill.train.train)
from distill.checkpoint import ResumeError
from distill.collapse import TargetCollapseError
from distill.evaluate import main_eval
from distill.export import main_export
from distill.report import main_report, report_run
from distill.sweep import format_summary, parse_variant, read_variants_file, run_sweep
from store_schema.config import ConfigError, load_config
from store_schema.oserrors import explain
from store_schema.shards import ShardReadError
from store_schema.storage import storage_overrides
from store_schema.store import StoreError
from store_schema.threads import apply_threads


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    optional = "" if config_required else ("; optional with --checkpoint or --export: the run's config.toml is used "
                                           "(required with --teacher, --random-init)")
    p.add_argument("--config", required=config_required, default=None,
                   help="pipeline TOML (the shipped pipeline.toml spells out every key)" + optional)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set gate.variant=mean")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for store.root and the data/eval urls, repeatable (e.g. "
                        "endpoint_url=http://127.0.0.1:9000); sets store/data/eval.storage_options")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads per process (train.threads; 0 = the cores left after the loader "
                        "workers, printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comad-distill", description="CoMAD stage 2: train the student from "
                                     "the teacher-feature store, sweep ablations, evaluate, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the student (torchrun / accelerate launch for several processes)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")

    p = sub.add_parser("sweep", help="train (and evaluate) several override sets from the same store")
    _common(p)
    p.add_argument("--variant", action="append", default=[], metavar="K=V[;K=V...]",
                   help="one variant: overrides joined by ';' (repeatable)")
    p.add_argument("--variants-file", default=None, help="TOML with [[variant]] tables: name (optional), set = [...]")
    p.add_argument("--resume", action="store_true", help="resume each variant from its latest checkpoint")
    p.add_argument("--baselines", action="store_true", help="add rows for each teacher and a random-init student "
                   "(evaluated once, cached in train.run_dir/baselines/)")

    p = sub.add_parser("eval", help="kNN / linear-probe evaluation of a checkpoint, an export or a teacher")
    _common(p, config_required=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", default=None, help="a checkpoint dir, or a run dir (its latest checkpoint)")
    which.add_argument("--export", default=None, help="an exported student dir")
    which.add_argument("--teacher", default=None, help="a configured teacher's name (baseline)")
    which.add_argument("--random-init", type=int, default=None, metavar="SEED", help="a random student (baseline)")
    p.add_argument("--out", default=None, help="result JSON (default: next to the run)")

    p = sub.add_parser("export", help="write the student alone as a plain timm ViT (safetensors + config.json)")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("report", help="a PNG of a run or a sweep: losses, gate weight per teacher, accuracies")
    p.add_argument("run_dir", help="a train.run_dir (metrics.jsonl, eval_*.json) or a sweep's (sweep.csv)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/report.png)")
    return parser


def _threads(args: argparse.Namespace, cfg=None) -> None:
    """Intra-op threads for this command (store_schema/threads.py), said once (rank 0)."""
    if cfg is None and args.config:
        cfg = load_config(args.config, args.set)
    requested = cfg.train.threads if cfg is not None else 0
    workers = 0 if cfg is None else cfg.data.num_workers if args.command == "eval" else cfg.train.num_workers
    quiet = os.environ.get("RANK", "0") != "0"
    apply_threads(requested, workers, "train.threads",
                  say=None if quiet else lambda m: print(f"comad-distill {args.command}: {m}", file=sys.stderr))


def _report(run_dir: Path) -> None:
    """The report PNG at the end of train / sweep; a plotting problem must not turn a finished run into an error."""
    try:
        print(f"report: {report_run(run_dir)}")
    except Exception as e:  # e.g. a broken matplotlib install: the weights and tables are written already
        print(f"comad-distill: report not written ({type(e).__name__}: {e}); retry with: comad-distill report "
              f"{run_dir}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.command == "report":  # reads a run's files only: no config, storage options or threads
        main_report(args)
        return 0
    extra = storage_overrides(args.storage_option)  # before --set: an explicit --set still wins
    args.set = extra + ([] if args.threads is None else [f"train.threads={args.threads}"]) + list(args.set)
    if args.command == "train":
        cfg = load_config(args.config, args.set)
        _threads(args, cfg)
        summary = training.train(cfg, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # every process returns here: one line and one report
            print(f"trained {summary['run_dir']} to step {summary['step']}; checkpoint {summary['checkpoint']}")
            _report(Path(summary["run_dir"]))
        return 0
    if args.command == "sweep":
        variants = [(None, parse_variant(v)) for v in args.variant]
        if args.variants_file:
            variants += read_variants_file(args.variants_file)
        _threads(args)
        rows = run_sweep(args.config, variants, args.set, resume=args.resume, baselines=args.baselines)
        sweep_dir = Path(load_config(args.config, args.set).train.run_dir)
        print(format_summary(rows, sweep_dir))
        _report(sweep_dir)
        failed = [r["variant"] for r in rows if r.get("status") != "ok"]
        print(f"sweep: {len(rows) - len(failed)} of {len(rows)} variants trained"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    if args.command == "eval":
        _threads(args)
        main_eval(args)
        return 0
    if args.command == "export":
        main_export(args)
        return 0
    raise AssertionError(args.command)  # argparse only accepts the subcommands above


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    user_errors = (ConfigError, StoreError, ResumeError, ShardReadError, ValueError, FileNotFoundError)
    try:
        return run(args)
    except (training.NonFiniteLossError, TargetCollapseError, *user_errors) as e:
        if os.environ.get("COMAD_TRACEBACK"):
            raise
        print(f"comad-distill {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, (training.NonFiniteLossError, TargetCollapseError)) else 2
    except OSError as e:  # a run dir under a file, no permission, a full disk: the path and what to do
        if os.environ.get("COMAD_TRACEBACK"):
            raise
        where = getattr(e, "filename", None) or "the run directory"
        key = "train.run_dir" if args.command in ("train", "sweep") else "--out"
        print(f"comad-distill {args.command}: error: {explain(str(where), e, key=key)}", file=sys.stderr)
        return 2
    except Exception as e:
        # safetensors reports a full disk or a permission problem as its own error type, not as OSError
        if type(e).__module__.split(".")[0] != "safetensors" or os.environ.get("COMAD_TRACEBACK"):
            raise
        print(f"comad-distill {args.command}: error: cannot write a weights file ({e}); free space or fix the "
              "permissions of train.run_dir (or --out), then rerun (training: with --resume)", file=sys.stderr)
        return 2
    finally:
        _end_distributed()


def _end_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
