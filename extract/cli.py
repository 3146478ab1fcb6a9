"""`comad-extract --config pipeline.toml [--set section.key=value ...] [--redo-changed]`: stage 1, the store.

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

from extract.pipeline import ExtractionError, run_extraction
from store_schema.config import ConfigError, load_config
from store_schema.fingerprint import StoreMismatchError
from store_schema.store import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comad-extract", description="Run the teachers once over a WebDataset and "
                                "write the feature store (resumable; run under torchrun for several processes).")
    p.add_argument("--config", required=True, help="pipeline TOML file (the shipped pipeline.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.num_workers=8 (repeatable)")
    p.add_argument("--redo-changed", action="store_true",
                   help="re-extract inputs whose size or mtime/ETag changed since their unit was written "
                        "(without it such a run is refused, naming them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
        run_extraction(cfg, redo_changed=args.redo_changed)
    # Every process ends with the same error (rank 0's message names what failed where): print it once.
    except (ConfigError, StoreError, StoreMismatchError) as e:
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
