"""The training batch: one typed dict that the store reader, online mode and the model share.

A TypedDict, not a dataclass: the loader's workers, the shared-buffer pool (distill/batch_pool.py) and
`to_device` walk batches as nested dicts of tensors, and a TypedDict is exactly that at run time.
"""
from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class _StudentInputs(TypedDict):
    pixels: Tensor  # uint8 (B, Ks, 3, p, p): the student's visible patches
    student_idx: Tensor  # int64 (B, Ks): their grid positions, sorted
    teacher_idx: dict[str, Tensor]  # {t: int64 (B, Kt)}: each teacher's visible tokens, sorted


class StudentBatch(_StudentInputs, total=False):
    """One step's batch: B samples, one view each; the teachers being distilled, in store order.

    teacher_patch {t: (B, Kt, D_t)}: float16 or float32 targets (int8 before `dequantize_targets`, with
    teacher_patch_scale {t: float32 (B, Kt)}); teacher_cls {t: (B, D_t)} (teacher_cls_scale {t: (B,)}) only
    with a CLS term. A store batch has them from the start; an online batch gets them from LiveTeachers.
    """
    teacher_patch: dict[str, Tensor]
    teacher_cls: dict[str, Tensor]
    teacher_patch_scale: dict[str, Tensor]
    teacher_cls_scale: dict[str, Tensor]


class OnlineBatch(StudentBatch):
    """An online-mode batch: a StudentBatch plus what the live teachers and the reproducibility checks need."""
    view_images: Tensor  # uint8 (B, 3, H, W): the views the teachers see
    keys: list[str]  # sample keys
    view: Tensor  # int64 (B,): which of the V views
    epoch: Tensor  # int64 (B,): the pass over the data
