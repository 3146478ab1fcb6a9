"""Seeded asymmetric masks: the student's visible tokens and each teacher's superset (each teacher sees more
context than the student: masks.student_visible < teachers.<name>.visible, README "The config file").

Every random draw of the pipeline comes from a generator seeded by (global seed, sample key, view,
role), so the same config re-extracts the same views and masks on any machine, in any order, in any
worker process — no draw depends on what was drawn before. Roles: "view" (crop and flip),
"student", "teacher:<name>" (independent mode), "chain" (nested mode).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from store_schema.config import PipelineConfig

_SEED_MASK = (1 << 63) - 1  # torch generators take any 64-bit seed; 63 bits also fit a signed int64


def derive_seed(seed: int, key: str, view: int, role: str) -> int:
    """A stable 63-bit seed from blake2b of the parts (JSON-encoded, so no two part lists collide)."""
    payload = json.dumps([int(seed), str(key), int(view), str(role)], ensure_ascii=False).encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "big") & _SEED_MASK


def generator_for(seed: int, key: str, view: int, role: str) -> torch.Generator:
    """A CPU torch.Generator seeded with derive_seed(seed, key, view, role)."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, key, view, role))
    return gen


@dataclass
class ViewMasks:
    student: np.ndarray  # (Ks,) int64 visible token indices, sorted ascending
    teachers: dict[str, np.ndarray]  # name -> (Kt,) int64 visible indices, sorted, ⊇ student


def draw_masks(cfg: PipelineConfig, key: str, view: int) -> ViewMasks:
    """The student and teacher visible sets of one (sample key, view).

    Student: Ks = cfg.student_tokens of N = cfg.num_patches tokens, uniform, generator "student".
    Independent mode: teacher k keeps the student set plus Kt - Ks uniform student-masked tokens from
    its own generator "teacher:<name>", so adding or removing a teacher never changes the others.
    Nested mode (cfg.masks.nested): one random order of the student-masked tokens (generator "chain");
    each teacher takes a prefix of it, so V_s ⊆ V_1 ⊆ V_2 ... in order of visible fraction.
    """
    n, ks = cfg.num_patches, cfg.student_tokens
    counts = {name: cfg.teacher_tokens(name) for name in cfg.teachers}
    for name, kt in counts.items():
        # config validation guarantees this; a violation here means an unvalidated config was passed
        assert ks < kt <= n, f"teacher {name}: {kt} visible tokens must exceed the student's {ks} and be <= {n}"
    student = _sorted(torch.randperm(n, generator=generator_for(cfg.seed, key, view, "student"))[:ks])
    masked = np.setdiff1d(np.arange(n, dtype=np.int64), student)  # (N - Ks,) sorted
    teachers: dict[str, np.ndarray] = {}
    if cfg.masks.nested:
        order = masked[torch.randperm(n - ks, generator=generator_for(cfg.seed, key, view, "chain")).numpy()]
        for name in chain_order(cfg):
            teachers[name] = np.union1d(student, order[: counts[name] - ks])
    else:
        for name, kt in counts.items():
            gen = generator_for(cfg.seed, key, view, f"teacher:{name}")
            extra = masked[torch.randperm(n - ks, generator=gen).numpy()[: kt - ks]]
            teachers[name] = np.union1d(student, extra)
    return ViewMasks(student=student, teachers={name: teachers[name] for name in cfg.teachers})


def chain_order(cfg: PipelineConfig) -> list[str]:
    """Teacher names by visible fraction, ties by name: the order of the nested chain."""
    return sorted(cfg.teachers, key=lambda name: (cfg.teachers[name].visible, name))


def _sorted(idx: torch.Tensor) -> np.ndarray:
    return np.sort(idx.numpy().astype(np.int64))
