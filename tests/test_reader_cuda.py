"""int8 targets decoded on the device and a few training steps there: on the CPU always, on CUDA when a GPU is
present (the CUDA case is skipped without one)."""
from __future__ import annotations

from itertools import islice

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_int8_targets_dequantise_on_the_device_and_train(tmp_path, device):
    from _train_worker import build_store
    from distill.store_dataset import StoreBatches, dequantize_targets
    from distill.train import to_device, train
    from store_schema.config import load_config
    build_store(tmp_path, ['store.dtype="int8"'])
    cfg = load_config(tmp_path / "config.toml", [f'train.run_dir="{tmp_path}/run"', "train.steps=3",
                                                 "train.log_every=1", "train.checkpoint_every=3"])
    for q in islice(iter(StoreBatches(cfg, 0, 1, int8_targets=True)), 2):
        cpu = dequantize_targets(q)
        dev = dequantize_targets(to_device(q, torch.device(device)))
        for t in cfg.teachers:
            assert dev["teacher_patch"][t].device.type == device and dev["teacher_patch"][t].dtype == torch.float32
            torch.testing.assert_close(dev["teacher_patch"][t].cpu(), cpu["teacher_patch"][t], rtol=1e-6, atol=1e-7)
    if device == "cpu" and torch.cuda.is_available():
        return  # train() picks the GPU when there is one: the cuda case trains
    summary = train(cfg)
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
