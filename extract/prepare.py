"""The decode side of extraction: one tar -> prepared chunks (views, masks, student pixels), in DataLoader workers.

Everything here is a function of (config, sample key, view index), so extraction and the online trainer
(distill.online) prepare the very same views and masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from extract.masks import draw_masks
from extract.resume import source_identity
from extract.views import apply_view, draw_view
from store_schema.config import PipelineConfig
from store_schema.faults import fault_point
from store_schema.shards import ShardReadError, Skipped, iter_tar
from store_schema.skips import SkipKind
from vit_layers.forward import forward_visible, patchify
from vit_layers.pixels import normalize_pixels


@dataclass
class PreparedView:
    params: np.ndarray  # (5,) float32 [top, left, height, width, flip]
    image: torch.Tensor  # (3, S, S) uint8
    student_idx: np.ndarray  # (Ks,) int64 sorted
    teacher_idx: dict[str, np.ndarray]  # name -> (Kt,) int64 sorted
    student_pixels: torch.Tensor  # (Ks, 3, p, p) uint8


def prepare_view(cfg: PipelineConfig, image: Image.Image, key: str, view: int) -> PreparedView:
    """View `view` of sample `key`: crop/flip, masks and the student's visible pixels (seeded, replayable)."""
    params = draw_view(cfg, key, view, image.width, image.height)
    img = apply_view(image, params, cfg.data.image_size, cfg.views.interpolation)
    masks = draw_masks(cfg, key, view)
    pixels = patchify(img[None], cfg.data.patch_size)[0][torch.from_numpy(masks.student)]
    return PreparedView(params.to_array(), img, masks.student, masks.teachers, pixels.contiguous())


def teacher_forward(model: torch.nn.Module, images: torch.Tensor, idx: torch.Tensor, mean: list[float],
                    std: list[float], precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B,3,H,W), visible indices (B,K) -> float32 cls (B,D), patch (B,K,D) on the model's device.

    precision "bf16" runs the forward under bfloat16 autocast (store.teacher_precision: tensor-core speed on
    a GPU; the features keep bf16's 8-bit mantissa); "float32" with autocast off, whatever the caller's."""
    dev = next(model.parameters()).device
    x = normalize_pixels(images.to(dev, non_blocking=True), mean, std)
    # no_grad, not inference_mode: online targets meet autograd tensors in the trainer's loss.
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        cls, patch = forward_visible(model, x, idx.to(dev))
    return cls.float(), patch.float()


# ---------------------------------------------------------------------------------------------- decoding

@dataclass
class Chunk:
    """Up to n prepared samples of one tar (all V views each) plus the tar's skip records since the last chunk."""
    url: str
    keys: list[str]
    index: np.ndarray | None = None  # (m,) int64 ordinal in the tar
    label: np.ndarray | None = None  # (m,) int64, -1 = no label
    views: np.ndarray | None = None  # (m, V, 5) float32
    images: torch.Tensor | None = None  # (m, V, 3, S, S) uint8
    student_idx: np.ndarray | None = None  # (m, V, Ks) int64
    student_pixels: torch.Tensor | None = None  # (m, V, Ks, 3, p, p) uint8
    teacher_idx: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (m, V, Kt) int64
    skips: list[tuple[int, str | None, SkipKind, str]] = field(default_factory=list)  # (index, key, kind, reason)
    notes: list[tuple[int, str, str]] = field(default_factory=list)  # (index, key, note): kept, with a remark
    last: bool = False  # the tar ends here
    source: dict | None = None  # on the last chunk: the tar's size and mtime/ETag before it was read
    error: str | None = None  # the tar could not be read: discard the unit


def _chunk(url: str, done: list, skips: list, notes: list, last: bool, source: dict | None = None) -> Chunk:
    if not done:
        return Chunk(url, [], skips=skips, notes=notes, last=last, source=source)
    views = [v for _, v in done]
    return Chunk(
        url, [k for (_, k, _), _ in done],
        index=np.array([i for (i, _, _), _ in done], np.int64),
        label=np.array([-1 if lab is None else lab for (_, _, lab), _ in done], np.int64),
        views=np.stack([np.stack([v.params for v in vs]) for vs in views]),
        images=torch.stack([torch.stack([v.image for v in vs]) for vs in views]),
        student_idx=np.stack([np.stack([v.student_idx for v in vs]) for vs in views]),
        student_pixels=torch.stack([torch.stack([v.student_pixels for v in vs]) for vs in views]),
        teacher_idx={t: np.stack([np.stack([v.teacher_idx[t] for v in vs]) for vs in views])
                     for t in views[0][0].teacher_idx},
        skips=skips, notes=notes, last=last, source=source)


def tar_chunks(cfg: PipelineConfig, url: str, samples_per_chunk: int) -> Iterator[Chunk]:
    """Every sample of one tar, prepared, in order; the last chunk has last=True (or error set)."""
    done: list = []
    skips: list[tuple[int, str | None, SkipKind, str]] = []
    notes: list[tuple[int, str, str]] = []
    seen = 0
    options = cfg.data.storage_options
    source = source_identity(url, options)  # before reading: a file replaced while being read differs next time
    try:
        for item in iter_tar(url, cfg.data.max_image_pixels, options):
            seen += 1
            if isinstance(item, Skipped):
                skips.append((item.index, item.key, item.kind, item.reason))
                continue
            fault_point("decode")
            if item.note:
                notes.append((item.index, item.key, item.note))  # recorded with the sample in its unit
            try:
                views = [prepare_view(cfg, item.image, item.key, v) for v in range(cfg.views.num_views)]
            except ValueError as e:  # e.g. a view box that rounds to nothing
                skips.append((item.index, item.key, SkipKind.NO_VIEWS, f"cannot make views: {e}"))
                continue
            done.append(((item.index, item.key, item.label), views))
            if len(done) == samples_per_chunk:
                yield _chunk(url, done, skips, notes, last=False)
                done, skips, notes = [], [], []
    except ShardReadError as e:
        yield Chunk(url, [], last=True, error=str(e))
        return
    if seen == 0:
        skips.append((0, None, SkipKind.EMPTY_TAR, "empty tar: no samples"))
    yield _chunk(url, done, skips, notes, last=True, source=source)


class PreparedTars(IterableDataset):
    """Chunks of the given tars; DataLoader workers split the tars between them (whole tars each)."""

    def __init__(self, cfg: PipelineConfig, urls: list[str], samples_per_chunk: int):
        self.cfg, self.urls, self.samples_per_chunk = cfg, list(urls), samples_per_chunk

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        for url in urls:
            yield from tar_chunks(self.cfg, url, self.samples_per_chunk)
