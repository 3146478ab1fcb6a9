"""Cross-field checks that depend on the architecture, run by `validate` when a config is loaded.

Whether `heads.decoder_heads` divides the student's width, whether `student.arch_kwargs` builds at
`data.image_size` / `data.patch_size`, whether a timm tag belongs to its arch: these need what timm
builds for (arch, arch_kwargs, image, patch). Each model is built on PyTorch's meta device (no memory,
no initialisation: ~0.1 s for a ViT-B) and the answer is cached, so a multi-day extraction or a sweep
refuses a config the trainer could not use before any work, naming the keys and the valid values.
"""
from __future__ import annotations

import functools
import json
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from store_schema.config import PipelineConfig

# Keys the pipeline sets itself when it builds a ViT (a headless, randomly initialised model for the
# configured image and patch size); the student and teacher builders refuse them in arch_kwargs.
RESERVED_ARCH_KWARGS = ("pretrained", "num_classes", "img_size", "patch_size")


@functools.lru_cache(maxsize=64)
def _built(arch: str, kwargs_json: str, image_size: int, patch_size: int) -> tuple[int | None, str | None]:
    """(embed_dim, None) when timm builds a supported ViT for these arguments, else (None, the reason and fix)."""
    import timm  # here: store_schema.config imports this module, and loading a config must not load timm/torch
    import torch

    # what the token-dropping forward needs of a ViT (imports timm/torch, so here too, not at import time)
    from vit_layers.forward import check_supported_vit

    try:
        with torch.device("meta"), warnings.catch_warnings():
            # timm initialises e.g. an empty register-token table; on the meta device torch warns it is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size,
                                      patch_size=patch_size, **json.loads(kwargs_json))
    except (RuntimeError, ValueError, TypeError, AssertionError, ZeroDivisionError, KeyError) as e:
        # timm checks sizes with asserts and arithmetic deep inside the model; an unknown arch is a RuntimeError
        return None, (f"{type(e).__name__}: {e or 'invalid sizes'} (e.g. embed_dim must be a positive multiple of "
                      "num_heads, depth >= 0)")
    try:
        check_supported_vit(model)
    except ValueError as e:  # its message names the problem and the arch_kwargs that fix it
        return None, str(e)
    return int(model.embed_dim), None


def _build_error(prefix: str, arch: str, kwargs: dict, cfg: "PipelineConfig") -> tuple[int | None, list[str]]:
    reserved = sorted(set(RESERVED_ARCH_KWARGS) & set(kwargs))
    if reserved:
        return None, [f"{prefix}.arch_kwargs sets {reserved}: these come from data.image_size, data.patch_size and "
                      f"the pipeline; remove them (valid keys are the arch's own, e.g. embed_dim, depth, num_heads)"]
    dim, why = _built(arch, json.dumps(kwargs, sort_keys=True), cfg.data.image_size, cfg.data.patch_size)
    if why is not None:
        return None, [f"{prefix}.arch = {arch!r} with {prefix}.arch_kwargs = {dict(kwargs)} cannot be built at "
                      f"data.image_size = {cfg.data.image_size}, data.patch_size = {cfg.data.patch_size}: {why}"]
    return dim, []


def _divisors(n: int, limit: int = 1024) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def architecture_errors(cfg: "PipelineConfig") -> list[str]:
    """Every architecture-dependent constraint the config breaks, one message each (empty: none)."""
    errors: list[str] = []
    s, h = cfg.student, cfg.heads
    width, errs = _build_error("student", s.arch, s.arch_kwargs, cfg)
    errors += errs
    if width is not None:
        if width % 4:
            errors.append(f"student.arch_kwargs gives a student width (embed_dim) of {width}: its fixed 2-D sin-cos "
                          f"positions (student and decoder) need a multiple of 4; set embed_dim to e.g. "
                          f"{width - width % 4 or 4} or {width + 4 - width % 4}")
        if width % h.decoder_heads:
            errors.append(f"heads.decoder_heads = {h.decoder_heads} does not divide the student width {width} "
                          f"(student.arch = {s.arch!r}, student.arch_kwargs = {dict(s.arch_kwargs)}); "
                          f"valid values: {', '.join(map(str, _divisors(width)))}")
    for name, t in cfg.teachers.items():
        errors += _build_error(f"teachers.{name}", t.arch, t.arch_kwargs, cfg)[1]
        if t.format == "timm":
            errors += _timm_tag_errors(name, t.arch, t.weights)
    return errors


def _timm_tag_errors(name: str, arch: str, weights: str) -> list[str]:
    """A `format = "timm"` teacher's weights must be a pretrained tag timm knows for its arch."""
    import timm  # here, not at the top: see _built

    tag = weights if "." in weights else f"{arch}.{weights}"
    known = timm.list_pretrained(f"{arch}.*")
    if tag in known:
        return []
    if tag.split(".", 1)[0] != arch:
        return [f"teachers.{name}.weights = {weights!r} is not a tag of teachers.{name}.arch = {arch!r}; "
                f"valid tags: {', '.join(known) or 'none (timm has no pretrained weights for this arch)'}"]
    return [f"teachers.{name}.weights = {weights!r}: timm has no pretrained tag {tag!r}; valid tags: "
            f"{', '.join(known) or 'none'}; or set teachers.{name}.format to the checkpoint's layout "
            f"(mae, mocov3, ibot, state_dict) and weights to its file"]
