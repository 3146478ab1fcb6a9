"""Strict teacher loading from every official checkpoint layout, safely and reproducibly."""
from __future__ import annotations

import pathlib
import warnings

import pytest
import timm
import torch

from store_schema.config import TeacherConfig
from vit_layers.checkpoint_writers import save_in_official_format
from vit_layers.checkpoints import (
    build_vit,
    convert_checkpoint,
    load_state_dict_file,
    load_teacher,
    state_dict_sha256,
)
from vit_layers.forward import forward_visible

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2
ARCH = "vit_tiny_patch16_224"
KW = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def source_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_vit(ARCH, KW, IMG, PATCH).eval()
    with torch.no_grad():  # non-default values everywhere so a skipped key would show
        model.pos_embed.normal_(std=0.5)
        model.cls_token.normal_(std=0.5)
        model.norm.weight.normal_()
    return model


def cfg_for(path, fmt: str, weights: str | None = None) -> TeacherConfig:
    return TeacherConfig(name="t", arch=ARCH, arch_kwargs=dict(KW), weights=weights or str(path), format=fmt,
                         visible=0.5, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


CASES = [  # (format, full, file name)
    ("mae", False, "mae_pretrain_vit_base.pth"),
    ("mae", True, "mae_visualize_vit_base.pth"),
    ("mocov3", False, "vit-b-300ep.pth.tar"),
    ("ibot", False, "checkpoint_teacher.pth"),
    ("ibot", True, "checkpoint.pth"),
    ("state_dict", False, "vit.pth"),
    ("state_dict", False, "vit.safetensors"),
]


@pytest.mark.parametrize("fmt, full, name", CASES, ids=[c[2] for c in CASES])
@torch.no_grad()
def test_official_format_round_trip(tmp_path, fmt, full, name):
    src = source_model()
    path = tmp_path / name
    save_in_official_format(src.state_dict(), str(path), fmt, full=full)
    model, sha = load_teacher(cfg_for(path, fmt), IMG, PATCH)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sha == state_dict_sha256(src.state_dict())
    imgs = torch.randn(2, 3, IMG, IMG)
    keep = torch.argsort(torch.rand(2, N), dim=1)[:, :7]
    for a, b in zip(forward_visible(model, imgs, keep), forward_visible(src, imgs, keep)):
        assert torch.equal(a, b)


def test_files_keep_their_official_extras(tmp_path):
    # The fake files must really hold the parts the converters drop, else the round trip is trivial.
    sd = source_model().state_dict()
    raw = {}
    for fmt, full, name in CASES[:5]:
        save_in_official_format(sd, str(tmp_path / name), fmt, full=full)
        raw[name] = load_state_dict_file(str(tmp_path / name))
    assert "decoder_pred.weight" in raw["mae_visualize_vit_base.pth"]["model"]
    moco = raw["vit-b-300ep.pth.tar"]["state_dict"]
    assert {"module.base_encoder.head.0.weight", "module.momentum_encoder.cls_token",
            "module.predictor.0.weight"} <= set(moco)
    full = raw["checkpoint.pth"]
    assert "head.last_layer.weight_g" in full["teacher"] and "args" in full
    assert "module.backbone.masked_embed" in full["student"]


def test_ibot_masked_embed_and_module_prefix_are_accepted():
    sd = source_model().state_dict()
    obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()} | {"module.masked_embed": torch.zeros(1, 64)}}
    out = convert_checkpoint(obj, "ibot")
    assert set(out) == set(sd)


def _save_plain(tmp_path, sd) -> pathlib.Path:
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    return path


def test_missing_backbone_key_is_named(tmp_path):
    sd = source_model().state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    path = _save_plain(tmp_path, {"model": sd})
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.1.attn.qkv.weight'\]") as e:
        load_teacher(cfg_for(path, "mae"), IMG, PATCH)
    assert str(path) in str(e.value) and "'mae'" in str(e.value)


@pytest.mark.parametrize("fmt, wrap, extra", [
    ("mae", lambda sd: {"model": sd}, "blocks.2.norm1.weight"),
    ("state_dict", lambda sd: sd, "fc_norm.weight"),
    ("ibot", lambda sd: {"state_dict": sd}, "blocks.0.attn.q_norm.weight"),
    ("mocov3", lambda sd: {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}},
     "blocks.0.ls1.gamma"),
])
def test_unexpected_backbone_key_is_named(tmp_path, fmt, wrap, extra):
    sd = source_model().state_dict()
    sd[extra] = torch.ones(64)
    path = _save_plain(tmp_path, wrap(sd))
    with pytest.raises(ValueError, match=rf"unexpected keys: \['{extra}'\]"):
        load_teacher(cfg_for(path, fmt), IMG, PATCH)


def test_unknown_key_outside_documented_extras_is_not_dropped():
    # A MoCo key that is neither base_encoder, momentum_encoder nor predictor survives conversion.
    sd = source_model().state_dict()
    obj = {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()} | {"module.queue": torch.zeros(3)}}
    assert "queue" in convert_checkpoint(obj, "mocov3")


def test_shape_mismatch_is_a_clear_error(tmp_path):
    sd = build_vit(ARCH, dict(KW, embed_dim=32), IMG, PATCH).state_dict()
    path = _save_plain(tmp_path, sd)
    with pytest.raises(ValueError, match="shape mismatch.*cls_token"):
        load_teacher(cfg_for(path, "state_dict"), IMG, PATCH)


def test_wrong_format_names_the_expected_key(tmp_path):
    path = _save_plain(tmp_path, source_model().state_dict())
    with pytest.raises(ValueError, match="expected top-level key 'model'"):
        load_teacher(cfg_for(path, "mae"), IMG, PATCH)


class _Evil:
    """Unpickling this touches a marker file: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": source_model().state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="pickled Python objects") as e:
        load_teacher(cfg_for(path, "mae"), IMG, PATCH)
    assert str(path) in str(e.value)
    assert not marker.exists()
    # Control: an unsafe load of the same file does run the payload, so the check above is meaningful.
    torch.load(path, weights_only=False)
    assert marker.exists()


@torch.no_grad()
def test_checkpoint_pos_embed_is_kept(tmp_path):
    sd = source_model().state_dict()
    sd["pos_embed"] = torch.arange(sd["pos_embed"].numel(), dtype=torch.float32).reshape(sd["pos_embed"].shape)
    path = tmp_path / "mae.pth"
    save_in_official_format(sd, str(path), "mae")
    model, _ = load_teacher(cfg_for(path, "mae"), IMG, PATCH)
    assert torch.equal(model.pos_embed, sd["pos_embed"])


@torch.no_grad()
def test_pos_embed_of_another_grid_is_resampled_with_warning(tmp_path):
    src = source_model()  # 4x4 grid
    path = tmp_path / "mae.pth"
    save_in_official_format(src.state_dict(), str(path), "mae")
    with pytest.warns(UserWarning, match="resampling the checkpoint's pos_embed"):
        model, _ = load_teacher(cfg_for(path, "mae"), 48, PATCH)  # 6x6 grid
    expected = timm.layers.resample_abs_pos_embed(src.pos_embed, new_size=[6, 6], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS position untouched


def test_no_warning_when_grid_matches(tmp_path):
    path = tmp_path / "mae.pth"
    save_in_official_format(source_model().state_dict(), str(path), "mae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_teacher(cfg_for(path, "mae"), IMG, PATCH)


def test_sha256_is_deterministic_and_sensitive():
    sd = source_model().state_dict()
    base = state_dict_sha256(sd)
    assert base == state_dict_sha256({k: v.clone() for k, v in reversed(list(sd.items()))})
    changed = {k: v.clone() for k, v in sd.items()}
    changed["blocks.1.mlp.fc2.bias"][3] += 1e-3
    assert state_dict_sha256(changed) != base
    assert state_dict_sha256({k: v.half() for k, v in sd.items()}) != base  # dtype is part of the hash
    renamed = dict(sd)
    renamed["norm.bias2"] = renamed.pop("norm.bias")
    assert state_dict_sha256(renamed) != base


def test_timm_format_without_network_gives_actionable_error(monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_for("", "timm", weights="vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(RuntimeError, match='download the official checkpoint and set format = "mae"'):
        load_teacher(cfg, IMG, PATCH)


def test_timm_tag_of_another_arch_is_refused():
    cfg = cfg_for("", "timm", weights="vit_base_patch16_224.mae")
    with pytest.raises(ValueError, match="is not a tag of arch"):
        load_teacher(cfg, IMG, PATCH)


@pytest.mark.parametrize("name", ["vit.pth", "vit.safetensors"])
@torch.no_grad()
def test_fsspec_url_is_read(tmp_path, name):
    import fsspec

    src = source_model()
    local = tmp_path / name
    save_in_official_format(src.state_dict(), str(local), "state_dict")
    url = f"memory://teachers-test/{name}"
    with fsspec.open(url, "wb") as f:
        f.write(local.read_bytes())
    try:
        _, sha = load_teacher(cfg_for(url, "state_dict"), IMG, PATCH)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert sha == state_dict_sha256(src.state_dict())
