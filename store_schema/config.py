"""The one typed configuration schema of the pipeline.

`pipeline.toml` is parsed with the standard library's TOML reader into the dataclasses below. Every
key is required (the shipped file spells out every number of the method), unknown keys and wrong
types are errors naming the key and the valid choices, and impossible values fail here, before any
work starts. `--set section.key=value` overrides are applied before validation.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store_schema import choices
from store_schema.arch_check import architecture_errors


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and what to do."""


@dataclass(frozen=True)
class DataConfig:
    urls: list[str]  # WebDataset tars: brace patterns, paths, fsspec URLs, or "@file" listing URLs
    image_size: int
    patch_size: int
    batch_size: int  # images per teacher forward
    num_workers: int  # decoding processes per extraction process
    max_failure_fraction: float  # stop the run when more inputs than this are skipped
    max_image_pixels: int  # larger decoded images are refused (decompression-bomb guard)
    threads: int  # extraction's intra-op CPU threads per process; 0 = the cores left after num_workers
    storage_options: dict[str, Any]  # fsspec options for urls (and @lists): endpoint_url, anon, ...


@dataclass(frozen=True)
class ViewsConfig:
    num_views: int
    crop_scale: list[float]
    crop_ratio: list[float]
    hflip_prob: float
    interpolation: str


@dataclass(frozen=True)
class MasksConfig:
    student_visible: float
    nested: bool  # teacher visible sets form a chain V_s ⊆ V_1 ⊆ V_2 ⊆ ... ordered by fraction


@dataclass(frozen=True)
class TeacherConfig:
    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    weights: str  # timm tag when format = "timm", else a local path or fsspec URL of a checkpoint
    format: str
    visible: float
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class StoreConfig:
    root: str
    dtype: str
    teacher_precision: str  # the teachers' forward when writing: float32, or bf16 autocast (fingerprinted)
    compression: str
    compression_level: int
    blosc_block_kib: int  # blosc's block (KiB) when compression = "blosc"; 0 lets blosc choose
    chunk_samples: int  # samples per inner chunk (one view): the unit of a training read
    shard_samples: int  # samples per shard file: the unit of a write, one writer each
    joint_stats_samples: int  # samples (view 0) read back for the cross-teacher statistics; 0 = all
    storage_options: dict[str, Any]  # fsspec options for root (an s3:// endpoint_url, ...)


@dataclass(frozen=True)
class StudentConfig:
    arch: str
    arch_kwargs: dict[str, Any]
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class HeadsConfig:
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_ratio: float
    adapter_init: str  # cca (shared basis) | pca (one basis per teacher) | random
    adapter_trainable: bool
    fusion: str  # target: one gated target | loss: a student head per teacher, gated per-teacher losses
    cca_ridge: float  # ridge on each teacher's covariance, as a fraction of its mean eigenvalue
    collapse_min_std: float  # trainable adapters: a target channel std below this counts as collapse
    collapse_patience: int  # consecutive collapsed steps before collapse_action
    collapse_action: str  # stop | warn


@dataclass(frozen=True)
class GateConfig:
    variant: str
    temperature: float
    prior: str  # none | rankme: each teacher's weight also in proportion to the effective rank of its features
    prior_power: float  # α: the prior enters as π_k^α (1: in proportion to the rank share; larger: sharper)


@dataclass(frozen=True)
class LossConfig:
    token_weight: float
    map_weight: float
    token_temperature: float
    map_temperature: float
    cls_weight: float  # λ_cls: the global (CLS) term
    cls_fusion: str  # mean: one head per teacher, losses averaged | gate: one head, the gate fuses the CLS targets
    standardize_targets: bool


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float  # lr = base_lr * global_batch / lr_reference_batch
    lr_reference_batch: int
    betas: list[float]
    weight_decay: float
    warmup_steps: int
    min_lr: float
    grad_clip: float


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    batch_size: int  # per process
    steps: int
    num_workers: int
    shuffle_window: int  # samples shuffled together in memory; a multiple of batch_size
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    mixed_precision: str
    targets: str
    max_nonfinite_steps: int  # consecutive skipped steps before the run stops
    teachers: list[str]  # distill from these teachers of the store only; empty: all (single-teacher ablations)
    threads: int  # intra-op CPU threads per process (train and eval); 0 = the cores left after num_workers
    trackers: list[str]  # accelerate trackers (metrics, hparams, config, eval accuracies); empty: metrics.jsonl only


@dataclass(frozen=True)
class EvalConfig:
    train_urls: list[str]
    test_urls: list[str]
    batch_size: int
    knn_k: list[int]
    knn_temperature: float
    probe_epochs: int
    probe_lr: float
    probe_weight_decay: float
    probe_batch_size: int
    features: list[str]
    crop_fraction: float  # DINO: resize the shorter side to image_size / crop_fraction, centre-crop
    storage_options: dict[str, Any]  # fsspec options for train_urls / test_urls


@dataclass(frozen=True)
class PipelineConfig:
    seed: int
    data: DataConfig
    views: ViewsConfig
    masks: MasksConfig
    teachers: dict[str, TeacherConfig]
    store: StoreConfig
    student: StudentConfig
    heads: HeadsConfig
    gate: GateConfig
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig
    source: str = field(default="<dict>", compare=False)  # where it was loaded from, for messages

    @property
    def grid_size(self) -> int:
        return self.data.image_size // self.data.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def student_tokens(self) -> int:
        return visible_count(self.masks.student_visible, self.num_patches)

    def teacher_tokens(self, name: str) -> int:
        return visible_count(self.teachers[name].visible, self.num_patches)

    @property
    def distill_teachers(self) -> list[str]:
        """The teachers stage 2 distills from: train.teachers, or every configured teacher."""
        return list(self.train.teachers) or list(self.teachers)


CHOICES: dict[str, tuple[str, ...]] = {  # each set is defined once, in store_schema/choices.py
    "views.interpolation": choices.INTERPOLATIONS,
    "teachers.*.format": choices.TEACHER_FORMATS,
    "store.dtype": choices.FEATURE_DTYPES,
    "store.compression": choices.COMPRESSIONS,
    "store.teacher_precision": choices.TEACHER_PRECISIONS,
    "heads.adapter_init": choices.ADAPTER_INITS,
    "heads.fusion": choices.FUSIONS,
    "heads.collapse_action": choices.COLLAPSE_ACTIONS,
    "gate.variant": choices.GATE_VARIANTS,
    "gate.prior": choices.GATE_PRIORS,
    "loss.cls_fusion": choices.CLS_FUSIONS,
    "train.mixed_precision": choices.MIXED_PRECISIONS,
    "train.targets": choices.TARGET_SOURCES,
    "train.trackers": choices.TRACKERS,
    "eval.features": choices.FEATURES,
}


def visible_count(fraction: float, num_patches: int) -> int:
    """Tokens kept for a visible fraction: round half up, so 0.25 of 196 is exactly 49."""
    return int(math.floor(fraction * num_patches + 0.5))


# ----------------------------------------------------------------------------------------------
# Parsing


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline TOML file, apply `section.key=value` overrides, type-check and validate."""
    raw = read_toml(path, "config file", "pass --config pipeline.toml (the shipped default)")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def read_toml(path: str | Path, what: str, advice: str = "") -> dict[str, Any]:
    """A TOML file as a dict; a missing file or invalid TOML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found" + (f"; {advice}" if advice else ""))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is read as TOML, else as a bare string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if len(keys) < 1 or not all(keys):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            if k in node:
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            nxt = node[k] = {}  # the unknown-key check below names it
        node = nxt
    node[keys[-1]] = value


# Keys added after the first store format, with the value that reproduces the behaviour before them. A
# config saved with an older store lacks them; `stored_config` fills them in, so such a store still
# validates (a config the user writes must still name every key). Add a key here when you add it above.
ADDED_KEYS: dict[str, Any] = {
    "data.threads": 0, "data.storage_options": {}, "store.storage_options": {}, "store.joint_stats_samples": 4096,
    "store.blosc_block_kib": 0, "store.teacher_precision": "float32",
    "heads.adapter_init": "pca", "heads.fusion": "target", "heads.cca_ridge": 0.01, "heads.collapse_min_std": 0.1,
    "heads.collapse_patience": 20, "heads.collapse_action": "stop", "gate.prior": "none", "gate.prior_power": 1.0,
    "loss.cls_weight": 0.0, "loss.cls_fusion": "mean", "train.threads": 0, "train.trackers": [],
    "eval.storage_options": {}, "eval.crop_fraction": 1.0,
}


def stored_config(raw: dict[str, Any], source: str) -> PipelineConfig:
    """A config saved with a store (its root metadata), written by this or an earlier version."""
    raw = copy.deepcopy(raw)
    for dotted, value in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict):
            raw[section].setdefault(key, copy.deepcopy(value))
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    raw = dict(raw)
    teachers_raw = raw.pop("teachers", None)
    if not isinstance(teachers_raw, dict) or not teachers_raw:
        raise ConfigError(f"{source}: [teachers.<name>] tables are required (at least one teacher)")
    teachers = {}
    for name, table in teachers_raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: teachers.{name} must be a table")
        if "name" in table:
            raise ConfigError(f"{source}: teachers.{name}.name is not a key: a teacher's name is its table name "
                              f"[teachers.{name}]; rename the table instead")
        teachers[name] = _build(TeacherConfig, {"name": name, **table}, f"teachers.{name}", source)
    top = {k: v for k, v in raw.items()}
    top["teachers"] = teachers
    cfg = _build(PipelineConfig, top, "", source, skip={"teachers", "source"})
    cfg = dataclasses.replace(cfg, source=source)
    validate(cfg)
    return cfg


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str, skip: set[str] = frozenset()) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"[{prefix}]" if prefix else "top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(_dot(prefix, k) for k in unknown)} in {where}; "
            f"valid keys are: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        key = _dot(prefix, name)
        if name not in raw:
            raise ConfigError(f"{source}: missing key {key!r} (see the shipped pipeline.toml for its meaning)")
        value = raw[name]
        if name in skip:
            kwargs[name] = value
            continue
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _dot(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be a table [{key}], got {type(value).__name__}")
        return _build(hint, value, key, source)
    if hint is Any:
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key!r} must be a list of {item_hint.__name__}, got {value!r}")
        return [_coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be an inline table, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key!r} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a schema bug, not a user error


# ----------------------------------------------------------------------------------------------
# Validation: impossible values fail at load time


_Check = typing.Callable[[bool, str], None]  # check(ok, msg): records msg unless ok


def validate(cfg: PipelineConfig) -> None:
    """Raise ConfigError listing every invalid value of cfg, in the order the checkers below run."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    for checker in (_check_choices, _check_data, _check_views, _check_masks_and_teachers, _check_store,
                    _check_heads_gate_loss, _check_optim, _check_train, _check_eval, _check_ranges):
        checker(cfg, check)
    if not errors:  # the architecture checks build models: only from values that passed the checks above
        errors += architecture_errors(cfg)
    if errors:
        raise ConfigError(f"{cfg.source}: invalid configuration:\n  - " + "\n  - ".join(errors))


def _check_choices(cfg: PipelineConfig, check: _Check) -> None:
    """Every string option (CHOICES) holds one of its allowed values."""
    for key, allowed in CHOICES.items():
        section, _, name = key.partition(".")
        if section == "teachers":
            values = [(f"teachers.{t}.format", tc.format) for t, tc in cfg.teachers.items()]
        else:
            v = getattr(getattr(cfg, section), name)
            values = [(key, x) for x in v] if isinstance(v, list) else [(key, v)]
        for k, v in values:
            check(v in allowed, f"{k} = {v!r} is not one of {', '.join(map(repr, allowed))}")


def _check_data(cfg: PipelineConfig, check: _Check) -> None:
    d = cfg.data
    check(d.image_size > 0 and d.patch_size > 0, "data.image_size and data.patch_size must be positive")
    check(d.patch_size > 0 and d.image_size % d.patch_size == 0,
          f"data.patch_size = {d.patch_size} does not divide data.image_size = {d.image_size}")
    check(d.batch_size >= 1, "data.batch_size must be >= 1")
    check(d.num_workers >= 0, "data.num_workers must be >= 0")
    check(0.0 <= d.max_failure_fraction <= 1.0, "data.max_failure_fraction must be in [0, 1]")
    check(d.max_image_pixels > 0, "data.max_image_pixels must be positive")
    check(len(d.urls) > 0, "data.urls is empty: list the input WebDataset tars")


def _check_views(cfg: PipelineConfig, check: _Check) -> None:
    v = cfg.views
    check(v.num_views >= 1, f"views.num_views = {v.num_views}: at least one view per image is needed")
    check(len(v.crop_scale) == 2 and 0 < v.crop_scale[0] <= v.crop_scale[1] <= 1,
          f"views.crop_scale = {v.crop_scale} must be [lo, hi] with 0 < lo <= hi <= 1")
    check(len(v.crop_ratio) == 2 and 0 < v.crop_ratio[0] <= v.crop_ratio[1],
          f"views.crop_ratio = {v.crop_ratio} must be [lo, hi] with 0 < lo <= hi")
    check(0.0 <= v.hflip_prob <= 1.0, "views.hflip_prob must be in [0, 1]")


def _check_masks_and_teachers(cfg: PipelineConfig, check: _Check) -> None:
    """Visible fractions (student below every teacher, each keeping tokens), normalisation, weights."""
    d, m = cfg.data, cfg.masks
    n = cfg.num_patches if d.patch_size > 0 and d.image_size % d.patch_size == 0 else 0
    check(0 < m.student_visible <= 1, f"masks.student_visible = {m.student_visible} must be in (0, 1]")
    if n and math.isfinite(m.student_visible):  # NaN/inf is reported below; visible_count cannot take it
        check(cfg.student_tokens >= 1, f"masks.student_visible = {m.student_visible} keeps no token of {n}")
    for name, t in cfg.teachers.items():
        check(m.student_visible < t.visible <= 1,
              f"teachers.{name}.visible = {t.visible} must be above masks.student_visible = "
              f"{m.student_visible} and at most 1 (each teacher sees more context than the student)")
        if n and math.isfinite(m.student_visible) and m.student_visible < t.visible <= 1:
            check(cfg.teacher_tokens(name) > cfg.student_tokens,
                  f"teachers.{name}.visible = {t.visible} keeps {cfg.teacher_tokens(name)} of {n} tokens, "
                  f"not more than the student's {cfg.student_tokens}: raise it or use a finer patch grid")
        check(len(t.mean) == 3 and len(t.std) == 3 and all(s > 0 for s in t.std),
              f"teachers.{name}.mean/std must be 3 numbers each, std > 0")
        check(t.format == "timm" or bool(t.weights), f"teachers.{name}.weights must name a checkpoint file")
    s = cfg.student
    check(len(s.mean) == 3 and len(s.std) == 3 and all(x > 0 for x in s.std),
          "student.mean/std must be 3 numbers each, std > 0")


def _check_store(cfg: PipelineConfig, check: _Check) -> None:
    st = cfg.store
    check(st.chunk_samples >= 1, "store.chunk_samples must be >= 1")
    check(st.shard_samples >= 1 and st.chunk_samples >= 1 and st.shard_samples % st.chunk_samples == 0,
          f"store.shard_samples = {st.shard_samples} must be a positive multiple of store.chunk_samples = "
          f"{st.chunk_samples}")
    check(st.compression_level >= 0, "store.compression_level must be >= 0")
    check(st.joint_stats_samples >= 0, "store.joint_stats_samples must be >= 0 (0 = every sample)")


def _check_heads_gate_loss(cfg: PipelineConfig, check: _Check) -> None:
    """Heads, then every softmax temperature (gate, loss, eval), then the loss weights."""
    h = cfg.heads
    check(h.decoder_depth >= 0 and h.decoder_heads >= 1, "heads.decoder_depth >= 0 and heads.decoder_heads >= 1")
    check(math.isfinite(h.cca_ridge) and h.cca_ridge >= 0, f"heads.cca_ridge = {h.cca_ridge} must be >= 0")
    check(math.isfinite(h.collapse_min_std) and h.collapse_min_std >= 0,
          f"heads.collapse_min_std = {h.collapse_min_std} must be >= 0 (0 disables the collapse check)")
    check(h.collapse_patience >= 1, f"heads.collapse_patience = {h.collapse_patience} must be >= 1")
    for key, tau in (("gate.temperature", cfg.gate.temperature), ("loss.token_temperature", cfg.loss.token_temperature),
                     ("loss.map_temperature", cfg.loss.map_temperature),
                     ("eval.knn_temperature", cfg.eval.knn_temperature)):
        e = choices.temperature_error(tau, key)
        check(not e, e)
    lo = cfg.loss
    check(lo.token_weight >= 0 and lo.map_weight >= 0 and lo.token_weight + lo.map_weight > 0,
          "loss.token_weight and loss.map_weight must be >= 0 and not both 0")
    check(math.isfinite(lo.cls_weight) and lo.cls_weight >= 0, f"loss.cls_weight = {lo.cls_weight} must be >= 0")


def _check_optim(cfg: PipelineConfig, check: _Check) -> None:
    o = cfg.optim
    check(o.base_lr > 0 and o.lr_reference_batch >= 1, "optim.base_lr > 0 and optim.lr_reference_batch >= 1")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)")
    check(o.weight_decay >= 0 and o.warmup_steps >= 0 and o.min_lr >= 0 and o.grad_clip >= 0,
          "optim.weight_decay, warmup_steps, min_lr, grad_clip must be >= 0 (grad_clip 0 disables clipping)")


def _check_train(cfg: PipelineConfig, check: _Check) -> None:
    tr = cfg.train
    check(tr.batch_size >= 1 and tr.steps >= 1, "train.batch_size and train.steps must be >= 1")
    check(tr.num_workers >= 0, "train.num_workers must be >= 0")
    check(tr.shuffle_window >= tr.batch_size >= 1 and tr.shuffle_window % tr.batch_size == 0,
          f"train.shuffle_window = {tr.shuffle_window} must be a positive multiple of train.batch_size = "
          f"{tr.batch_size}")
    check(tr.checkpoint_every >= 1 and tr.keep_checkpoints >= 1 and tr.log_every >= 1,
          "train.checkpoint_every, keep_checkpoints and log_every must be >= 1")
    check(tr.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
    for t in tr.teachers:
        check(t in cfg.teachers, f"train.teachers names {t!r}, which is not a configured teacher; "
                                 f"choose from {', '.join(cfg.teachers)} (or [] for all)")
    check(len(set(tr.teachers)) == len(tr.teachers), "train.teachers lists a teacher twice")


def _check_eval(cfg: PipelineConfig, check: _Check) -> None:
    e = cfg.eval
    check(all(k >= 1 for k in e.knn_k) and len(e.knn_k) > 0, "eval.knn_k must list positive integers")
    check(e.batch_size >= 1 and e.probe_batch_size >= 1 and e.probe_epochs >= 0, "eval batch sizes >= 1")
    check(0 < e.crop_fraction <= 1, f"eval.crop_fraction = {e.crop_fraction} must be in (0, 1] (DINO: 0.875; "
                                    "1 resizes the shorter side straight to data.image_size)")


def _number_ranges(cfg: PipelineConfig) -> dict[str, tuple[float, float]]:
    """Every number has a range, checked here so that nothing passes loading and fails (or silently ruins
    work) later: inf/NaN anywhere, an over-large count that overflows an int64 product, a compression
    level the codec cannot write. (lo, hi): inclusive bounds. One table, so it is long."""
    big = 2**40  # counts (steps, samples, pixels): far above any real run, far below int64 overflow
    ranges: dict[str, tuple[float, float]] = {
        "seed": (0, 2**63 - 1),
        "data.image_size": (1, 8192), "data.patch_size": (1, 8192), "data.batch_size": (1, 2**20),
        "data.num_workers": (0, 1024), "data.threads": (0, 1024), "data.max_failure_fraction": (0, 1),
        "data.max_image_pixels": (1, big),
        "views.num_views": (1, 256), "views.crop_scale": (1e-6, 1), "views.crop_ratio": (1e-3, 1e3),
        "views.hflip_prob": (0, 1), "masks.student_visible": (1e-9, 1),
        "store.compression_level": (0, {"zstd": 22, "blosc": 9}.get(cfg.store.compression, 22)),
        "store.blosc_block_kib": (0, 2**16),
        "store.chunk_samples": (1, 2**20), "store.shard_samples": (1, 2**24),
        "store.joint_stats_samples": (0, big),
        "student.mean": (0, 1), "student.std": (1e-3, 1),  # of pixels scaled to [0, 1]
        "heads.decoder_depth": (0, 64), "heads.decoder_heads": (1, 1024), "heads.decoder_mlp_ratio": (1e-3, 64),
        "heads.cca_ridge": (0, 1e6), "heads.collapse_min_std": (0, 1e6), "heads.collapse_patience": (1, big),
        "gate.temperature": (1e-6, 1e6), "gate.prior_power": (1e-3, 100),
        "loss.token_weight": (0, 1e6), "loss.map_weight": (0, 1e6), "loss.cls_weight": (0, 1e6),
        "loss.token_temperature": (1e-6, 1e6), "loss.map_temperature": (1e-6, 1e6),
        "optim.base_lr": (1e-12, 1e3), "optim.lr_reference_batch": (1, 2**30), "optim.betas": (0, 0.999999),
        "optim.weight_decay": (0, 1e3), "optim.warmup_steps": (0, big), "optim.min_lr": (0, 1e3),
        "optim.grad_clip": (0, 1e9),
        "train.batch_size": (1, 2**20), "train.steps": (1, big), "train.num_workers": (0, 1024),
        "train.threads": (0, 1024),
        "train.shuffle_window": (1, 2**30), "train.checkpoint_every": (1, big), "train.keep_checkpoints": (1, 10**6),
        "train.log_every": (1, big), "train.max_nonfinite_steps": (1, big),
        "eval.batch_size": (1, 2**20), "eval.knn_k": (1, 10**6), "eval.knn_temperature": (1e-6, 1e6),
        "eval.probe_epochs": (0, 10**6), "eval.probe_lr": (1e-12, 1e3), "eval.probe_weight_decay": (0, 1e3),
        "eval.probe_batch_size": (1, 2**24), "eval.crop_fraction": (1e-3, 1),
    }
    for name in cfg.teachers:
        ranges |= {f"teachers.{name}.visible": (1e-9, 1), f"teachers.{name}.mean": (0, 1),
                   f"teachers.{name}.std": (1e-3, 1)}
    return ranges


def _numbers(key: str, value: Any):
    """(key, number) for every number under a config value; bools are not numbers here."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield key, value
    elif isinstance(value, list):
        for i, x in enumerate(value):
            yield from _numbers(f"{key}[{i}]", x)
    elif isinstance(value, dict):
        for k, x in value.items():
            yield from _numbers(f"{key}.{k}", x)


def _check_ranges(cfg: PipelineConfig, check: _Check) -> None:
    """Every number in the config is finite and inside its range from `_number_ranges`."""
    ranges = _number_ranges(cfg)
    found = [("seed", cfg.seed)]
    for sec in ("data", "views", "masks", "store", "student", "heads", "gate", "loss", "optim", "train", "eval"):
        found += [x for f in dataclasses.fields(getattr(cfg, sec))
                  for x in _numbers(f"{sec}.{f.name}", getattr(getattr(cfg, sec), f.name))]
    for name, tc in cfg.teachers.items():
        found += [x for f in dataclasses.fields(tc) for x in _numbers(f"teachers.{name}.{f.name}", getattr(tc, f.name))]
    for key, x in found:
        base = key.split("[")[0]
        if isinstance(x, float) and not math.isfinite(x):
            check(False, f"{key} = {x!r}: every number must be finite")
        elif base in ranges and not ranges[base][0] <= x <= ranges[base][1]:
            lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in ranges[base])
            extra = f" with store.compression = {cfg.store.compression!r}" if base == "store.compression_level" else ""
            check(False, f"{key} = {x!r} is outside its range [{lo}, {hi}]{extra}")


# ----------------------------------------------------------------------------------------------
# Saving: the resolved config travels with every store and run


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as plain data, as it is saved (store attributes, run_dir/config.toml): secret-looking
    storage options (secret, token, password, key, ...) are replaced by "<redacted>"."""
    from .storage import redact  # here: storage imports fsspec, which config users need not load
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    for sec in ("data", "store", "eval"):
        out[sec]["storage_options"] = redact(out[sec]["storage_options"])
    for t in out["teachers"].values():
        t.pop("name")
    return out


def dumps_toml(cfg: PipelineConfig) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal config."""
    d = config_to_dict(cfg)
    lines = [f"seed = {_toml_value(d.pop('seed'))}", ""]
    teachers = d.pop("teachers")
    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
        if section == "masks":
            for name, t in teachers.items():
                lines.append(f"[teachers.{name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
                lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")

