"""Where the pipeline reads and writes: local paths, fsspec URLs with their options, webdataset `pipe:` commands.

Every location has its fsspec options in the config — `store.storage_options` for the store,
`data.storage_options` for the input tars (and `@list` files), `eval.storage_options` for the eval tars —
and `--storage-option KEY=VALUE` on every command sets them for all three at once (one endpoint for
everything is the common case; `--set store.storage_options.KEY=VALUE` sets one). Options are handed
only to URLs with a protocol (s3://, gs://, ...): a local path next to an object store ignores them, so
one `endpoint_url` does not break the local inputs.

`pipe:CMD` (webdataset's convention: `pipe:aws s3 cp s3://b/x.tar -`, `pipe:curl -s URL`): the tar is
CMD's standard output, read as a stream. The extractor's own tar reader (store_schema/shards.py) still does
the reading, so sample positions and truncation detection stay; a command that exits non-zero is an I/O
error of that tar (its unit fails and the next run retries it), never a silently shorter tar.

`remote_problem()` turns what botocore / aiohttp / s3fs raise for an unreachable endpoint, a missing
bucket or missing / refused credentials into one line naming the URL and the setting to fix.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import tempfile
from typing import Any

import fsspec

from .config import ConfigError, _toml_value

PIPE = "pipe:"
_DRAIN_LIMIT = 1 << 20  # after a tar's end marker, read at most this much more of a pipe before giving up on it
_SECRET = re.compile(r"secret|password|token|credential|sas|account_key|^key$", re.IGNORECASE)
REDACTED = "<redacted>"


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def is_local(url: str) -> bool:
    return not is_pipe(url) and fsspec.core.split_protocol(url)[0] in (None, "file", "local")


def options_for(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options to use for `url`: none for a local path or a pipe, `options` otherwise."""
    return {} if is_local(url) or is_pipe(url) else dict(options or {})


def url_to_fs(url: str, options: dict[str, Any] | None = None):
    """(filesystem, path) of `url` with its options (fsspec.core.url_to_fs)."""
    return fsspec.core.url_to_fs(url, **options_for(url, options))


def open_input(url: str, options: dict[str, Any] | None = None):
    """A binary, sequential file object for `url`: a local file, an fsspec URL, or a `pipe:` command."""
    if is_pipe(url):
        return PipeReader(url[len(PIPE):])
    return fsspec.open(url, "rb", **options_for(url, options)).open()


class PipeReader(io.RawIOBase):
    """The standard output of a shell command as a read-only stream; its exit status is checked at the end.

    A non-zero status raises OSError from the read that reaches the end of the output (so a reader sees
    an I/O error, not a short stream) or from finish(). close() before the end kills the command: the
    reader stopped early on purpose (an error elsewhere, or the consumer is done)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        if not command.strip():
            raise ValueError("empty pipe: command")
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        # its own process group: stopping it early also stops what the shell started (`cat a | zcat`, ...)
        self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._stderr, start_new_session=True)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if self._eof or size == 0:
            return b""
        data = self._proc.stdout.read() if size is None or size < 0 else self._proc.stdout.read(size)
        if not data:
            self._eof = True
            self._check()
        return data

    def _check(self) -> None:
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            tail = self._stderr.read()[-300:].decode("utf-8", "replace").strip().replace("\n", " | ")
            raise OSError(f"pipe command {self.command!r} exited with status {code}" + (f": {tail}" if tail else ""))

    def finish(self) -> None:
        """The consumer read all it needs (a tar's end marker): drain what follows and check the exit status."""
        drained = 0
        while not self._eof and drained <= _DRAIN_LIMIT:
            drained += len(self.read(65536))
        if not self._eof:  # megabytes after the end marker: not padding; stop the command, keep what was read
            self._kill()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self._proc.stdout.close()
            self._stderr.close()
        super().close()


# ---------------------------------------------------------------------------------------------- options

def parse_option_items(items: list[str], flag: str = "--storage-option") -> dict[str, Any]:
    """`key=value` items -> options; a value is read as JSON when it parses (numbers, true, {...}), else as a
    string; dotted keys nest (client_kwargs.region_name=us-east-1). Raises ConfigError naming a bad item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, last = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag} {item!r}: {p!r} was given a value and cannot also have keys")
        node[last] = value
    return out


def storage_overrides(items: list[str]) -> list[str]:
    """`--storage-option KEY=VALUE` items as `--set` overrides of store/data/eval.storage_options (the same
    options for the store, the inputs and the eval data; a later `--set` still wins)."""
    def flat(prefix: str, d: dict[str, Any]):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(f"{prefix}{k}.", v)
            else:
                yield f"{prefix}{k}", v

    pairs = list(flat("", parse_option_items(items)))
    return [f"{sec}.storage_options.{k}={_toml_value(v)}" for sec in ("store", "data", "eval") for k, v in pairs]


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Options with secret-looking values replaced: saved configs (store attributes, run_dir/config.toml)
    are read by whoever reads the store, and credentials belong in the environment or a profile."""
    return {k: redact(v) if isinstance(v, dict) else (REDACTED if _SECRET.search(k) and v else v)
            for k, v in options.items()}


# ---------------------------------------------------------------------------------------------- errors

def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def remote_problem(url: str, e: BaseException, key: str, options: dict[str, Any] | None = None) -> str | None:
    """One line for an unreachable endpoint, a missing bucket or missing / refused credentials met at `url`
    (`key`: the config key holding its `options`, e.g. store.storage_options, or the flag that sets them,
    --storage-option); None for anything else."""
    if is_local(url) or is_pipe(url):
        return None
    names = {type(x).__name__ for x in _chain(e)}
    text = " ".join(str(x) for x in _chain(e))
    endpoint = _endpoint(key, e, options)
    proto = fsspec.core.split_protocol(url)[0]
    bucket = fsspec.core.split_protocol(url)[1].split("/")[0]
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                "ConnectionRefusedError"} or "Could not connect to the endpoint" in text:
        return (f"{url}: cannot reach the object store at {endpoint}; set the right endpoint with "
                f"{_opt(key, 'endpoint_url')} (e.g. --storage-option endpoint_url=http://HOST:PORT) and check the "
                "network")
    if "NoSuchBucket" in names or "bucket does not exist" in text.lower():
        return (f"{url}: the bucket {bucket!r} does not exist at {endpoint}; create it, or fix the bucket in the "
                f"URL (or the endpoint: {_opt(key, 'endpoint_url')})")
    if names & {"NoCredentialsError", "PartialCredentialsError"} or "Unable to locate credentials" in text:
        return (f"{url}: no credentials for {proto}://; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                f"AWS_PROFILE) in the environment, or {_opt(key, 'key')} / {_opt(key, 'secret')}, or "
                f"{_opt(key, 'anon', 'true')} for a public bucket")
    if (names & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "PermissionError"}
            or re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\b403\b", text)):
        return (f"{url}: the object store at {endpoint} refused the credentials ({_short(e)}); check "
                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE or {_opt(key, 'key')} / "
                f"{_opt(key, 'secret')}, and that they may read (and write) this bucket")
    return None


def _endpoint(key: str, e: BaseException, options: dict[str, Any] | None) -> str:
    m = re.search(r'endpoint URL: "(https?://[^/"]+)', " ".join(str(x) for x in _chain(e)))
    if m:
        return m.group(1)
    given = (options or {}).get("endpoint_url")
    return str(given) if given else f"the provider's default endpoint (no {_opt(key, 'endpoint_url')})"


def _opt(key: str, name: str, value: str = "...") -> str:
    """How the user sets option `name`: store.storage_options.endpoint_url, or --storage-option endpoint_url=..."""
    return f"{key} {name}={value}" if key.startswith("--") else (f"{key}.{name}" if value == "..." else
                                                                  f"{key}.{name} = {value}")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def check_reachable(url: str, options: dict[str, Any] | None, key: str) -> None:
    """Raise ValueError (one line, see remote_problem) when `url`'s object store cannot be used at all.

    One metadata request before any work: a wrong endpoint, a missing bucket or missing credentials
    would otherwise fail every input tar (or the store) one by one, after the teachers were loaded."""
    if is_local(url) or is_pipe(url):
        return
    try:
        fs, path = url_to_fs(url, options)
        fs.info(path)
    except FileNotFoundError as e:  # the object itself may not exist yet (a new store): fine unless the bucket
        msg = remote_problem(url, e, key, options)
        if msg is not None:
            raise ValueError(msg) from e
    except Exception as e:  # noqa: BLE001 — the known problems become one line, the rest are left to the caller
        msg = remote_problem(url, e, key, options)
        if msg is not None:
            raise ValueError(msg) from e
