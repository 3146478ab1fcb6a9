"""`comad-demo`: the offline end-to-end demo on scikit-learn's digits (see distill/demo/run_demo.py)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `comad-demo`; imported lazily so `distill.demo.<module>` imports stay light."""
    from distill.demo.run_demo import main as run_main

    return run_main(argv)
