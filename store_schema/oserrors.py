"""Store-side failures of the operating system or the storage layer, as one line naming the path and what to do.

Extraction and the `comad-store` / `comad-distill` commands turn these into StoreError messages instead of
tracebacks. What the store looks like after each (it stays valid: complete units are untouched, an
interrupted unit is redone) is why the advice is "rerun the same command".
"""
from __future__ import annotations

import errno
import json

from .config import ConfigError

RERUN = "complete units are kept; rerun the same command to resume"


def explain(root: str, e: BaseException, doing: str = "", key: str = "store.root") -> str | None:
    """One line for a store-side error `e` met while `doing` (e.g. "writing unit u..."), or None if unknown.

    `key`: the config key that names `root` (store.root; train.run_dir for a run's directory)."""
    at = f" while {doing}" if doing else ""
    rerun = RERUN if key == "store.root" else "rerun (training: with --resume, from the last complete checkpoint)"
    path = getattr(e, "filename", None) or root
    code = getattr(e, "errno", None)
    from .storage import remote_problem  # here: storage imports fsspec; this module is imported everywhere
    if isinstance(e, ConfigError) or type(e).__name__ in ("StoreError", "StoreMismatchError"):
        return None  # already one line that names what to do (e.g. check_reachable's): raised as it is
    remote = remote_problem(root, e, "store.storage_options" if key == "store.root" else f"{key} storage options")
    if remote is not None:  # an unreachable endpoint, a missing bucket, missing or refused credentials
        return remote + (f" (while {doing})" if doing else "")
    if isinstance(e, json.JSONDecodeError):
        return (f"{root}: a metadata file (zarr.json) is torn or not JSON{at} ({e}); run `comad-store validate "
                f"{root}` to see which; a torn unit is redone by comad-extract")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on the device{at}; free space (or raise the quota), then: {rerun}"
    if code == errno.EROFS:
        return f"{path}: the file system is read-only{at}; mount it writable or choose another {key}"
    if isinstance(e, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return (f"{path}: permission denied{at}; make it writable by this user (or choose another "
                f"{key}), then: {rerun}")
    if isinstance(e, NotADirectoryError) or code == errno.ENOTDIR:
        return (f"{key} {root!r}: a parent of {path} is a file, not a directory{at}; {key} must be a "
                "directory (existing or not) under directories: choose another one")
    if isinstance(e, FileExistsError) or code == errno.EEXIST:
        return (f"{key} {root!r}: {path} is a file, not a directory{at}; {key} must be a directory "
                "(existing or not): choose another one")
    if isinstance(e, IsADirectoryError):
        return f"{path}: a directory where the store expects a file{at}; choose another {key}"
    if isinstance(e, ValueError) and "protocol not known" in str(e).lower():
        proto = root.split("://", 1)[0] if "://" in root else "?"
        return (f"{key} {root!r}: unknown protocol {proto!r}; use a local path or an fsspec URL "
                "(s3://, gs://, az://, ...) whose package (s3fs, gcsfs, adlfs) is installed")
    if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "google", "azure", "adlfs", "gcsfs"):
        return (f"{root}: the object store refused the request{at} ({type(e).__name__}: {e}); check the "
                "credentials (e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE), the bucket and the endpoint (storage options)")
    if isinstance(e, ImportError):
        return (f"{key} {root!r}: the package for this URL is not installed ({e}); install it "
                "(e.g. pip install s3fs for s3://)")
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e} (at {path}{at}); check the storage, then: {rerun}"
    return None


def raise_store_error(root: str, e: BaseException, doing: str = ""):
    """Raise `e` as a one-line StoreError when explain() knows it, else as it is."""
    from .store import StoreError  # here, not at the top: store.py imports this module
    msg = explain(root, e, doing)
    if msg is None:
        raise e
    raise StoreError(msg) from e


STORE_OS_ERRORS = (Exception,)  # what callers hand to explain(); it names the ones it knows, the rest re-raise
