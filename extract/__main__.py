"""`python -m extract --config pipeline.toml [--set k=v ...]` (same as `comad-extract`)."""
import sys

from extract.cli import main

sys.exit(main())
