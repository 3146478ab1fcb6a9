"""comad-store: look at a feature store (`inspect`) or check it against the layout (`validate`).

Exit codes: 0 fine, 1 validate found problems, 2 the store cannot be opened (or is not a CoMAD store).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import ConfigError
from .fingerprint import StoreMismatchError
from .joint_stats import GROUP, fit_joint_stats
from .store import FeatureStore, StoreError
from .inspection import inspect_store
from .oserrors import explain
from .storage import check_reachable, parse_option_items
from .validate import validate_store


def parse_storage_options(items: list[str]) -> dict[str, Any] | None:
    """--storage-option items parsed by the one parser every command uses (storage.parse_option_items),
    None when there are none; a bad item exits with its message."""
    try:
        return parse_option_items(items) or None
    except ConfigError as e:
        raise SystemExit(f"comad-store: {e}") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_inspect(info: dict[str, Any]) -> str:
    u = info["units"]
    lines = [
        f"store       {info['root']}  (schema {info['schema_version']}, created {info['created']})",
        f"samples     {info['samples']} usable ({info['rows']} rows, {info['rows'] - info['samples']} excluded) "
        f"in {u['complete']} complete units; {u['incomplete']} incomplete",
        f"views       {info['views']} per sample; image {info['image_size']}, patch {info['patch_size']} -> "
        f"{info['num_patches']} tokens, student sees {info['student_tokens']}",
        f"dtype       {info['dtype']}, compression {info['compression']} level {info['compression_level']}, "
        f"chunk {info['chunk_samples']} / shard {info['shard_samples']} samples",
        f"size        {_size(info['stored_bytes'])} stored of {_size(info['decoded_bytes'])} decoded "
        f"(stored fraction {info['stored_fraction']:.3f}); {_size(info['bytes_per_view'])} per (sample, view)",
        "",
        f"  {'part':<12}{'dim':>6}{'tokens':>8}{'per view':>12}  stats",
        f"  {'student':<12}{'':>6}{info['student_tokens']:>8}{_size(info['bytes_per_view_by_part']['student']):>12}",
    ]
    for t, tm in info["teachers"].items():
        per_view = _size(info["bytes_per_view_by_part"][t])
        lines.append(f"  {t:<12}{tm['dim']:>6}{tm['tokens']:>8}{per_view:>12}  {info['stats_finalised'][t]}")
    for x in u["incomplete_units"]:
        if x["status"] == "failed":
            lines.append(f"failed      {x['unit']}  {x['source']}: {x['reason']}")
        else:
            lines.append(f"incomplete  {x['unit']}  {x['source']} (status {x['status']})")
    lines.append(f"skipped     {len(info['skipped'])} inputs")
    for s in info["skipped"]:
        lines.append(f"  {s['source']} #{s.get('index')} {s.get('key')}: {s.get('reason')}")
    notes = info.get("sample_notes", [])
    lines.append(f"notes       {len(notes)} stored samples with a remark (e.g. an invalid cls, stored as -1)")
    for s in notes[:20]:
        lines.append(f"  {s['source']} #{s.get('index')} {s.get('key')}: {s.get('note')}")
    if len(notes) > 20:
        lines.append(f"  ... {len(notes) - 20} more (--json lists all)")
    lines += _format_last_run(info["last_run"], info["runs"])
    if info["lock"]:
        lk = info["lock"]
        lines.append(f"lock        held by run {lk.get('run_id')} on {lk.get('host')} (pid {lk.get('pid')}, "
                     f"started {lk.get('started')})")
    return "\n".join(lines)


def _format_last_run(run: dict[str, Any] | None, n_runs: int) -> list[str]:
    """The newest extract_runs summary in a few lines (a summary lacking a field shows '?' there)."""
    if run is None:
        return ["last run    none recorded (no extraction has finished on this store)"]
    g = lambda k: run.get(k, "?")  # noqa: E731
    failed = run.get("tars_failed", [])
    lines = [
        f"last run    {g('run_id')} finished {g('finished')} ({n_runs} run(s) recorded), {g('world_size')} process(es)",
        f"  tars      {g('tars')}: {g('tars_extracted')} extracted, {g('tars_already_complete')} already complete, "
        f"{len(failed) if isinstance(failed, list) else failed} failed",
        f"  images    {g('images')} ({g('views')} views) in {g('seconds')} s, {g('images_per_s')} images/s; "
        f"{g('skipped')} skipped, {g('duplicate_keys_excluded')} duplicate keys excluded",
    ]
    by_reason = run.get("skipped_by_reason") or {}
    if isinstance(by_reason, dict) and by_reason:
        lines.append("  reasons   " + ", ".join(f"{k}: {v}" for k, v in by_reason.items()))
    lines += [f"  error     {e}" for e in run.get("errors", [])]
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `comad-store inspect ROOT | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="comad-store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, what in (("inspect", "samples, views, teachers, sizes, skipped inputs, the last extraction run"),
                       ("validate", "check every array of every complete unit; exit 1 on problems")):
        p = sub.add_parser(name, help=what)
        p.add_argument("root", help="store root: a local path or an fsspec URL (s3://bucket/prefix)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)")
    p = sub.add_parser("joint-stats", help="compute the cross-teacher statistics a shared (CCA) target basis is "
                                           "fitted from, from the stored features (no teacher runs)")
    p.add_argument("root", help="store root: a local path or an fsspec URL (s3://bucket/prefix)")
    p.add_argument("--samples", type=int, default=4096, help="samples to read, view 0 (0 = all; default 4096, "
                                                              "the shipped store.joint_stats_samples)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)")
    _add_compact_parser(sub)
    args = ap.parse_args(argv)
    if args.command == "compact":
        return _compact(args)
    options = parse_storage_options(args.storage_option)
    try:
        try:  # a wrong endpoint, a missing bucket, no credentials: said as such, not as "no store here"
            check_reachable(args.root, options, "--storage-option")
        except ValueError as e:
            raise StoreError(str(e)) from e
        if args.command == "joint-stats":
            return _joint_stats(args, options)
        if args.command == "inspect":
            info = inspect_store(args.root, options)
            print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
            return 0
        checked: dict[str, int] = {}
        problems = validate_store(args.root, options, checked)
    except (StoreError, StoreMismatchError, OSError) as e:
        _fail(args, (explain(args.root, e) if isinstance(e, OSError) else None) or str(e))
        return 2
    except Exception as e:  # a store so damaged that even its metadata fails: a message, not a traceback
        _fail(args, f"cannot read {args.root}: {type(e).__name__}: {e}")
        return 2
    if args.json:
        print(json.dumps({"root": args.root, "ok": not problems, "checked": checked,
                          "problems": [{"where": p.where, "what": p.what, "count": p.count} for p in problems]},
                         indent=2))
    elif problems:
        print(f"{args.root}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
    else:
        print(f"{args.root}: ok ({checked['units']} complete units, {checked['rows']} rows, "
              f"{checked['arrays']} arrays, {_size(checked['bytes'])} read and checked)")
    return 1 if problems else 0


def _joint_stats(args: argparse.Namespace, options: dict[str, Any] | None) -> int:
    if args.samples < 0:
        _fail(args, f"--samples {args.samples} must be >= 0 (0 = every sample)")
        return 2
    store = FeatureStore.open(args.root, mode="r+", storage_options=options)
    record = fit_joint_stats(store, args.samples)
    if args.json:
        print(json.dumps({"root": args.root, "ok": True, **record}, indent=2))
    else:
        print(f"{args.root}: cross-teacher statistics of {', '.join(record['teachers'])} from {record['samples']} "
              f"samples ({record['count']} co-visible tokens) written to {GROUP}/")
    return 0


def _add_compact_parser(sub: Any) -> None:
    p = sub.add_parser("compact", help="write a compact store: the full store's features mapped by the frozen "
                                       "adapter basis training fits (4x fewer feature bytes at ViT-B)")
    p.add_argument("--config", required=True, help="the configuration training uses; its store.root is the full store")
    p.add_argument("--out", required=True, help="root of the compact store to write (a new store)")
    p.add_argument("--dtype", choices=("float16", "float32"), help="default float16")
    p.add_argument("--compression", choices=("none", "zstd", "blosc"), help="default blosc (zstd after a byte shuffle)")
    p.add_argument("--compression-level", type=int, help="default 5")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _compact(args: argparse.Namespace) -> int:
    """comad-store compact: distill/compact.py writes the store; any refusal is one line, exit 2."""
    args.root = args.out  # what _fail reports
    try:
        # Imported here, not at the top: distill imports store_schema (not the other way round at import
        # time), and it loads torch and the model, which no other comad-store command needs.
        from distill import compact
        summary = compact.run(args)
    except (ConfigError, StoreError, StoreMismatchError) as e:
        _fail(args, f"compact: {e}")
        return 2
    except OSError as e:
        _fail(args, f"compact: {explain(args.out, e) or e}")
        return 2
    if args.json:
        print(json.dumps({"root": args.out, "ok": True, **summary}, indent=2))
    else:
        print(f"{args.out}: compact store of {summary['source_root']} written ({summary['adapter_init']} basis, "
              f"{summary['target_dim']}-d {summary['dtype']}, {summary['compression']} level "
              f"{summary['compression_level']})")
    return 0


def _fail(args: argparse.Namespace, message: str) -> None:
    if args.json:
        print(json.dumps({"root": args.root, "ok": False, "error": message}, indent=2))
    else:
        print(f"comad-store: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
