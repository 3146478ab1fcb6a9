"""Export the trained student alone as a timm model directory: model.safetensors, config.json, README.md.

A trainer checkpoint (`run_dir/checkpoints/step_XXXXXXXX/`) holds the whole distiller state dict in
model.safetensors; the student's weights are the keys under `student.`. The projector, decoder and
adapters exist only for training and are dropped (stage 2's output is the student alone). The directory
is timm's Hugging Face Hub layout (what `timm.models.push_to_hf_hub` uploads), so it loads as it is, with
the trained input size and normalisation in its `pretrained_cfg`:

    model = timm.create_model("local-dir:<export dir>", pretrained=True)
    data_cfg = timm.data.resolve_data_config(model=model)    # input_size, mean/std, crop_pct as trained
    transform = timm.data.create_transform(**data_cfg)        # the eval protocol's transform

and, uploaded unchanged (`huggingface_hub.upload_folder(repo_id=..., folder_path=<export dir>)`), as
`timm.create_model("hf-hub:<user>/<repo>", pretrained=True)`. Not `pretrained_cfg_overlay=dict(file=...)`
on the arch name: that keeps the arch's default pretrained_cfg (224 px, other mean/std).

config.json is written here rather than by timm's `save_config_for_hf`: that one starts from the arch's
default pretrained_cfg and keeps its `tag` and `license` (e.g. augreg_in21k_ft_in1k, apache-2.0), which
describe other weights. The layout is the same (`architecture`, `num_classes`, `model_args`,
`pretrained_cfg`), and num_classes = 0 appears in both places: when it differs from the model's, timm
silently switches to a non-strict load. README.md is timm's own model card (`generate_readme`).

The student's fixed sin-cos `pos_embed` is saved as the plain tensor it is; timm resamples it only when
the grid differs, which it never does for the recorded img_size / patch_size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import timm  # load_export builds the model the documented user way, so tests and evaluation use exactly it
from safetensors import SafetensorError
from timm.models._hub import generate_readme
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from distill.student import build_student
from store_schema.config import PipelineConfig, load_config
from vit_layers.checkpoints import load_strict

STUDENT_PREFIX = "student."
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


# ----------------------------------------------------------------------------------------------
# Reading trainer checkpoints


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory -> its latest complete checkpoint.

    A checkpoint is complete when its meta.json exists (the trainer writes it last).
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() or (path / META_FILE).is_file():
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete (no {META_FILE}: the run stopped while "
                                    f"saving it); use an earlier step_* directory")
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {WEIGHTS_FILE}")
        return path
    steps = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / META_FILE).is_file())
    if not steps:
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (with {WEIGHTS_FILE} and {META_FILE}) "
                                f"nor a run directory with complete checkpoints under checkpoints/step_*")
    return steps[-1]  # zero-padded step numbers: lexical order is step order


def run_dir_of(checkpoint_dir: Path) -> Path:
    """run_dir for run_dir/checkpoints/step_X; the checkpoint's parent otherwise."""
    parent = checkpoint_dir.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def check_run_config(cfg: PipelineConfig, checkpoint_dir: Path) -> None:
    """Refuse a config whose student differs from the one the run trained (its run_dir/config.toml)."""
    saved = run_dir_of(checkpoint_dir) / "config.toml"
    if not saved.is_file():
        return  # a checkpoint copied out of its run: the strict load still checks every shape
    run_cfg = load_config(saved)
    ours = (cfg.student.arch, cfg.student.arch_kwargs, cfg.data.image_size, cfg.data.patch_size)
    theirs = (run_cfg.student.arch, run_cfg.student.arch_kwargs, run_cfg.data.image_size, run_cfg.data.patch_size)
    if ours != theirs:
        raise ValueError(f"--config describes the student as (arch, arch_kwargs, image_size, patch_size) = {ours}, "
                         f"but the run that wrote {checkpoint_dir} trained {theirs} ({saved}); "
                         f"pass --config {saved}")


def check_safetensors(path: str | Path) -> None:
    """Refuse, by name, a weights file that is not safetensors (e.g. a pickle, which is never unpickled)."""
    try:
        with safetensors.safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise ValueError(f"refusing to load {path}: it is not a safetensors file ({e}); it is never read as a "
                         f"pickle. Use a checkpoint or export written by comad-distill") from e


def student_state_dict(checkpoint_dir: str | Path) -> dict[str, Tensor]:
    """The `student.`-prefixed tensors of a checkpoint's model.safetensors, prefix stripped."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    check_safetensors(path)
    full = safetensors.torch.load_file(str(path), device="cpu")
    sd = {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not sd:
        raise ValueError(f"{path} holds no '{STUDENT_PREFIX}*' keys (found e.g. {sorted(full)[:5]}); "
                         f"it is not a CoMAD distiller checkpoint")
    return sd


def load_student_strict(model: VisionTransformer, sd: dict[str, Tensor], where: str) -> VisionTransformer:
    """Load every key of a freshly built student, with an error naming missing/extra/misshaped keys."""
    load_strict(model, sd, where, hint="Check student.arch/arch_kwargs and data.image_size/patch_size against "
                                       "the run's config.toml.")
    return model


def load_student_from_checkpoint(cfg: PipelineConfig, checkpoint_dir: str | Path) -> VisionTransformer:
    """Build the configured student and load a trainer checkpoint's student weights into it (eval mode)."""
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    check_run_config(cfg, checkpoint_dir)
    model = build_student(cfg.student, cfg.data.image_size, cfg.data.patch_size)
    load_student_strict(model, student_state_dict(checkpoint_dir), f"checkpoint {checkpoint_dir}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Export


def export_config(cfg: PipelineConfig, model: VisionTransformer, source: str) -> dict[str, Any]:
    """config.json in the layout timm's `save_for_hf` writes (and `local-dir:` reads), plus a usage note."""
    s, p = cfg.data.image_size, cfg.data.patch_size
    model_args = {"img_size": s, "patch_size": p, **cfg.student.arch_kwargs}
    kwargs_text = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    return {
        "architecture": cfg.student.arch,
        "num_classes": 0,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "num_classes": 0,
            "input_size": [3, s, s],
            "fixed_input_size": True,
            # the transform distill.evaluate uses: resize the shorter side to S / crop_pct, centre-crop S
            "interpolation": "bicubic",
            "crop_pct": cfg.eval.crop_fraction,
            "crop_mode": "center",
            "mean": list(cfg.student.mean),
            "std": list(cfg.student.std),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "comad": {
            "arch": cfg.student.arch,
            "img_size": s,
            "patch_size": p,
            "arch_kwargs": dict(cfg.student.arch_kwargs),
            "mean": list(cfg.student.mean),
            "std": list(cfg.student.std),
            "pos_embed": "fixed 2-D sin-cos (MAE layout, CLS slot zeros), stored as a tensor",
            "source_checkpoint": source,
            "load": "timm.create_model('local-dir:<this dir>', pretrained=True)",
            "load_by_arch": (f"timm.create_model({cfg.student.arch!r}, pretrained=True, num_classes=0, {kwargs_text}, "
                             f"pretrained_cfg_overlay=dict(file='<this dir>/{WEIGHTS_FILE}', num_classes=0)) "
                             "(weights only: pretrained_cfg stays the arch's default)"),
        },
    }


def load_lines(out_dir: str | Path) -> str:
    """The Python lines that load an export and its data config with timm (printed, and in README.md)."""
    return (f"import timm\n"
            f"model = timm.create_model(\"local-dir:{out_dir}\", pretrained=True).eval()\n"
            f"data_cfg = timm.data.resolve_data_config(model=model)  # trained input size, mean/std, crop_pct\n"
            f"transform = timm.data.create_transform(**data_cfg)\n"
            f"features = model.forward_features(transform(image).unsqueeze(0))  # (1, 1 + tokens, width)")


def model_card(cfg: PipelineConfig, source: str) -> str:
    """README.md for the Hub: timm's model card generator, with the usage lines and the training facts."""
    card = {
        "tags": ["image-feature-extraction", "timm", "comad", "knowledge-distillation"],
        "license": "other",  # the student inherits whatever the data and teachers allow; the user decides
        "description": (f"A {cfg.student.arch} student distilled with CoMAD from the teachers "
                        f"{', '.join(cfg.distill_teachers)} (headless: num_classes = 0)."),
        "details": {"Model Type": "Image feature backbone", "Image size": f"{cfg.data.image_size} x "
                    f"{cfg.data.image_size}", "Patch size": cfg.data.patch_size,
                    "Normalisation": f"mean {list(cfg.student.mean)}, std {list(cfg.student.std)}",
                    "Distillation steps": cfg.train.steps, "Source checkpoint": source},
        "usage": "```python\n" + load_lines("<this dir>").replace('"local-dir:<this dir>"',
                                                                  '"hf-hub:<user>/<repo>"') + "\n```\n"
                 "From a local copy: `timm.create_model(\"local-dir:<this dir>\", pretrained=True)`.\n",
    }
    return generate_readme(card, f"{cfg.student.arch}.comad", task_name="image-feature-extraction")


def export_student(cfg: PipelineConfig, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the student of a trainer checkpoint to out_dir/model.safetensors + out_dir/config.json.

    `checkpoint_dir` may also be a run directory (its latest complete checkpoint is used). The saved
    keys are exactly the student's timm state dict (no projector/decoder/adapter keys). Returns out_dir.
    """
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    model = load_student_from_checkpoint(cfg, checkpoint_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and views of a bigger buffer save it whole
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "architecture": cfg.student.arch, "source_checkpoint": str(checkpoint_dir)}
    safetensors.torch.save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=meta)
    config = export_config(cfg, model, str(checkpoint_dir))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(model_card(cfg, str(checkpoint_dir)), encoding="utf-8")
    return out_dir


def load_export(out_dir: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load an export by arch + weights file (strict); returns (model in eval mode, its config.json).

    The data config comes from config.json here; a timm user gets the same from `local-dir:`."""
    out_dir = Path(out_dir)
    cfg_path, weights = out_dir / "config.json", out_dir / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{out_dir} is not a student export (needs config.json and {WEIGHTS_FILE}); "
                                f"write one with `comad-distill export`")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    check_safetensors(weights)  # timm would raise its bare SafetensorError, naming no file
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=0),
                              **config["model_args"])
    return model.eval(), config


def main_export(args: Any) -> Path:
    """CLI: `comad-distill export --config X [--set ..] --checkpoint DIR --out DIR`."""
    cfg = load_config(args.config, list(args.set or []))
    out = export_student(cfg, args.checkpoint, args.out)
    print(f"exported the student of {resolve_checkpoint_dir(args.checkpoint)} to {out} (timm Hub layout); load it "
          f"with:\n{load_lines(Path(out).resolve())}")
    return out
