"""The store fingerprint: everything that decides what the stored features mean.

Two stores with equal fingerprints hold interchangeable data. Stage 2 checks the subset it depends
on (`TRAINING_FIELDS`) against its own config before training, and refuses with every differing
field named.
"""
from __future__ import annotations

from typing import Any, Iterable

from .config import PipelineConfig

SCHEMA_VERSION = "1.0"

# What stage 2 must agree on. Seed and storage dtype are left out on purpose: a training run may use
# another seed for its own shuffling, and every dtype decodes to the same float32 targets.
TRAINING_FIELDS = ("schema_major", "image_size", "patch_size", "num_patches", "student_visible",
                   "student_tokens", "nested", "views", "teachers")


class StoreMismatchError(ValueError):
    """The store was written for another configuration; the message names every differing field."""


def fingerprint_from_config(cfg: PipelineConfig, weights_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    teachers = {}
    for name, t in cfg.teachers.items():
        teachers[name] = {
            "arch": t.arch,
            "arch_kwargs": dict(t.arch_kwargs),
            "visible": t.visible,
            "tokens": cfg.teacher_tokens(name),
            "mean": list(t.mean),
            "std": list(t.std),
        }
        if weights_sha256 is not None:
            teachers[name]["weights_sha256"] = weights_sha256[name]
    v = cfg.views
    # Only a non-default precision is recorded, so that stores written before the key keep their fingerprint.
    precision = {} if cfg.store.teacher_precision == "float32" else {"teacher_precision": cfg.store.teacher_precision}
    return {
        "schema_major": int(SCHEMA_VERSION.split(".")[0]),
        "image_size": cfg.data.image_size,
        "patch_size": cfg.data.patch_size,
        "num_patches": cfg.num_patches,
        "student_visible": cfg.masks.student_visible,
        "student_tokens": cfg.student_tokens,
        "nested": cfg.masks.nested,
        "views": {"num_views": v.num_views, "crop_scale": list(v.crop_scale), "crop_ratio": list(v.crop_ratio),
                  "hflip_prob": v.hflip_prob, "interpolation": v.interpolation},
        "teachers": teachers,
        "dtype": cfg.store.dtype,
        "seed": cfg.seed,
        **precision,
    }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and k != "arch_kwargs":
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def diff_fingerprints(stored: dict[str, Any], expected: dict[str, Any],
                      fields: Iterable[str] | None = None, ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable differences 'field: store X, expected Y', restricted to `fields` (top-level names)."""
    if fields is not None:
        fields = set(fields)
        stored = {k: v for k, v in stored.items() if k in fields}
        expected = {k: v for k, v in expected.items() if k in fields}
    a, b = flatten(stored), flatten(expected)
    ignore = tuple(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == i or key.endswith("." + i) for i in ignore):
            continue
        if key not in a:
            out.append(f"{key}: missing in the store, expected {b[key]!r}")
        elif key not in b:
            out.append(f"{key}: store has {a[key]!r}, not in the expected configuration")
        elif a[key] != b[key]:
            out.append(f"{key}: store has {a[key]!r}, expected {b[key]!r}")
    return out
