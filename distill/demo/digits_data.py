"""The demo's data: scikit-learn's digits (1,797 real labelled 8x8 images, shipped inside the package).

The images are written as WebDataset shards (`<key>.png` + `<key>.cls`), split into a stratified,
seeded train/test partition. Each 8x8 image (intensities 0..16) is scaled to 0..255 and upsampled once,
here, to the demo's image size with PIL bicubic, as grey replicated to RGB: every reader (the
extraction views, the evaluation, the teacher fixtures) then starts from the same pixels, whatever
resize it would apply to a smaller source. Keys are `digit-<sklearn index>` so a split can be
checked for disjointness. Tars are written with fixed member metadata, so the same call writes the
same bytes (webdataset's TarWriter with a fixed mtime).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

__all__ = ["DigitsShards", "digits_images", "stratified_split", "write_digits_shards", "write_tar"]


@dataclass(frozen=True)
class DigitsShards:
    train_urls: list[str]  # tar paths, in order
    test_urls: list[str]
    train_index: np.ndarray  # (n_train,) sklearn indices, in shard order
    test_index: np.ndarray  # (n_test,)
    labels: np.ndarray  # (1797,) int64 labels of all digits, by sklearn index


def digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 RGB images (1797, size, size, 3) and int64 labels (1797,).

    Raises ValueError for size < 8 (the digits would be downsampled).
    """
    from sklearn.datasets import load_digits  # here: scikit-learn is optional (the `extras`), the demo's only

    if size < 8:
        raise ValueError(f"digits image size must be >= 8 (the source is 8x8), got {size}")
    d = load_digits()
    grey = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    out = np.empty((len(grey), size, size, 3), np.uint8)
    for i, g in enumerate(grey):
        big = Image.fromarray(g, "L").resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(big)[..., None]
    return out, d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices 0..N-1: (train_index, test_index), each sorted ascending."""
    from sklearn.model_selection import train_test_split  # optional, as above

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    """Write (key, png bytes, label) samples as a WebDataset tar with webdataset's own writer (members
    `<key>.cls`, `<key>.png`: it writes a sample's members in sorted order).

    Fixed member metadata (mtime 0, mode, owner), so the same call writes the same bytes. Written to a
    temporary name and renamed, so a reader never sees half a tar.
    """

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0, mode=0o644, user="comad", group="comad") as tar:
        for key, png, label in samples:
            tar.write({"__key__": key, "png": png, "cls": str(int(label)).encode()})  # bytes: no encoder runs
    tmp.replace(path)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_digits_shards(out_dir: str | Path, *, size: int, test_fraction: float, seed: int,
                        train_shards: int, test_shards: int) -> DigitsShards:
    """Write the digits as `digits-train-NNNNNN.tar` / `digits-test-NNNNNN.tar` under `out_dir`.

    Samples are spread over the shards in contiguous runs of (almost) equal size, in ascending
    sklearn index. Existing shard files of either split that this call would not write are removed,
    so a brace pattern over the directory never picks up a stale shard.
    """
    if train_shards < 1 or test_shards < 1:
        raise ValueError(f"need at least one shard per split, got train={train_shards}, test={test_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_images(size)
    train, test = stratified_split(labels, test_fraction, seed)
    urls: dict[str, list[str]] = {}
    for split, index, n_shards in (("train", train, train_shards), ("test", test, test_shards)):
        if n_shards > len(index):
            raise ValueError(f"{n_shards} {split} shards for {len(index)} samples: some would be empty")
        for stale in out.glob(f"digits-{split}-*.tar"):
            stale.unlink()
        urls[split] = []
        for s, part in enumerate(np.array_split(index, n_shards)):
            path = out / f"digits-{split}-{s:06d}.tar"
            write_tar(path, [(f"digit-{i:04d}", _png(images[i]), int(labels[i])) for i in part])
            urls[split].append(str(path))
    return DigitsShards(urls["train"], urls["test"], train, test, labels)
