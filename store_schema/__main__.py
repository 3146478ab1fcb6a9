"""`python -m store_schema inspect|validate ROOT` — the same as the comad-store command."""
import sys

from .cli import main

sys.exit(main())
