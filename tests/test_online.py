"""Online mode: the same views, masks, pixels and (within float16) features as the store; deterministic batches."""
from __future__ import annotations

import dataclasses
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from _extract_fixtures import all_rows, extract_config, write_tars

from distill.online import LiveTeachers, OnlineBatches, online_loader
from extract.pipeline import run_extraction
from store_schema.store import FeatureStore

SIZES = [4, 4, 4]
ONLINE = ["train.batch_size=4", "train.shuffle_window=8"]  # 12 samples per pass = 3 windows of 2 batches


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    tars = write_tars(tmp, SIZES)
    cfg = extract_config(tmp, tars, ONLINE)  # store.dtype stays the default float16
    assert cfg.store.dtype == "float16"
    run_extraction(cfg)
    return cfg, all_rows(FeatureStore.open(cfg.store.root))


def test_online_targets_equal_the_store(extracted):
    cfg, rows = extracted
    teachers = LiveTeachers(cfg).train()  # stays in eval mode
    assert not teachers.training and not any(p.requires_grad for p in teachers.parameters())
    batches = list(islice(iter(OnlineBatches(cfg, 0, 1)), 6))  # two passes over the 12 samples
    seen = Counter()
    for batch in batches:
        B = cfg.train.batch_size
        assert batch["pixels"].shape == (B, cfg.student_tokens, 3, 8, 8) and batch["pixels"].dtype == torch.uint8
        assert batch["view_images"].shape == (B, 3, 32, 32) and batch["student_idx"].dtype == torch.int64
        out = teachers(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a trainer's mixed precision leaves targets float32
            again = teachers(batch)
        assert all(torch.equal(again["teacher_patch"][t], out["teacher_patch"][t]) for t in cfg.teachers)
        for i, (key, view) in enumerate(zip(batch["keys"], batch["view"].tolist())):
            seen[(key, view)] += 1
            row = rows[(key, view)]
            np.testing.assert_array_equal(batch["pixels"][i].numpy(), row["pixels"])
            np.testing.assert_array_equal(batch["student_idx"][i].numpy(), row["student_idx"])
            for t in cfg.teachers:
                np.testing.assert_array_equal(batch["teacher_idx"][t][i].numpy(), row["teachers"][t]["idx"])
                patch, cls = out["teacher_patch"][t][i], out["teacher_cls"][t][i]
                assert patch.dtype == torch.float32 and patch.shape == (cfg.teacher_tokens(t), 32)
                np.testing.assert_allclose(row["teachers"][t]["patch"], patch.numpy(), rtol=1e-3, atol=1e-3)
                np.testing.assert_allclose(row["teachers"][t]["cls"], cls.numpy(), rtol=1e-3, atol=1e-3)
        assert torch.equal(batch["view"], batch["epoch"] % cfg.views.num_views)
    # one view per image per pass: pass 0 shows view 0 of every sample, pass 1 view 1
    assert seen == Counter({k: 1 for k in rows})
    assert sum(b["epoch"].tolist().count(0) for b in batches) == sum(SIZES)


def test_batches_are_deterministic_and_resume_at_a_step(extracted):
    cfg, _ = extracted
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=2))

    def keys(start: int, n: int) -> list[tuple]:
        return [tuple(zip(b["keys"], b["view"].tolist())) for b in islice(iter(online_loader(cfg, 0, 1, start)), n)]

    full = keys(0, 8)
    assert keys(0, 8) == full  # same config, same stream
    assert keys(3, 5) == full[3:]  # resuming at step 3 with 2 workers continues exactly
    # worker 0 reads tars 0 and 2, worker 1 tar 1; the DataLoader alternates between them
    middle = {f"{i:06d}" for i in range(4, 8)}
    assert [all(k in middle for k, _ in b) for b in full] == [False, True] * 4


def test_processes_split_the_tars(extracted):
    cfg, rows = extracted
    r0 = {k for b in islice(iter(OnlineBatches(cfg, 0, 2)), 2) for k in b["keys"]}
    r1 = {k for b in islice(iter(OnlineBatches(cfg, 1, 2)), 2) for k in b["keys"]}
    assert len(r0) == 8 and len(r1) == 4 and not r0 & r1 and r0 | r1 == {k for k, _ in rows}
    with pytest.raises(ValueError, match="process 3 of 4 gets no training tar"):
        OnlineBatches(cfg, 3, 4)
