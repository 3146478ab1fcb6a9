"""Child processes for the extraction tests (run as a script, never collected by pytest).

    python _extract_subprocess.py slow-run TMP DELAY TAR...   extraction with each teacher forward delayed
    python _extract_subprocess.py hold-lock STORE             take the store's writer lock, then sleep
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def slow_run(tmp: str, delay: str, *tars: str) -> None:
    import extract.pipeline as pipeline
    from _extract_fixtures import extract_config

    real = pipeline.forward_visible

    def slow(*args):
        time.sleep(float(delay))  # same results, only later: gives the test time to kill us mid-run
        return real(*args)

    pipeline.forward_visible = slow
    pipeline.run_extraction(extract_config(Path(tmp), [Path(t) for t in tars]))


def hold_lock(root: str) -> None:
    from store_schema.store import FeatureStore, acquire_writer_lock

    acquire_writer_lock(FeatureStore.open(root, mode="r+"), "holder-run")
    print("locked", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    {"slow-run": slow_run, "hold-lock": hold_lock}[sys.argv[1]](*sys.argv[2:])
