"""The typed config: the shipped defaults are the method's, and every bad input is named."""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest

from store_schema.config import (ConfigError, PipelineConfig, TeacherConfig, config_from_dict, dumps_toml,
                                 load_config)
from conftest import PIPELINE_TOML, REPO, tiny_config

DEMO_TOML = REPO / "distill" / "demo" / "demo.toml"


def _error(overrides: list[str], path: Path = PIPELINE_TOML) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_shipped_file_holds_the_method_defaults():
    cfg = load_config(PIPELINE_TOML)
    assert list(cfg.teachers) == ["mae", "mocov3", "ibot"]
    assert {t.arch for t in cfg.teachers.values()} == {"vit_base_patch16_224"}
    assert [t.visible for t in cfg.teachers.values()] == [0.40, 0.55, 0.70]
    assert (cfg.data.image_size, cfg.data.patch_size, cfg.grid_size, cfg.num_patches) == (224, 16, 14, 196)
    assert (cfg.masks.student_visible, cfg.student_tokens) == (0.25, 49)
    assert [cfg.teacher_tokens(t) for t in cfg.teachers] == [78, 108, 137]
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert all((t.mean, t.std) == imagenet for t in cfg.teachers.values())
    assert (cfg.student.mean, cfg.student.std) == imagenet
    assert cfg.student.arch == "vit_tiny_patch16_224"
    assert (cfg.gate.variant, cfg.gate.temperature) == ("joint", 0.1)
    lo = cfg.loss
    assert (lo.token_weight, lo.map_weight, lo.token_temperature, lo.map_temperature) == (1.0, 1.0, 1.0, 1.0)
    o = cfg.optim
    assert (o.betas, o.weight_decay, o.base_lr, o.lr_reference_batch) == ([0.9, 0.95], 0.05, 1.5e-4, 256)
    assert (cfg.eval.knn_k, cfg.eval.knn_temperature) == ([10, 20], 0.07)
    assert (cfg.heads.decoder_depth, cfg.heads.adapter_init, cfg.heads.adapter_trainable) == (2, "cca", False)
    assert (cfg.heads.fusion, cfg.loss.cls_weight) == ("target", 1.0)
    assert (cfg.views.num_views > 1, cfg.views.crop_scale, cfg.store.dtype) == (True, [0.2, 1.0], "float16")
    assert cfg.source == str(PIPELINE_TOML)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "name")]


def test_every_field_is_spelled_out_in_the_shipped_file():
    raw = tomllib.loads(PIPELINE_TOML.read_text())
    hints = typing.get_type_hints(PipelineConfig)
    assert sorted(raw) == sorted(_fields(PipelineConfig))
    for section in _fields(PipelineConfig):
        if section == "teachers":
            for name, table in raw["teachers"].items():
                assert sorted(table) == sorted(_fields(TeacherConfig)), name
        elif dataclasses.is_dataclass(hints[section]):
            assert sorted(raw[section]) == sorted(_fields(hints[section])), section


def test_a_missing_key_is_named():
    raw = tomllib.loads(PIPELINE_TOML.read_text())
    del raw["optim"]["weight_decay"]
    with pytest.raises(ConfigError, match="missing key 'optim.weight_decay'"):
        config_from_dict(raw)
    raw = tomllib.loads(PIPELINE_TOML.read_text())
    del raw["teachers"]["ibot"]["visible"]
    with pytest.raises(ConfigError, match="missing key 'teachers.ibot.visible'"):
        config_from_dict(raw)


@pytest.mark.parametrize("override, named, valid", [
    ("colour=1", "unknown key(s) colour in top level", "valid keys are: seed, data, views"),
    ("data.colour=1", "unknown key(s) data.colour in [data]", "valid keys are: urls, image_size"),
    ("teachers.mae.colour=1", "unknown key(s) teachers.mae.colour in [teachers.mae]", "arch, arch_kwargs, weights"),
])
def test_unknown_keys_are_named_with_the_valid_ones(override, named, valid):
    msg = _error([override])
    assert named in msg and valid in msg


def test_a_teacher_table_cannot_rename_its_teacher():
    assert "rename the table" in _error(['teachers.mae.name="ibot"'])


@pytest.mark.parametrize("override, message", [
    ('data.image_size="224"', "'data.image_size' must be an integer, got '224'"),
    ("data.image_size=abc", "'data.image_size' must be an integer, got 'abc'"),
    ("data.image_size=224.0", "'data.image_size' must be an integer, got 224.0"),
    ("gate.temperature=true", "'gate.temperature' must be a number, got True"),
    ("masks.nested=1", "'masks.nested' must be true or false, got 1"),
    ('data.urls="a.tar"', "'data.urls' must be a list of str, got 'a.tar'"),
    ("views.crop_scale=0.5", "'views.crop_scale' must be a list of float, got 0.5"),
    ('teachers.mae.std=[0.2, "x", 0.2]', "'teachers.mae.std[1]' must be a number, got 'x'"),
    ("seed=[1]", "'seed' must be an integer, got [1]"),
    ("student.arch_kwargs=3", "'student.arch_kwargs' must be an inline table, got 3"),
    ("data=3", "'data' must be a table [data], got int"),
    ("teachers.mae=3", "teachers.mae must be a table"),
])
def test_wrong_types_are_named(override, message):
    assert message in _error([override])


@pytest.mark.parametrize("overrides, message", [
    (["teachers.mae.visible=0.25"], "teachers.mae.visible = 0.25 must be above masks.student_visible = 0.25"),
    (["teachers.ibot.visible=1.5"], "teachers.ibot.visible = 1.5 must be above masks.student_visible = 0.25 and at"),
    (["masks.student_visible=0"], "masks.student_visible = 0.0 must be in (0, 1]"),
    (["data.patch_size=15"], "data.patch_size = 15 does not divide data.image_size = 224"),
    (["views.num_views=0"], "views.num_views = 0: at least one view per image is needed"),
    (["views.crop_scale=[0.9, 0.2]"], "views.crop_scale = [0.9, 0.2] must be [lo, hi] with 0 < lo <= hi <= 1"),
    (["views.crop_scale=[0.0, 1.0]"], "views.crop_scale = [0.0, 1.0] must be [lo, hi]"),
    (["views.crop_scale=[0.2]"], "views.crop_scale = [0.2] must be [lo, hi]"),
    (['gate.variant="max"'], "gate.variant = 'max' is not one of 'joint', 'mean', 'affinity', 'agreement'"),
    (['eval.features=["cls", "pooled"]'], "eval.features = 'pooled' is not one of 'cls', 'mean_patch'"),
    (['teachers.ibot.format="dino"'], "teachers.ibot.format = 'dino' is not one of 'timm', 'mae', 'mocov3', 'ibot'"),
    (["store.shard_samples=100"], "store.shard_samples = 100 must be a positive multiple of store.chunk_samples = 32"),
    (["train.shuffle_window=1000"], "train.shuffle_window = 1000 must be a positive multiple of train.batch_size"),
    # a 2 x 2 grid: the student keeps round(0.25 * 4) = 1 token, MAE round(0.3 * 4) = 1 — not above it
    (["data.image_size=32", "teachers.mae.visible=0.3"],
     "teachers.mae.visible = 0.3 keeps 1 of 4 tokens, not more than the student's 1"),
])
def test_impossible_values_are_named(overrides, message):
    msg = _error(overrides)
    assert message in msg and "invalid configuration" in msg


def test_all_impossible_values_are_listed_at_once():
    msg = _error(["views.num_views=0", 'gate.variant="max"', "store.shard_samples=100"])
    assert "views.num_views" in msg and "gate.variant" in msg and "store.shard_samples" in msg


def test_overrides_of_every_kind():
    cfg = load_config(PIPELINE_TOML, [
        "optim.base_lr=3e-4", "train.steps=10", "gate.variant=mean", 'store.root="s3://bucket/x"',
        "eval.knn_k=[5, 10, 50]", "student.arch_kwargs={embed_dim = 64, depth = 2, num_heads = 2}",
        "heads.decoder_heads=4", "teachers.mocov3.visible=0.6", "masks.nested=true"])
    assert (cfg.optim.base_lr, cfg.train.steps, cfg.gate.variant, cfg.store.root) == (3e-4, 10, "mean", "s3://bucket/x")
    assert cfg.eval.knn_k == [5, 10, 50] and cfg.masks.nested is True
    assert cfg.student.arch_kwargs == {"embed_dim": 64, "depth": 2, "num_heads": 2}
    assert cfg.teachers["mocov3"].visible == 0.6 and cfg.teacher_tokens("mocov3") == 118
    assert "unknown key(s) train.stepz" in _error(["train.stepz=10"])
    assert "must look like section.key=value" in _error(["train.steps"])
    assert "'seed' is not a section" in _error(["seed.x=1"])
    # a new teacher needs a whole table
    assert "missing key 'teachers.dino.arch'" in _error(["teachers.dino.visible=0.5"])


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_dumps_toml_round_trips(tmp_path, which):
    cfg = load_config(PIPELINE_TOML) if which == "shipped" else tiny_config(tmp_path, [
        'train.run_dir="runs/a \\"quoted\\" \\\\ dir ü"', "optim.min_lr=1e-12", "masks.nested=true"])
    path = tmp_path / "resolved.toml"
    path.write_text(dumps_toml(cfg), encoding="utf-8")
    again = load_config(path)
    assert again == cfg and dumps_toml(again) == dumps_toml(cfg)


def test_dumps_toml_escapes_control_characters(tmp_path):
    cfg = tiny_config(tmp_path, ['train.run_dir="runs/a\\nb"'])
    path = tmp_path / "resolved.toml"
    path.write_text(dumps_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_missing_and_invalid_files_are_named(tmp_path):
    assert "not found" in _error([], tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 0\n[data\nurls = 1\n")
    msg = _error([], bad)
    assert str(bad) in msg and "not valid TOML" in msg


def test_demo_config_loads():
    if not DEMO_TOML.exists():
        pytest.skip(f"{DEMO_TOML} does not exist yet")
    cfg = load_config(DEMO_TOML)
    assert cfg.student_tokens < min(cfg.teacher_tokens(t) for t in cfg.teachers)
    assert load_config(DEMO_TOML) == cfg


def test_a_config_saved_by_an_older_store_loads_with_the_behaviour_it_had():
    from store_schema.config import ADDED_KEYS, stored_config
    raw = tomllib.loads(PIPELINE_TOML.read_text())
    for dotted in ADDED_KEYS:  # every entry names a real key (a typo would add nothing)
        section, key = dotted.split(".")
        assert key in raw[section], dotted
        del raw[section][key]
    with pytest.raises(ConfigError, match="missing key"):
        config_from_dict(raw, "old store")  # a config a user writes must still name every key
    cfg = stored_config(raw, "old store")
    assert (cfg.gate.prior, cfg.gate.prior_power) == ("none", 1.0)
    assert (cfg.heads.adapter_init, cfg.loss.cls_weight) == ("pca", 0.0)
    assert cfg.eval.crop_fraction == 1.0 and "prior_power" not in raw["gate"]  # the caller's dict is not changed
