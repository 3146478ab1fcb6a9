"""Child processes for the extraction tests (run as a script, never collected by pytest).

    python _extract_subprocess.py slow-run TMP DELAY TAR...   extraction with each teacher forward delayed
    python _extract_subprocess.py hold-lock STORE             take the store's writer lock, then sleep
    python _extract_subprocess.py gated-cli GATE ARGS...       `comad-extract ARGS...` whose teacher forwards
                                                              wait until the file GATE exists (at most 120 s)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def slow_run(tmp: str, delay: str, *tars: str) -> None:
    import extract.prepare as prepare
    from _extract_fixtures import extract_config
    from extract.pipeline import run_extraction

    real = prepare.forward_visible

    def slow(*args):
        time.sleep(float(delay))  # same results, only later: gives the test time to kill us mid-run
        return real(*args)

    prepare.forward_visible = slow
    run_extraction(extract_config(Path(tmp), [Path(t) for t in tars]))


def hold_lock(root: str) -> None:
    from store_schema.lock import acquire_writer_lock
    from store_schema.store import FeatureStore

    acquire_writer_lock(FeatureStore.open(root, mode="r+"), "holder-run")
    print("locked", flush=True)
    time.sleep(600)


def gated_cli(gate: str, *args: str) -> None:
    import extract.prepare as prepare
    from extract.cli import main

    real, deadline = prepare.forward_visible, time.time() + 120

    def gated(*a):
        while not Path(gate).exists() and time.time() < deadline:  # the deadline: a failed test never hangs CI
            time.sleep(0.05)
        return real(*a)

    prepare.forward_visible = gated
    sys.exit(main(list(args)))


if __name__ == "__main__":
    {"slow-run": slow_run, "hold-lock": hold_lock, "gated-cli": gated_cli}[sys.argv[1]](*sys.argv[2:])
