"""Building teachers and loading official self-supervised checkpoints strictly.

Each official format is converted to one plain timm ViT backbone state dict and loaded with
``strict=True``: a non-strict load silently leaves random weights (timm's own MoCo v3 path does).
Converters drop only the documented extras of their format (heads, decoders, momentum encoders);
any other key is left in so that the strict load fails and names it. Checkpoints are read with
``torch.load(weights_only=True)`` or safetensors, so loading a checkpoint never runs its code.
Each checkpoint keeps its own ``pos_embed`` (MAE and MoCo v3 store fixed sin-cos tables with
different layouts); it is resampled only when its grid differs from the model's, never regenerated.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import warnings
from collections.abc import Mapping

import fsspec
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from store_schema.choices import CHECKPOINT_FORMATS as FORMATS  # local-file formats (the config adds "timm")
from store_schema.config import TeacherConfig
from vit_layers.forward import check_supported_vit

__all__ = [
    "FORMATS",
    "build_vit",
    "convert_checkpoint",
    "load_state_dict_file",
    "load_teacher",
    "state_dict_sha256",
]


def build_vit(arch: str, arch_kwargs: dict, image_size: int, patch_size: int) -> VisionTransformer:
    """A randomly initialised, headless timm ViT for ``image_size`` / ``patch_size``, checked supported."""
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size,
                                  patch_size=patch_size, **arch_kwargs)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"cannot build ViT arch={arch!r} with arch_kwargs={arch_kwargs}: {e}") from e
    check_supported_vit(model)
    return model


# ----------------------------------------------------------------------------------------------
# Converters: official checkpoint object -> plain timm backbone state dict


def _pick(obj: Mapping, key: str, fmt: str) -> Mapping:
    if key not in obj:
        raise ValueError(f"{fmt} checkpoint: expected top-level key {key!r}, found {sorted(obj)[:10]}; "
                         f"check the file and its format (formats: {', '.join(FORMATS)})")
    return obj[key]


def _strip_module(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a DistributedDataParallel ``module.`` prefix where present."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _is_under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def convert_checkpoint(obj: Mapping, fmt: str) -> dict[str, Tensor]:
    """Convert a loaded official checkpoint to a plain timm ViT backbone state dict (no head).

    fmt: ``mae`` (``{"model": sd}``, drops ``mask_token`` and ``decoder_*``), ``mocov3``
    (``{"state_dict": {module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}}``),
    ``ibot`` (``{"state_dict": sd}`` teacher file or ``{"teacher": {backbone.*, head.*}}`` full file;
    drops ``head.*`` and ``masked_embed``), ``state_dict`` (plain timm dict, optionally under
    ``state_dict``/``model``; drops ``head.*``). Unknown keys are kept so a strict load names them.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{fmt} checkpoint: expected a dict, got {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    if fmt == "mae":
        for k, v in _strip_module(_pick(obj, "model", fmt)).items():
            if k == "mask_token" or k.startswith("decoder_"):
                continue  # MAE's pixel decoder (the _full / visualize checkpoints)
            out[k] = v
    elif fmt == "mocov3":
        for k, v in _strip_module(_pick(obj, "state_dict", fmt)).items():
            if _is_under(k, "base_encoder.head") or k.startswith(("momentum_encoder.", "predictor.")):
                continue  # projection MLP, EMA copy and predictor: training-only parts
            out[k.removeprefix("base_encoder.")] = v
    elif fmt == "ibot":
        if "state_dict" in obj:  # checkpoint_teacher.pth: teacher backbone, unprefixed
            sd = _strip_module(obj["state_dict"])
        elif "teacher" in obj:  # full checkpoint.pth: teacher = backbone.* + head.*
            sd = {k.removeprefix("backbone."): v for k, v in _strip_module(obj["teacher"]).items()
                  if not _is_under(k, "head")}
        else:
            raise ValueError(f"ibot checkpoint: expected key 'state_dict' (checkpoint_teacher.pth) or "
                             f"'teacher' (checkpoint.pth), found {sorted(obj)[:10]}")
        out = {k: v for k, v in sd.items() if not _is_under(k, "head") and k != "masked_embed"}
    elif fmt == "state_dict":
        sd = obj
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
        out = {k: v for k, v in _strip_module(sd).items() if not _is_under(k, "head")}
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)} (or 'timm')")
    bad = [k for k, v in out.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{fmt} checkpoint: entries {bad[:5]} are not tensors; is the format right?")
    return out


# ----------------------------------------------------------------------------------------------
# Reading files and hashing weights


def _read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def load_state_dict_file(path: str) -> Mapping:
    """Read a checkpoint without running any code from it: safetensors, or ``torch.load(weights_only=True)``.

    ``path`` is a local path or an fsspec URL. A pickle that needs arbitrary classes or functions is
    refused with a ``ValueError`` naming the file.
    """
    remote = "://" in path and not path.startswith("file://")
    if path.endswith(".safetensors"):
        if remote:
            return safetensors.torch.load(_read_bytes(path))
        return safetensors.torch.load_file(path.removeprefix("file://"), device="cpu")
    src = io.BytesIO(_read_bytes(path)) if remote else path.removeprefix("file://")
    try:
        # argparse.Namespace is allowed because official training checkpoints store their `args` in one.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher checkpoint not found: {path}") from e
    except (pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "weights_only" not in str(e).lower().replace(" ", "_"):
            raise ValueError(f"cannot read checkpoint {path}: {e}") from e
        raise ValueError(
            f"refusing to load {path}: the checkpoint contains pickled Python objects that "
            f"torch.load(weights_only=True) refuses to execute. Re-save only its tensors (e.g. as "
            f".safetensors) from a trusted environment. Details: {_unsafe_detail(e)}"
        ) from e


def _unsafe_detail(e: Exception) -> str:
    """The line of torch's weights_only message that names the refused global, if any."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else type(e).__name__)
    # torch goes on to suggest allow-listing the global; for code like `exec` that advice is the attack.
    return line.split(" Please use `torch.serialization.add_safe_globals")[0]


def state_dict_sha256(sd: Mapping[str, Tensor]) -> str:
    """Hex sha256 over sorted keys, each tensor's dtype, shape and raw bytes. Deterministic across runs."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # Viewing as bytes works for every dtype, including bfloat16 which numpy lacks.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Loading teachers


def _load_timm_pretrained(cfg: TeacherConfig, image_size: int, patch_size: int) -> VisionTransformer:
    name = cfg.weights if "." in cfg.weights else f"{cfg.arch}.{cfg.weights}"
    if name.split(".", 1)[0] != cfg.arch:
        raise ValueError(f"teacher {cfg.name!r}: timm tag {cfg.weights!r} is not a tag of arch {cfg.arch!r}")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, img_size=image_size,
                                 patch_size=patch_size, **cfg.arch_kwargs)
    except Exception as e:  # hub errors come in many types (OSError, HTTP, LocalEntryNotFound, ...)
        raise RuntimeError(
            f"teacher {cfg.name!r}: could not fetch timm weights {name!r} ({type(e).__name__}: {e}). "
            f"This needs network access or a populated Hugging Face cache. Otherwise download the "
            f"official checkpoint and set format = \"mae\"/\"mocov3\"/\"ibot\"/\"state_dict\" with "
            f"weights = the local file path."
        ) from e


def _fit_pos_embed(sd: dict[str, Tensor], model: VisionTransformer, where: str) -> None:
    """Resample the checkpoint's own pos_embed to the model's grid if needed (in place, with a warning)."""
    pos = sd.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return
    grid = model.patch_embed.grid_size
    if pos.dim() != 3 or pos.shape[-1] != model.pos_embed.shape[-1]:
        return  # a different width: leave it for the shape check to report
    warnings.warn(f"{where}: resampling the checkpoint's pos_embed from {pos.shape[1] - 1} patch positions "
                  f"to the model's {grid[0]}x{grid[1]} grid (bicubic)", stacklevel=3)
    sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)


def load_strict(model: VisionTransformer, sd: dict[str, Tensor], where: str,
                hint: str = "Check format and arch/arch_kwargs, image and patch size.") -> None:
    """load_state_dict(strict=True), with an error that names every missing, extra or misshaped key.

    torch's own strict error is raised only after partially copying; this checks first and says what to fix.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model; missing keys: {missing}; "
                         f"unexpected keys: {unexpected}. {hint}")
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where}: shape mismatch for {wrong}. {hint}")
    model.load_state_dict(sd, strict=True)


def load_teacher(cfg: TeacherConfig, image_size: int, patch_size: int) -> tuple[VisionTransformer, str]:
    """Build a teacher and load its weights strictly.

    Returns the model (eval mode, no gradients) and ``state_dict_sha256`` of its loaded weights.
    """
    if cfg.format == "timm":
        model = _load_timm_pretrained(cfg, image_size, patch_size)
        check_supported_vit(model)
    else:
        where = f"teacher {cfg.name!r} (file {cfg.weights}, format {cfg.format!r})"
        model = build_vit(cfg.arch, cfg.arch_kwargs, image_size, patch_size)
        sd = convert_checkpoint(load_state_dict_file(cfg.weights), cfg.format)
        _fit_pos_embed(sd, model, where)
        load_strict(model, sd, where)
    model.eval().requires_grad_(False)
    return model, state_dict_sha256(model.state_dict())
