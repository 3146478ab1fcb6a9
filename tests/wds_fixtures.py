"""Helpers that write real WebDataset tars for tests: good images in many modes and sizes, and bad inputs.

Import from a test module as `from wds_fixtures import write_tar, make_image_bytes` (pytest's default
import mode puts tests/ on sys.path). Everything is deterministic: the same call writes the same bytes.

A sample is a dict in WebDataset's `TarWriter` convention: `{"__key__": "000001", "jpg": b"...",
"cls": 3}`; each other entry becomes the member `<key>.<ext>` (bytes as is; str and int as UTF-8 text).
For tars WebDataset's writer could not produce (duplicate members, odd names) use `write_members`.
"""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

# PIL format names for the file extensions tests use.
_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}


def gradient(size: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    """A uint8 test pattern (H, W, C) with full 0..255 range per channel (so contrast can be checked).

    size is (width, height) as in PIL. Channel c is a diagonal ramp shifted by c, plus a little
    seeded noise so that different seeds give different images.
    """
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = (xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2.0
    rng = np.random.default_rng(seed)
    out = np.empty((h, w, channels), np.uint8)
    for c in range(channels):
        v = (ramp + c / max(channels, 1)) % 1.0 if c else ramp
        noise = rng.integers(-3, 4, size=(h, w))
        out[..., c] = np.clip(np.round(v * 255) + noise, 0, 255).astype(np.uint8)
    return out


def make_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A PIL image of `mode` ("RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "1", "F").

    "P" gets a palette and a transparent palette entry (index 0); "RGBA"/"LA" get a horizontal alpha
    ramp; "I;16" spans the full 16-bit range (0..65535) so 8-bit conversion can be checked for contrast.
    """
    g = gradient(size, 3, seed)
    if mode == "RGB":
        return Image.fromarray(g, "RGB")
    if mode == "L":
        return Image.fromarray(g[..., 0], "L")
    if mode in ("RGBA", "LA"):
        alpha = gradient(size, 1, seed + 1)[..., 0]
        rgba = Image.fromarray(np.dstack([g, alpha]), "RGBA")
        return rgba if mode == "RGBA" else rgba.convert("LA")
    if mode == "P":
        p = Image.fromarray(g, "RGB").quantize(colors=16)
        p.info["transparency"] = 0
        return p
    if mode == "CMYK":
        return Image.fromarray(g, "RGB").convert("CMYK")
    if mode == "I;16":
        v = g[..., 0].astype(np.uint32) * 257  # 0..255 -> 0..65535: full 16-bit range
        return Image.fromarray(v.astype(np.uint16))  # uint16 -> mode "I;16"
    if mode == "I":
        return Image.fromarray(g[..., 0].astype(np.int32) * 257, "I")
    if mode == "F":
        return Image.fromarray(g[..., 0].astype(np.float32) / 255.0, "F")
    if mode == "1":
        return Image.fromarray(g[..., 0] > 127).convert("1")
    raise ValueError(f"make_image: unsupported mode {mode!r}")


def make_image_bytes(mode: str = "RGB", size: tuple[int, int] = (32, 24), fmt: str = "png", seed: int = 0) -> bytes:
    """Encode `make_image(mode, size, seed)` as `fmt` (a file extension: jpg, jpeg, png, webp, tiff).

    CMYK, I and F have no PNG form: ask for tiff (or jpg for CMYK). Modes a format cannot hold raise
    PIL's own error.
    """
    fmt_l = fmt.lower()
    if fmt_l not in _FORMATS:
        raise ValueError(f"make_image_bytes: unknown format {fmt!r}; use one of {sorted(_FORMATS)}")
    im = make_image(mode, size, seed)
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": 95} if _FORMATS[fmt_l] in ("JPEG", "WEBP") else {}
    if "transparency" in im.info:
        kwargs["transparency"] = im.info["transparency"]
    im.save(buf, _FORMATS[fmt_l], **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_png_header_bytes(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit grayscale) but whose data is one short row.

    Enough to test size checks (decompression bomb, zero size) without allocating the image: a decoder
    that trusts the header would try to allocate width * height bytes; decoding it fully fails.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (min(width, 64) + 1))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    raise TypeError(f"tar member value must be bytes, str or int, got {type(value).__name__}")


def sample_members(samples: Iterable[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """WebDataset sample dicts -> (member name, bytes) in order: `<__key__>.<ext>` per entry."""
    members = []
    for s in samples:
        if "__key__" not in s:
            raise ValueError(f"sample without __key__: {sorted(s)}")
        key = s["__key__"]
        members += [(f"{key}.{ext}", _as_bytes(v)) for ext, v in s.items() if ext != "__key__"]
    return members


def write_members(path: str | Path, members: Iterable[tuple[str, bytes]], gzip: bool = False) -> Path:
    """Write (name, bytes) members to a tar at `path` exactly in the given order (mtime 0: reproducible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gzip else "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


def write_tar(path: str | Path, samples: Iterable[Mapping[str, Any]], gzip: bool = False) -> Path:
    """Write WebDataset sample dicts (see the module docstring) to a tar at `path`; returns the path."""
    return write_members(path, sample_members(samples), gzip=gzip)


def good_samples(n: int, start: int = 0, size: tuple[int, int] = (32, 24), fmt: str = "jpg",
                 labels: bool = True, prefix: str = "") -> list[dict[str, Any]]:
    """n decodable RGB samples with keys f"{prefix}{i:06d}" and labels i % 10 (`cls`) when `labels`."""
    out = []
    for i in range(start, start + n):
        s: dict[str, Any] = {"__key__": f"{prefix}{i:06d}", fmt: make_image_bytes("RGB", size, fmt, seed=i)}
        if labels:
            s["cls"] = i % 10
        out.append(s)
    return out


def member_offsets(path: str | Path) -> dict[str, tuple[int, int]]:
    """name -> (offset of its data in the tar file, data size); to cut a file in a chosen member."""
    with tarfile.open(path, "r:") as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def truncate(path: str | Path, size: int) -> Path:
    """Cut the file at `path` to its first `size` bytes (simulates an interrupted download)."""
    path = Path(path)
    path.write_bytes(path.read_bytes()[:size])
    return path
