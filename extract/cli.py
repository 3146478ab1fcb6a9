"""`comad-extract --config pipeline.toml [--set section.key=value ...] [--redo-changed] [--dry-run]`: stage 1.

`--storage-option KEY=VALUE` sets an fsspec option of the store, the inputs and the eval data at once
(e.g. endpoint_url=http://127.0.0.1:9000 for MinIO); `--threads N` the intra-op CPU threads (data.threads;
default: the cores left after data.num_workers, printed); `--dry-run` loads the teachers, counts inputs and
estimates the store's size and the run's time without writing anything (extract/dry_run.py).

Exit status: 0 done; 1 the run did not complete (unreadable tars, too many skipped inputs, a failed
process, the store writer failing, e.g. on a full disk: the message says which; complete units are kept,
rerun to resume); 2 a configuration, input list, teacher checkpoint or store problem, or an input that
changed since its unit was written (without --redo-changed) (message only, no traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from extract.dry_run import dry_run, format_dry_run
from extract.pipeline import ExtractionError, run_extraction
from store_schema.config import ConfigError, load_config
from store_schema.fingerprint import StoreMismatchError
from store_schema.shards import ShardReadError
from store_schema.storage import storage_overrides
from store_schema.store import StoreError
from store_schema.threads import apply_threads

log = logging.getLogger("comad.extract")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comad-extract", description="Run the teachers once over a WebDataset and "
                                "write the feature store (resumable; run under torchrun for several processes).")
    p.add_argument("--config", required=True, help="pipeline TOML file (the shipped pipeline.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.num_workers=8 (repeatable)")
    p.add_argument("--redo-changed", action="store_true",
                   help="re-extract inputs whose size or mtime/ETag changed since their unit was written "
                        "(without it such a run is refused, naming them)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for store.root, data.urls and eval urls, repeatable (e.g. "
                        "endpoint_url=http://127.0.0.1:9000, client_kwargs.region_name=us-east-1, anon=true)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads per process (data.threads; 0 = the cores left after the workers)")
    p.add_argument("--dry-run", action="store_true",
                   help="load every teacher, count the inputs, estimate store size and time from a few timed "
                        "batches; write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        extra = storage_overrides(args.storage_option)
        extra += [] if args.threads is None else [f"data.threads={args.threads}"]
        cfg = load_config(args.config, extra + args.overrides)
        apply_threads(cfg.data.threads, cfg.data.num_workers, "data.threads", say=log.info)
        if args.dry_run:
            report = format_dry_run(cfg, dry_run(cfg))  # under torchrun: every process checks, one prints
            if rank == 0:
                print(report)
            return 0
        run_extraction(cfg, redo_changed=args.redo_changed)
    # Every process ends with the same error (rank 0's message names what failed where): print it once.
    except (ConfigError, StoreError, StoreMismatchError, ShardReadError) as e:
        _say(rank, f"comad-extract: error: {e}")
        return 2
    except ExtractionError as e:
        _say(rank, f"comad-extract: {e}")
        return 1
    except KeyboardInterrupt:
        _say(rank, "comad-extract: interrupted; rerun the same command to resume")
        return 130
    return 0


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
