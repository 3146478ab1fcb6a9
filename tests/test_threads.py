"""Intra-op threads (issue 12, item 2): the rule of store_schema/threads.py, its override by config, CLI and
OMP_NUM_THREADS, and that both commands set and print it. (Speed is measured in BENCHMARKS.md, not here.)"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import PIPELINE_TOML, tiny_overrides
from store_schema.config import ConfigError, load_config
from store_schema.threads import available_cores, choose_threads, others_busy


def test_cores_left_after_workers_and_other_processes():
    assert choose_threads(0, 0, "train.threads", cores=8, local_processes=1, others=0.0, env={}).threads == 8
    assert choose_threads(0, 3, "train.threads", cores=8, local_processes=1, others=0.0, env={}).threads == 5
    assert choose_threads(0, 0, "train.threads", cores=2, local_processes=1, others=1.0, env={}).threads == 1
    assert choose_threads(0, 2, "train.threads", cores=8, local_processes=1, others=2.6, env={}).threads == 3
    assert choose_threads(0, 0, "train.threads", cores=2, local_processes=1, others=0.4, env={}).threads == 2
    assert choose_threads(0, 8, "train.threads", cores=4, local_processes=1, others=3.0, env={}).threads == 1


def test_torchrun_processes_share_the_node():
    # 4 processes on 16 cores, 2 workers each: 16 / 4 - 2; the load is not subtracted (the siblings' start-up
    # would be counted as other processes)
    c = choose_threads(0, 2, "train.threads", cores=16, env={"LOCAL_WORLD_SIZE": "4"}, others=5.0)
    assert c.threads == 2 and "4 processes on this node" in c.why
    assert choose_threads(0, 0, "train.threads", cores=2, env={"LOCAL_WORLD_SIZE": "4"}).threads == 1


def test_explicit_settings_win():
    c = choose_threads(3, 8, "train.threads", cores=2, local_processes=1, others=2.0, env={"OMP_NUM_THREADS": "1"})
    assert c.threads == 3 and c.why == "train.threads = 3"
    c = choose_threads(0, 0, "data.threads", cores=8, local_processes=1, others=0.0, env={"OMP_NUM_THREADS": "2"})
    assert c.threads == 2 and "OMP_NUM_THREADS=2" in c.why


def test_busy_cores_of_others_from_two_cpu_samples():
    # 100 ticks/s; over 2 s the machine was busy 300 ticks = 3 core-seconds, 1 of them ours: 1 core of others
    assert others_busy(1000, 1300, own_seconds=1.0, wall_seconds=2.0, ticks=100) == pytest.approx(1.0)
    assert others_busy(1000, 1050, own_seconds=1.0, wall_seconds=2.0, ticks=100) == 0.0  # never negative
    assert 1 <= available_cores() <= os.cpu_count()


@pytest.mark.parametrize("value", ["-1", "5000", "1.5", "true"])
def test_threads_keys_are_checked_at_load(tmp_path, value):
    for key in ("train.threads", "data.threads"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(PIPELINE_TOML, tiny_overrides(tmp_path) + [f"{key}={value}"])


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_comad_distill_sets_and_prints_the_threads(tmp_path, monkeypatch, capsys, restore_threads):
    import distill.train
    from distill.cli import main
    seen = {}

    def fake_train(cfg, resume=False):
        seen["threads"] = torch.get_num_threads()
        return {"run_dir": cfg.train.run_dir, "step": 0, "checkpoint": None}

    monkeypatch.setattr(distill.train, "train", fake_train)
    sets = [a for o in tiny_overrides(tmp_path) for a in ("--set", o)]
    assert main(["train", "--config", str(PIPELINE_TOML), *sets, "--threads", "1"]) == 0
    assert seen["threads"] == 1 and "using 1 intra-op CPU thread(s) (train.threads = 1;" in capsys.readouterr().err
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["train", "--config", str(PIPELINE_TOML), *sets, "--set", "train.threads=0"]) == 0
    err = capsys.readouterr().err
    assert f"using {seen['threads']} intra-op CPU thread(s) (train.threads = 0: " in err and "loader worker" in err


def test_comad_extract_sets_and_logs_the_threads(tmp_path, monkeypatch, caplog, restore_threads):
    import extract.cli
    seen = {}
    monkeypatch.setattr(extract.cli, "run_extraction", lambda cfg, redo_changed=False: seen.setdefault(
        "threads", torch.get_num_threads()))
    sets = [a for o in tiny_overrides(tmp_path) for a in ("--set", o)]
    with caplog.at_level("INFO", logger="comad.extract"):
        assert extract.cli.main(["--config", str(PIPELINE_TOML), *sets, "--set", "data.threads=1"]) == 0
    assert seen["threads"] == 1
    assert any("using 1 intra-op CPU thread(s) (data.threads = 1;" in r.getMessage() for r in caplog.records)
