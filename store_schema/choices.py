"""Every set of allowed config values, defined once, and the one rule for a temperature.

`config.CHOICES` (what `pipeline.toml` accepts) is built from these tuples, and the code that acts on a
value imports the same tuple (the gate its variants, evaluation its features, teacher loading its
checkpoint formats, the store codec its dtypes and compressions), so adding a value touches one line
here. This module imports nothing: the config, the store and both stages can all import it.
"""
from __future__ import annotations

import math

INTERPOLATIONS = ("bilinear", "bicubic")  # views.interpolation: PIL resampling of the random-resized crops
CHECKPOINT_FORMATS = ("mae", "mocov3", "ibot", "state_dict")  # local checkpoint files (vit_layers/checkpoints.py)
TEACHER_FORMATS = ("timm", *CHECKPOINT_FORMATS)  # teachers.<name>.format: "timm" downloads a tag
FEATURE_DTYPES = ("float32", "float16", "int8")  # store.dtype (store_schema/codec.py)
COMPRESSIONS = ("zstd", "blosc", "none")  # store.compression (store_schema/codec.py)
TEACHER_PRECISIONS = ("float32", "bf16")  # store.teacher_precision: what the teachers compute in (extract/prepare.py)
ADAPTER_INITS = ("cca", "pca", "random")  # heads.adapter_init
FUSIONS = ("target", "loss")  # heads.fusion
COLLAPSE_ACTIONS = ("stop", "warn")  # heads.collapse_action
GATE_VARIANTS = ("joint", "mean", "affinity", "agreement")  # gate.variant (distill/consensus_gate.py)
GATE_PRIORS = ("none", "rankme")  # gate.prior
CLS_FUSIONS = ("mean", "gate")  # loss.cls_fusion: how the CLS term combines the teachers' CLS targets
MIXED_PRECISIONS = ("auto", "bf16", "no")  # train.mixed_precision
TARGET_SOURCES = ("store", "online")  # train.targets
# accelerate's LoggerType names ("all" left out: it would start every tracker that happens to be installed)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
FEATURES = ("cls", "mean_patch")  # eval.features: the student's CLS token, the mean of its patch tokens


def temperature_error(value: object, name: str) -> str | None:
    """The one rule for every softmax temperature (gate τ_g, KL τ and τ', kNN τ): a finite number > 0
    (a bool is not a number). None when `value` passes, else the message, naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"{name} must be a finite number > 0, got {value!r}"
    return None


def check_temperature(value: object, name: str) -> float:
    """`value` as a float when it is a valid temperature (see temperature_error), else ValueError."""
    error = temperature_error(value, name)
    if error is not None:
        raise ValueError(error)
    return float(value)  # type: ignore[arg-type]
