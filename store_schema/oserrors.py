"""Store-side failures of the operating system or the storage layer, as one line naming the path and what to do.

Extraction and the `comad-store` / `comad-distill` commands turn these into StoreError messages instead of
tracebacks. What the store looks like after each (it stays valid: complete units are untouched, an
interrupted unit is redone) is why the advice is "rerun the same command".
"""
from __future__ import annotations

import errno
import json

RERUN = "complete units are kept; rerun the same command to resume"


def explain(root: str, e: BaseException, doing: str = "") -> str | None:
    """One line for a store-side error `e` met while `doing` (e.g. "writing unit u..."), or None if unknown."""
    at = f" while {doing}" if doing else ""
    path = getattr(e, "filename", None) or root
    code = getattr(e, "errno", None)
    if isinstance(e, json.JSONDecodeError):
        return (f"{root}: a metadata file (zarr.json) is torn or not JSON{at} ({e}); run `comad-store validate "
                f"{root}` to see which; a torn unit is redone by comad-extract")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on the device{at}; free space (or raise the quota), then: {RERUN}"
    if code == errno.EROFS:
        return f"{path}: the file system is read-only{at}; mount it writable or choose another store.root"
    if isinstance(e, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return (f"{path}: permission denied{at}; make the store writable by this user (or choose another "
                f"store.root), then: {RERUN}")
    if isinstance(e, NotADirectoryError) or code == errno.ENOTDIR:
        return (f"store.root {root!r}: a parent of {path} is a file, not a directory{at}; store.root must be a "
                "directory (existing or not) under directories: choose another one")
    if isinstance(e, FileExistsError) or code == errno.EEXIST:
        return (f"store.root {root!r}: {path} is a file, not a directory{at}; store.root must be a directory "
                "(existing or not): choose another one")
    if isinstance(e, IsADirectoryError):
        return f"{path}: a directory where the store expects a file{at}; choose another store.root"
    if isinstance(e, ValueError) and "protocol not known" in str(e).lower():
        proto = root.split("://", 1)[0] if "://" in root else "?"
        return (f"store.root {root!r}: unknown protocol {proto!r}; use a local path or an fsspec URL "
                "(s3://, gs://, az://, ...) whose package (s3fs, gcsfs, adlfs) is installed")
    if isinstance(e, ImportError):
        return (f"store.root {root!r}: the package for this URL is not installed ({e}); install it "
                "(e.g. pip install s3fs for s3://)")
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e} (at {path}{at}); check the storage, then: {RERUN}"
    return None


STORE_OS_ERRORS = (OSError, ValueError, ImportError)  # the kinds explain() may know; others are bugs
