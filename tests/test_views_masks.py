"""Seeded views and masks: determinism, sizes, subset/chain properties, uniformity, torchvision parity."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from extract.masks import chain_order, derive_seed, draw_masks, generator_for
from extract.views import ViewParams, apply_view, draw_view, sample_view
from store_schema.config import PipelineConfig, load_config
from wds_fixtures import make_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return load_config(ROOT / "pipeline.toml")


def with_teachers(cfg: PipelineConfig, names: list[str], nested: bool = False) -> PipelineConfig:
    return dataclasses.replace(cfg, teachers={n: cfg.teachers[n] for n in names},
                               masks=dataclasses.replace(cfg.masks, nested=nested))


# ----------------------------------------------------------------------------------------------
# seeds


def test_derive_seed_stable_and_distinct():
    s = derive_seed(0, "000001", 0, "student")
    assert s == derive_seed(0, "000001", 0, "student")
    assert 0 <= s < 2**63
    others = {derive_seed(1, "000001", 0, "student"), derive_seed(0, "000002", 0, "student"),
              derive_seed(0, "000001", 1, "student"), derive_seed(0, "000001", 0, "teacher:mae")}
    assert s not in others and len(others) == 4
    # parts are encoded unambiguously: moving text between key and role changes the seed
    assert derive_seed(0, "a", 0, "bc") != derive_seed(0, "ab", 0, "c")


def test_generator_for_replays():
    a = torch.rand(4, generator=generator_for(3, "k", 1, "view"))
    b = torch.rand(4, generator=generator_for(3, "k", 1, "view"))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# masks


def test_mask_sizes_and_subsets(cfg):
    assert cfg.num_patches == 196
    m = draw_masks(cfg, "000123", 0)
    assert len(m.student) == 49
    assert {n: len(v) for n, v in m.teachers.items()} == {"mae": 78, "mocov3": 108, "ibot": 137}
    for idx in [m.student, *m.teachers.values()]:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats
        assert idx.min() >= 0 and idx.max() < 196
    for v in m.teachers.values():
        assert set(m.student) <= set(v)


def test_masks_deterministic_and_vary(cfg):
    a, b = draw_masks(cfg, "k1", 0), draw_masks(cfg, "k1", 0)
    assert np.array_equal(a.student, b.student)
    assert all(np.array_equal(a.teachers[n], b.teachers[n]) for n in a.teachers)
    for other in (draw_masks(cfg, "k2", 0), draw_masks(cfg, "k1", 1),
                  draw_masks(dataclasses.replace(cfg, seed=1), "k1", 0)):
        assert not np.array_equal(a.student, other.student)
        assert all(not np.array_equal(a.teachers[n], other.teachers[n]) for n in a.teachers)


def test_independent_teachers_unaffected_by_adding_one(cfg):
    two = with_teachers(cfg, ["mae", "ibot"])
    for key in ("a", "b", "c"):
        m2, m3 = draw_masks(two, key, 0), draw_masks(cfg, key, 0)
        assert np.array_equal(m2.student, m3.student)
        for n in ("mae", "ibot"):
            assert np.array_equal(m2.teachers[n], m3.teachers[n])


def test_nested_chain(cfg):
    nested = with_teachers(cfg, list(cfg.teachers), nested=True)
    assert chain_order(nested) == ["mae", "mocov3", "ibot"]
    for key in ("x", "y", "z"):
        m = draw_masks(nested, key, 2)
        chain = [set(m.student)] + [set(m.teachers[n]) for n in chain_order(nested)]
        assert all(a < b for a, b in zip(chain, chain[1:]))
        assert [len(c) for c in chain] == [49, 78, 108, 137]
        assert np.array_equal(m.student, draw_masks(cfg, key, 2).student)  # the student set is mode-free


def test_nested_ties_ordered_by_name(cfg):
    t = cfg.teachers
    same = {"b": dataclasses.replace(t["mae"], name="b"), "a": dataclasses.replace(t["mae"], name="a"),
            "c": dataclasses.replace(t["ibot"], name="c")}
    nested = dataclasses.replace(cfg, teachers=same, masks=dataclasses.replace(cfg.masks, nested=True))
    assert chain_order(nested) == ["a", "b", "c"]
    m = draw_masks(nested, "k", 0)
    assert np.array_equal(m.teachers["a"], m.teachers["b"])
    assert list(m.teachers) == ["b", "a", "c"]  # returned in config order


def test_masks_statistically_uniform(cfg):
    keys = 1500
    n = cfg.num_patches
    s_count = np.zeros(n)
    t_count = {name: np.zeros(n) for name in cfg.teachers}
    for i in range(keys):
        m = draw_masks(cfg, f"{i:06d}", 0)
        s_count[m.student] += 1
        for name, v in m.teachers.items():
            t_count[name][v] += 1
    # each index visible with probability K/N; std per index <= sqrt(.25/1500) ~ 0.013: ±0.06 is loose
    assert np.abs(s_count / keys - 49 / n).max() < 0.06
    for name, c in t_count.items():
        assert np.abs(c / keys - cfg.teacher_tokens(name) / n).max() < 0.06


# ----------------------------------------------------------------------------------------------
# views


def test_sample_view_matches_torchvision_get_params(cfg):
    img = Image.new("RGB", (300, 200))
    for seed in range(50):
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(img, cfg.views.crop_scale, cfg.views.crop_ratio)
        flip = bool(torch.rand(1) < cfg.views.hflip_prob)
        p = sample_view(300, 200, torch.Generator().manual_seed(seed), cfg.views)
        assert p.pixel_box(300, 200) == (i, j, h, w)
        assert p.flip == flip
        q = ViewParams.from_array(p.to_array())  # the stored float32 form reproduces the integer box
        assert q.pixel_box(300, 200) == (i, j, h, w) and q.flip == flip


def test_sample_view_constraints_and_flip_rate(cfg):
    v = cfg.views
    gen = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(500):
        p = sample_view(640, 480, gen, v)
        top, left, h, w = p.pixel_box(640, 480)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        area = h * w / (640 * 480)
        # rounding h and w to integers moves area and ratio slightly past the sampled range
        assert v.crop_scale[0] * 0.98 <= area <= v.crop_scale[1]
        assert v.crop_ratio[0] * 0.98 <= w / h <= v.crop_ratio[1] * 1.02
        flips += p.flip
    assert 0.4 < flips / 500 < 0.6


def test_sample_view_fallback_central_crop(cfg):
    # a 1000x10 strip: no box with ratio in [3/4, 4/3] and area >= 20 % fits; torchvision centre-crops
    p = sample_view(1000, 10, torch.Generator().manual_seed(0), cfg.views)
    top, left, h, w = p.pixel_box(1000, 10)
    assert (top, h, w) == (0, 10, round(10 * cfg.views.crop_ratio[1])) and left == (1000 - w) // 2


def test_sample_view_deterministic_and_rejects_bad_size(cfg):
    a = sample_view(97, 53, torch.Generator().manual_seed(7), cfg.views)
    assert a == sample_view(97, 53, torch.Generator().manual_seed(7), cfg.views)
    assert draw_view(cfg, "k", 0, 97, 53) == draw_view(cfg, "k", 0, 97, 53)
    assert draw_view(cfg, "k", 0, 97, 53) != draw_view(cfg, "k", 1, 97, 53)
    with pytest.raises(ValueError, match="positive"):
        sample_view(0, 5, torch.Generator(), cfg.views)


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_apply_view_equals_torchvision(cfg, interp):
    img = make_image("RGB", (90, 70), seed=3)
    modes = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        p = sample_view(90, 70, gen, cfg.views)
        i, j, h, w = p.pixel_box(90, 70)
        ref = TF.resized_crop(img, i, j, h, w, [32, 32], modes[interp], antialias=True)
        if p.flip:
            ref = TF.hflip(ref)
        ref_t = TF.pil_to_tensor(ref)
        out = apply_view(img, p, 32, interp)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        assert torch.equal(out, ref_t)


def test_apply_view_flip_mirrors():
    img = make_image("RGB", (40, 40), seed=1)
    base = ViewParams(0.0, 0.0, 1.0, 1.0, False)
    a = apply_view(img, base, 40, "bilinear")
    b = apply_view(img, dataclasses.replace(base, flip=True), 40, "bilinear")
    assert torch.equal(a.flip(-1), b)


def test_tiny_image_is_upsampled(cfg):
    img = make_image("RGB", (5, 7), seed=2)
    p = draw_view(cfg, "tiny", 0, 5, 7)
    top, left, h, w = p.pixel_box(5, 7)
    assert h >= 1 and w >= 1 and top + h <= 7 and left + w <= 5
    out = apply_view(img, p, cfg.data.image_size, cfg.views.interpolation)
    assert out.shape == (3, 224, 224)
    assert int(out.max()) - int(out.min()) > 0  # real image content, not a blank


def test_apply_view_rejects_bad_input():
    with pytest.raises(ValueError, match="interpolation"):
        apply_view(Image.new("RGB", (8, 8)), ViewParams(0, 0, 1, 1, False), 4, "nearest")
    with pytest.raises(ValueError, match="RGB"):
        apply_view(Image.new("L", (8, 8)), ViewParams(0, 0, 1, 1, False), 4, "bilinear")
    with pytest.raises(ValueError, match="5 values"):
        ViewParams.from_array(np.zeros(4))
    assert math.isclose(ViewParams.from_array(np.array([0.1, 0.2, 0.3, 0.4, 1.0])).width, 0.4, rel_tol=1e-6)
