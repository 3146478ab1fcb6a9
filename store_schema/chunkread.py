"""Whole inner chunks of the store's sharded arrays, read without zarr-python's per-read pipeline.

Issue 14 measured where a training read's CPU goes (BENCHMARKS.md, "Reader"): zarr-python 3.1 spends
most of it in its asyncio / thread hand-offs and buffer copies per read (eleven reads per block), not
in CRC32C or decompression. This module reads the same bytes the way the contract describes them
(store_schema/README.md: sharding_indexed, inner chunks `bytes → [zstd | blosc] → crc32c`, the index
little-endian uint64 (offset, length) pairs + CRC32C at the end of the shard file):

- each shard's index is read once (a suffix read), its CRC32C verified, and cached;
- an inner chunk is one byte-range read, its CRC32C verified (google-crc32c: hardware CRC), then
  decompressed by numcodecs (the library zarr itself uses), and viewed — not copied — as the array;
- local reads and blosc decoding land in reused buffers (`_Buffers`): a fresh multi-MB buffer per chunk
  costs the kernel's zeroing of every page, as much again as the copy (BENCHMARKS.md, "Session 9");
- a chunk the index marks empty, a shard file that is missing or shorter than its index, or a wrong
  checksum is a StoreError: never fill values passed off as data.

Local stores are read with os.pread; any other zarr store (fsspec: s3://…) through the store's own
byte-range `get`, all chunks of a block concurrently. An array whose codecs are not exactly the ones
above (written by something else) raises Unsupported, and the caller reads it with zarr instead.
The store stays a plain zarr store: nothing here writes.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
from numcodecs import blosc as _blosc
from numcodecs import zstd as _zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

if TYPE_CHECKING:
    from .store import FeatureStore

_EMPTY = np.uint64(2**64 - 1)  # an index entry (offset, length) of all ones: the chunk was never written


class Unsupported(Exception):
    """The array is not laid out as the contract says (another writer): read it with zarr."""


class _Buffers:
    """Byte buffers handed out again once nothing else refers to them.

    A chunk's array is a view of its buffer, and numpy views keep their base array alive, so a buffer whose
    only references are this pool's is free: no reader, batch or tensor can still see it. Sizes are rounded
    up to eighths of a power of two, so the compressed chunks of an array (a few % apart) share buffers.
    Up to `keep` buffers are kept, a free one of another size giving way to a new one; the lock makes
    taking one atomic across the read threads. What a free buffer's reference count reads is measured
    once, with the same loop (Python 3.14 borrows loop variables' references, so it reads one less than
    on 3.10-3.13); where a held buffer would not read more, or without the GIL, there is no pool.
    Memory: the buffers a reader needed at once, kept instead of returned to the system.
    """

    def __init__(self, keep: int = 64):
        self._free = _free_refcount([np.empty(1, dtype=np.uint8)])
        probe = [np.empty(1, dtype=np.uint8)]
        held = probe[0][:1]  # noqa: F841 -- a view alive during the measurement, as a batch would be
        usable = getattr(sys, "_is_gil_enabled", lambda: True)() and _free_refcount(probe) > self._free
        self.keep = keep if usable else 0
        self._kept: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, n: int) -> np.ndarray:
        """An uninitialised uint8 buffer of n bytes (a view of a kept one when one is free)."""
        step = 1 << max(n.bit_length() - 3, 12)
        size = -(-n // step) * step
        with self._lock:
            spare = None
            for b in self._kept:  # a free buffer's references: the list's and the loop's (see _free_refcount)
                if sys.getrefcount(b) == self._free:
                    if b.size == size:
                        return b[:n]
                    spare = b
            b = np.empty(size, dtype=np.uint8)
            if spare is not None and len(self._kept) >= self.keep:
                self._kept = [k for k in self._kept if k is not spare]  # not list.remove: it compares with ==
            if len(self._kept) < self.keep:
                self._kept.append(b)
            return b[:n]


def _free_refcount(kept: list[np.ndarray]) -> int:
    """sys.getrefcount of the last buffer of `kept` read in the loop _Buffers.get uses (3 on CPython 3.10-3.13:
    the list's reference, the loop variable's, the argument's)."""
    count = -1
    for b in kept:
        count = sys.getrefcount(b)
    return count


@dataclass(frozen=True)
class _Plan:
    key: str  # the array's key prefix in the zarr store
    dtype: np.dtype
    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    per_shard: tuple[int, ...]  # inner chunks per shard along each axis
    codec: str  # "zstd" | "blosc" | "none"

    @property
    def n_index(self) -> int:
        return int(np.prod(self.per_shard))

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunk)) * self.dtype.itemsize


def _plan(arr, key: str) -> _Plan:
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        raise Unsupported(f"{key}: not a single sharding codec")
    sh = codecs[0]
    inner = list(sh.codecs)
    if sh.index_location != ShardingCodecIndexLocation.end or [type(c) for c in sh.index_codecs] != [BytesCodec, Crc32cCodec]:
        raise Unsupported(f"{key}: shard index not (bytes, crc32c) at the end")
    if sh.index_codecs[0].endian is not None and sh.index_codecs[0].endian.value != "little":
        raise Unsupported(f"{key}: big-endian shard index")
    if len(inner) < 2 or not isinstance(inner[0], BytesCodec) or not isinstance(inner[-1], Crc32cCodec):
        raise Unsupported(f"{key}: inner codecs not bytes ... crc32c")
    middle = inner[1:-1]
    if not middle:
        codec = "none"
    elif len(middle) == 1 and isinstance(middle[0], ZstdCodec):
        codec = "zstd"
    elif len(middle) == 1 and isinstance(middle[0], BloscCodec):
        codec = "blosc"
    else:
        raise Unsupported(f"{key}: compressor chain {middle}")
    dtype = np.dtype(arr.dtype)
    endian = inner[0].endian
    if dtype.itemsize > 1:
        if endian is None or endian.value != "little":
            raise Unsupported(f"{key}: not little-endian")
        dtype = dtype.newbyteorder("<")
    if arr.metadata.chunk_key_encoding.separator != "/" or getattr(arr, "order", "C") != "C":
        raise Unsupported(f"{key}: chunk keys or memory order")
    shard, chunk = tuple(arr.shards), tuple(sh.chunk_shape)
    if any(s % c for s, c in zip(shard, chunk)):
        raise Unsupported(f"{key}: shard {shard} not a multiple of chunk {chunk}")
    return _Plan(key, dtype, tuple(arr.shape), chunk, tuple(s // c for s, c in zip(shard, chunk)), codec)


class ChunkReader:
    """Reads whole inner chunks of one FeatureStore's arrays (see the module docstring)."""

    def __init__(self, store: "FeatureStore"):
        self.store = store
        self.zstore = store.group.store
        self.local_root = self.zstore.root if isinstance(self.zstore, LocalStore) else None
        self.prefix = f"{store.group.path}/" if store.group.path else ""
        self._plans: dict[str, _Plan] = {}
        self._index: dict[str, np.ndarray] = {}  # shard key -> (n_index, 2) uint64
        self.unsupported: set[str] = set()
        self._buffers = _Buffers()

    def plan(self, path: str) -> _Plan:
        if path not in self._plans:
            if path in self.unsupported:
                raise Unsupported(path)
            try:
                self._plans[path] = _plan(self.store.array(path), self.prefix + path)
            except Unsupported:
                self.unsupported.add(path)
                raise
        return self._plans[path]

    def read(self, path: str, start: int, stop: int, view: int | None) -> np.ndarray:
        """Rows [start, stop) of one array (at `view` for per-view arrays); one inner chunk."""
        return self.read_many([(path, start, stop, view)])[0]

    def read_many(self, requests: list[tuple[str, int, int, int | None]]) -> list[np.ndarray]:
        """Each request (path, start, stop, view) must lie in one inner chunk; returns the decoded rows."""
        plans, where = [], []
        for path, start, stop, view in requests:
            p = self.plan(path)
            c = p.chunk[0]
            first = start - start % c
            if not first <= start < stop <= min(first + c, p.shape[0]):
                raise ValueError(f"{path}: rows [{start}, {stop}) are not inside one chunk of {c} rows")
            if len(p.shape) > 1 and p.chunk[1] != 1:
                raise Unsupported(f"{path}: views not chunked one by one")
            shard_rows = p.per_shard[0] * c
            coords = [(first % shard_rows) // c] + ([view] if len(p.shape) > 1 else [])
            coords += [0] * (len(p.shape) - len(coords))
            lin = int(np.ravel_multi_index(coords, p.per_shard))
            key = p.key + "/c/" + "/".join([str(start // shard_rows)] + ["0"] * (len(p.shape) - 1))
            plans.append(p)
            where.append((key, lin, start, stop))
        raws = self._fetch([(key, lin, p) for p, (key, lin, *_r) in zip(plans, where)])
        out = []
        for p, (key, lin, start, stop), raw in zip(plans, where, raws):
            skip = start % p.chunk[0]
            out.append(self._decode(p, key, lin, raw)[skip: skip + stop - start])
        return out

    # ------------------------------------------------------------------ bytes
    def _damaged(self, key: str, what: str) -> "Exception":
        from .store import StoreError
        return StoreError(f"{self.store.root}: {key}: {what}: the store is damaged. Run `comad-store validate "
                          f"{self.store.root}`; re-extract that unit.")

    def _fetch(self, wanted: list[tuple[str, int, _Plan]]) -> list[np.ndarray]:
        if self.local_root is not None:
            return [self._local(key, lin, p) for key, lin, p in wanted]
        return sync(self._remote(wanted))

    def _local(self, key: str, lin: int, p: _Plan) -> np.ndarray:
        path = os.path.join(self.local_root, key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._damaged(key, "shard file missing") from None
        try:
            index = self._index.get(key)
            if index is None:
                size = os.fstat(fd).st_size
                n = p.n_index * 16 + 4
                if size < n:
                    raise self._damaged(key, f"shard file of {size} bytes is shorter than its index")
                index = self._index[key] = self._parse_index(key, os.pread(fd, n, size - n), size - n)
            off, length = self._entry(key, index, lin)
            buf = self._buffers.get(length)
            got = os.preadv(fd, [buf], off)
            if got != length:
                raise self._damaged(key, f"chunk {lin} cut short ({got} of {length} bytes)")
            return buf
        finally:
            os.close(fd)

    async def _remote(self, wanted: list[tuple[str, int, _Plan]]) -> list[np.ndarray]:
        proto = default_buffer_prototype()
        missing = {key: p for key, _, p in wanted if key not in self._index}

        async def index_of(key: str, p: _Plan) -> None:
            n = p.n_index * 16 + 4
            buf = await self.zstore.get(key, proto, byte_range=SuffixByteRequest(n))
            if buf is None:
                raise self._damaged(key, "shard file missing")
            raw = buf.to_bytes()
            if len(raw) < n:
                raise self._damaged(key, f"shard object of {len(raw)} bytes is shorter than its index")
            self._index[key] = self._parse_index(key, raw, None)

        await asyncio.gather(*(index_of(k, p) for k, p in missing.items()))

        async def chunk(key: str, lin: int) -> np.ndarray:
            off, length = self._entry(key, self._index[key], lin)
            buf = await self.zstore.get(key, proto, byte_range=RangeByteRequest(off, off + length))
            if buf is None:
                raise self._damaged(key, "shard file missing")
            arr = np.frombuffer(buf.to_bytes(), dtype=np.uint8)
            if arr.size != length:
                raise self._damaged(key, f"chunk {lin} cut short ({arr.size} of {length} bytes)")
            return arr

        return list(await asyncio.gather(*(chunk(key, lin) for key, lin, _ in wanted)))

    def _parse_index(self, key: str, raw: bytes, body_end: int | None) -> np.ndarray:
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise self._damaged(key, "shard index checksum mismatch")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        if body_end is not None:
            full = index[(index[:, 0] != _EMPTY) | (index[:, 1] != _EMPTY)]
            if full.size and int((full[:, 0] + full[:, 1]).max()) > body_end:
                raise self._damaged(key, "shard index points past the end of the file")
        return index

    def _entry(self, key: str, index: np.ndarray, lin: int) -> tuple[int, int]:
        off, length = index[lin]
        if off == _EMPTY and length == _EMPTY:
            raise self._damaged(key, f"inner chunk {lin} was never written (the shard index marks it empty)")
        if length < 4:
            raise self._damaged(key, f"inner chunk {lin} of {int(length)} bytes has no checksum")
        return int(off), int(length)

    def _decode(self, p: _Plan, key: str, lin: int, raw: np.ndarray) -> np.ndarray:
        body, crc = raw[:-4], raw[-4:]
        if google_crc32c.value(body) != int.from_bytes(crc.tobytes(), "little"):
            raise self._damaged(key, f"inner chunk {lin} checksum mismatch")
        try:
            if p.codec == "zstd":
                data = np.frombuffer(_zstd.decompress(body), dtype=np.uint8)
            elif p.codec == "blosc":
                data = self._blosc(body, p.chunk_bytes)
            else:
                data = body
        except Exception as e:  # a frame the checksum passed but the decoder refuses: written wrong
            raise self._damaged(key, f"inner chunk {lin} does not decode ({e})") from e
        if data.size != p.chunk_bytes:
            raise self._damaged(key, f"inner chunk {lin} decodes to {data.size} bytes, not {p.chunk_bytes}")
        arr = data.view(p.dtype).reshape(p.chunk)
        if len(p.chunk) > 1:
            arr = arr[:, 0]  # the one view of a per-view chunk
        return arr

    def _blosc(self, body: np.ndarray, chunk_bytes: int) -> np.ndarray:
        """A blosc frame decoded into a reused buffer when its header says it holds a whole chunk."""
        nbytes = int.from_bytes(body[4:8].tobytes(), "little") if body.size >= 16 else -1  # blosc 1 header
        if nbytes != chunk_bytes:  # a short frame: decoded as it is, so the size check names it
            return np.frombuffer(_blosc.decompress(body), dtype=np.uint8)
        return _blosc.decompress(body, self._buffers.get(chunk_bytes))
