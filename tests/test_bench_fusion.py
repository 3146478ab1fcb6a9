"""The fusion benchmark's construction (benchmarks/complementary_teachers.py, benchmarks/fusion.toml): fast checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from benchmarks.complementary_teachers import (
    TeacherRecipe,
    assert_channel_blind,
    band_images,
    blind_to_other_channels,
    check_bands,
)
from store_schema.config import config_from_dict
from vit_layers.checkpoints import build_vit

FUSION_TOML = Path(__file__).resolve().parents[1] / "benchmarks" / "fusion.toml"


def _split() -> tuple[dict, dict]:
    raw = tomllib.loads(FUSION_TOML.read_text())
    return raw.pop("bench"), raw


def test_each_channel_is_a_function_of_its_band_only_and_together_they_are_the_digit():
    bench, _ = _split()
    bands = check_bands(bench["bands"])
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    img = band_images(src, bands, 32)
    for k, (a, b) in enumerate(bands):  # changing every row outside band k leaves channel k as it was
        other = src.copy()
        outside = np.ones(8, bool)
        outside[a:b] = False
        other[:, outside] = rng.integers(0, 256, (3, int(outside.sum()), 8), dtype=np.uint8)
        assert (band_images(other, bands, 32)[..., k] == img[..., k]).all()
        inside = src.copy()  # ... and changing a row inside it does change it
        inside[:, a] = 255 - inside[:, a]
        assert (band_images(inside, bands, 32)[..., k] != img[..., k]).any()
    # every source row is in exactly one band: the three channels together hold the whole digit
    assert sorted(r for a, b in bands for r in range(a, b)) == list(range(8))
    with pytest.raises(ValueError, match="cover"):
        check_bands([[0, 3], [4, 5], [5, 8]])


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_a_blinded_teacher_cannot_see_the_other_channels(channel):
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", {"embed_dim": 32, "depth": 1, "num_heads": 2}, 16, 4)
    with pytest.raises(AssertionError, match="sees other channels"):
        assert_channel_blind(model, channel, 16)
    blind_to_other_channels(model, channel)
    assert assert_channel_blind(model, channel, 16) == 0.0


def test_fusion_toml_is_a_pipeline_config_and_a_recipe():
    bench, raw = _split()
    cfg = config_from_dict(raw, source=str(FUSION_TOML))
    assert sorted(cfg.teachers) == sorted(bench["channels"]) and sorted(bench["channels"].values()) == [0, 1, 2]
    assert all(t.format == "state_dict" for t in cfg.teachers.values())
    assert bench["knn_metric_k"] in cfg.eval.knn_k
    TeacherRecipe.from_dict(bench["teacher_recipe"])  # every recipe key present, none unknown
    from benchmarks.bench_fusion import VARIANTS, WORKING_TODAY
    names = [n for n, _, _ in VARIANTS]
    assert bench["fused"] in names and set(WORKING_TODAY) <= set(names) and len(set(names)) == len(names)
    assert sorted(n.removeprefix("single-") for n in names if n.startswith("single-")) == sorted(cfg.teachers)
