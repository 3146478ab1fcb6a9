"""The fusion benchmark's construction (benchmarks/complementary_teachers.py, benchmarks/fusion.toml): fast checks."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.complementary_teachers import (TeacherRecipe, assert_channel_blind, band_images, band_rows,
                                               blind_to_other_channels)
from extract.teachers import build_vit
from store_schema.config import config_from_dict

FUSION_TOML = Path(__file__).resolve().parents[1] / "benchmarks" / "fusion.toml"


def _split() -> tuple[dict, dict]:
    raw = tomllib.loads(FUSION_TOML.read_text())
    return raw.pop("bench"), raw


def test_bands_split_the_image_into_three_channels_that_together_are_the_digit():
    bench, _ = _split()
    rows = band_rows(bench["bands"], 32)
    assert rows[0][0] == 0 and rows[-1][1] == 32 and all(rows[i][1] == rows[i + 1][0] for i in range(2))
    grey = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8).repeat(3, axis=3)
    bands = band_images(grey, bench["bands"])
    assert (bands.sum(axis=3) == grey[..., 0]).all()  # channels add up to the digit: nothing lost, nothing twice
    for k, (a, b) in enumerate(rows):  # channel k is zero outside band k
        outside = np.ones(32, bool)
        outside[a:b] = False
        assert not bands[:, outside, :, k].any()
    with pytest.raises(ValueError, match="cover"):
        band_rows([[0, 3], [4, 5], [5, 8]], 32)


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
