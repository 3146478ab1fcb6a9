"""Feature encoding (float32 / float16 / int8 with a per-token scale) and zarr compressors."""
from __future__ import annotations

import numpy as np
import zarr.codecs as zc

from store_schema.choices import COMPRESSIONS, FEATURE_DTYPES  # defined once (store.dtype, store.compression)


def compressors_for(compression: str, level: int, blosc_block_kib: int = 0) -> tuple:
    """zarr v3 bytes-to-bytes chain for a config name, always ending in a CRC32C checksum.

    Without the checksum a flipped bit inside a compressed chunk decodes silently to wrong values
    (zstd frames carry no checksum in zarr); with it, a damaged chunk is a read error. blosc is zstd
    after a byte shuffle, in blocks of `blosc_block_kib` (0: blosc's own choice). The shuffle puts
    float16's sign/exponent bytes (compressible) apart from its mantissa bytes (noise), but only blocks
    of >= 256 KiB let zstd profit: on ViT-B-like float16 features, 1 MiB blocks store 0.85 of the raw
    bytes and decode at ~3.2 GB/s per core, against plain zstd's 0.92 at ~1.5 GB/s and blosc's own
    choice of block at level 3 (128 KiB) 0.92 at ~1.2 GB/s (BENCHMARKS.md, "Session 9").
    """
    if compression == "zstd":
        return (zc.ZstdCodec(level=level), zc.Crc32cCodec())
    if compression == "blosc":
        return (zc.BloscCodec(cname="zstd", clevel=min(level, 9), shuffle="shuffle", blocksize=blosc_block_kib * 1024),
                zc.Crc32cCodec())
    if compression == "none":
        return (zc.Crc32cCodec(),)
    raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


def encode_features(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode float features (..., D) for storage.

    Returns (values, scale): values in the storage dtype; scale (...,) float32 for int8, None otherwise.

    int8 is square-root companded with one scale per token (the token's absmax):
    q = round(127 · sign(x) · sqrt(|x| / scale)),  x̂ = sign(q) · (q / 127)² · scale.
    Uniform absmax int8 loses the small channels of a token that has one massive activation (cosine
    0.998 on heavy-tailed ViT-like features); companding keeps every token above 0.9998 at the same
    size. A zero token gets scale 0 and decodes to zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "int8":
        scale = np.abs(x).max(axis=-1).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        q = np.rint(127.0 * np.sign(x) * np.sqrt(np.abs(x) / safe)).astype(np.int8)
        return q, scale
    raise ValueError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(FEATURE_DTYPES)}")


def decode_features(values: np.ndarray, scale: np.ndarray | None, keep_float16: bool = False) -> np.ndarray:
    """Inverse of encode_features: float32 (..., D), or float16 values as they are with keep_float16."""
    if scale is None:
        if keep_float16 and values.dtype == np.float16:
            return values
        return np.asarray(values, dtype=np.float32)
    q = values.astype(np.float32) / 127.0
    return np.sign(q) * q * q * np.asarray(scale, dtype=np.float32)[..., None]


def all_finite(x: np.ndarray) -> bool:
    """np.isfinite(x).all(), ~10x faster for float16 (numpy has no vectorised float16 isfinite)."""
    if x.dtype == np.float16:
        # float16 inf/nan have all five exponent bits set: the largest exponent field is then 0x7C00.
        # (One temporary and a max: a third less time than a comparison array and any().)
        return int((np.ascontiguousarray(x).view(np.uint16) & 0x7C00).max(initial=0)) != 0x7C00
    return bool(np.isfinite(x).all())
