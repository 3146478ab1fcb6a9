"""Shared fixtures: tiny configurations derived from the shipped pipeline.toml by overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from store_schema.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TOML = REPO / "pipeline.toml"
TINY_VIT = "{embed_dim = 32, depth = 1, num_heads = 2}"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """img 32, patch 8 (N = 16): student 4 tokens, teachers 6 / 9 / 11; tiny ViTs; a store under tmp_path."""
    out = [
        "data.image_size=32", "data.patch_size=8", "data.batch_size=8", "data.num_workers=0",
        f'data.urls=["{tmp_path}/data/train-000000.tar"]',
        f'store.root="{tmp_path}/store"', "store.chunk_samples=4", "store.shard_samples=8",
        f'train.run_dir="{tmp_path}/run"', "train.batch_size=8", "train.shuffle_window=16", "train.num_workers=0",
        f'student.arch_kwargs={TINY_VIT}', "heads.decoder_heads=2",  # must divide the 32-d width
    ]
    for t in ("mae", "mocov3", "ibot"):
        out += [f"teachers.{t}.arch_kwargs={TINY_VIT}", f'teachers.{t}.format="state_dict"',
                f'teachers.{t}.weights="{tmp_path}/ckpt/{t}.pth"']
    return out


def tiny_config(tmp_path: Path, extra: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PIPELINE_TOML, tiny_overrides(tmp_path) + list(extra))


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path)
