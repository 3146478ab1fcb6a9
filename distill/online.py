"""Online mode (train.targets = "online"): the trainer runs the teachers itself, on the very views and masks
extraction would store, instead of reading the store.

- `OnlineBatches(cfg, rank, world_size, start_step)`: an IterableDataset yielding whole batches; use it with
  `DataLoader(..., batch_size=None)` (or `online_loader`). Process r of W reads tars r, r+W, ... of
  cfg.data.urls; its DataLoader workers split those whole tars between them. The stream is endless: each
  worker passes over its tars again and again; pass e shows every sample once, at view e mod num_views
  (views and masks come from extract.prepare.prepare_view: the same seeds as extraction).
- Shuffling: per worker, tars in a seeded order per pass, then windows of
  max(B, shuffle_window // active workers, rounded down to a multiple of B) samples permuted by a seeded
  generator. Everything is a function of (config, rank, world size, number of workers, start_step):
  deterministic.
- `start_step=s` yields exactly what a fresh stream yields from its batch s on, with the same number of
  workers (see __iter__). Skipped batches are read and decoded but not prepared (no views, no teachers).
- Samples that extraction would skip for their input (undecodable, ...) are skipped here too; non-finite
  teacher outputs are not checked here (the trainer guards its loss).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.batch import OnlineBatch
from extract.masks import generator_for
from extract.pipeline import load_teachers
from extract.prepare import prepare_view, teacher_forward
from store_schema.collective import identity
from store_schema.config import PipelineConfig
from store_schema.shards import Sample, expand_urls, iter_tar


class OnlineBatches(IterableDataset):
    """Batches of cfg.train.batch_size samples, one view each: OnlineBatch (distill/batch.py), the
    teachers' targets still to come (LiveTeachers)."""

    def __init__(self, cfg: PipelineConfig, rank: int, world_size: int, start_step: int = 0):
        urls = expand_urls(cfg.data.urls, cfg.data.storage_options)
        self.cfg, self.rank, self.start_step = cfg, rank, start_step
        self.urls = urls[rank::world_size]
        if not self.urls:
            raise ValueError(f"process {rank} of {world_size} gets no training tar: data.urls lists {len(urls)} "
                             f"tars; train with at most {len(urls)} processes")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")

    def __iter__(self) -> Iterator[OnlineBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        active = min(workers, len(self.urls))  # a worker without a tar ends at once; the rest take turns
        if worker >= active:
            return
        # The DataLoader takes batches from workers 0, 1, ... in turn, so global batch j comes from stream
        # j mod active. Resuming at start_step, worker 0 must produce batch start_step: worker w plays
        # stream (w + start_step) mod active and skips that stream's batches before start_step.
        role = (worker + self.start_step) % active
        skip = max(0, -(-(self.start_step - role) // active))
        B = self.cfg.train.batch_size
        window = max(B, self.cfg.train.shuffle_window // active // B * B)
        stream = f"online:{self.rank}:{role}"
        buffer: list[tuple[int, str, Image.Image]] = []
        emitted = 0
        for item in self._samples(self.urls[role::active], stream):
            buffer.append(item)
            if len(buffer) < window:
                continue
            order = torch.randperm(window, generator=generator_for(self.cfg.seed, stream, emitted // (window // B),
                                                                   "shuffle")).tolist()
            for b in range(window // B):
                if emitted >= skip:
                    yield self._batch([buffer[i] for i in order[b * B:(b + 1) * B]])
                emitted += 1
            buffer = []

    def _samples(self, urls: list[str], stream: str) -> Iterator[tuple[int, str, Image.Image]]:
        """(pass, key, image) endlessly: every sample of `urls` once per pass, tars in a seeded order."""
        for epoch in itertools.count():
            order = torch.randperm(len(urls), generator=generator_for(self.cfg.seed, stream, epoch, "tars")).tolist()
            n = 0
            for i in order:
                for s in iter_tar(urls[i], self.cfg.data.max_image_pixels, self.cfg.data.storage_options):
                    if isinstance(s, Sample):
                        n += 1
                        yield epoch, s.key, s.image
            if n == 0:
                raise ValueError(f"no decodable sample in the training tars {urls[:3]}... of this worker")

    def _batch(self, items: list[tuple[int, str, Image.Image]]) -> OnlineBatch:
        V = self.cfg.views.num_views
        views = [prepare_view(self.cfg, image, key, epoch % V) for epoch, key, image in items]
        return {
            "pixels": torch.stack([v.student_pixels for v in views]),
            "student_idx": torch.stack([torch.from_numpy(v.student_idx) for v in views]),
            "teacher_idx": {t: torch.stack([torch.from_numpy(v.teacher_idx[t]) for v in views])
                            for t in self.cfg.teachers},
            "view_images": torch.stack([v.image for v in views]),
            "keys": [key for _, key, _ in items],
            "view": torch.tensor([epoch % V for epoch, _, _ in items], dtype=torch.int64),
            "epoch": torch.tensor([epoch for epoch, _, _ in items], dtype=torch.int64),
        }


def online_loader(cfg: PipelineConfig, rank: int, world_size: int, start_step: int = 0) -> DataLoader:
    """The DataLoader the trainer iterates: OnlineBatches with cfg.train.num_workers workers, no re-batching."""
    return DataLoader(OnlineBatches(cfg, rank, world_size, start_step), batch_size=None, collate_fn=identity,
                      num_workers=cfg.train.num_workers, persistent_workers=False)


class LiveTeachers(nn.Module):
    """The frozen teachers (always eval, no gradients). forward(batch) returns the batch plus
    "teacher_patch" {t: float32 (B,Kt,D)} and "teacher_cls" {t: float32 (B,D)} on the teachers' device.
    """

    def __init__(self, cfg: PipelineConfig):
        super().__init__()
        self.cfg = cfg
        models, metas = load_teachers(cfg, torch.device("cpu"))
        self.teachers = nn.ModuleDict(models)
        self.dims = {t: m.dim for t, m in metas.items()}
        self.weights_sha256 = {t: m.weights_sha256 for t, m in metas.items()}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LiveTeachers":
        return super().train(False)  # a frozen teacher never switches to training behaviour

    def forward(self, batch: OnlineBatch) -> OnlineBatch:
        out = OnlineBatch(**batch)
        out["teacher_patch"], out["teacher_cls"] = {}, {}
        for name, model in self.teachers.items():
            tc = self.cfg.teachers[name]
            cls, patch = teacher_forward(model, batch["view_images"], batch["teacher_idx"][name], tc.mean, tc.std,
                                         self.cfg.store.teacher_precision)  # as extraction would store them
            out["teacher_patch"][name], out["teacher_cls"][name] = patch, cls
        return out
