"""Trackers through accelerate: TensorBoard gets the metrics, the hparams, the resolved config and eval accuracies."""
from __future__ import annotations

import json

import pytest
from accelerate.utils import LoggerType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from _train_worker import build_store
from distill.cli import main as cli_main
from distill.evaluate import _log_to_run
from distill.tracking import hparams
from store_schema.config import CHOICES, ConfigError, load_config


def _events(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_training_and_eval_reach_tensorboard(tmp_path):
    cfg = build_store(tmp_path, ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2"])
    assert cfg.train.trackers == ["tensorboard"]  # the shipped default
    assert cli_main(["train", "--config", str(tmp_path / "config.toml")]) == 0
    tb = tmp_path / "run" / "tensorboard"
    acc = _events(tb)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and "gate_weight/mae" in acc.Tags()["scalars"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[gate]" in config_text and 'variant = "joint"' in config_text  # the resolved TOML, as a code block
    hparam_runs = [p for p in tb.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]
    assert hparam_runs, "add_hparams writes its own run directory"
    start = [v for f in hparam_runs[0].glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
             for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    hp = HParamsPluginData.FromString(start[0].metadata.plugin_data.content).session_start_info.hparams
    assert hp["gate.variant"].string_value == "joint" and hp["train.steps"].number_value == 2

    result = {"model": "step_00000002", "cls": {"knn@10": 0.5, "linear": 0.75}, "mean_patch": {"linear": 0.25}}
    _log_to_run(cfg, tmp_path / "run", result)  # as comad-distill eval --checkpoint and each sweep variant do
    acc = _events(tb)
    linear = acc.Scalars("eval/step_00000002/cls/linear")
    assert [(e.step, e.value) for e in linear] == [(2, 0.75)]
    assert "eval/step_00000002/mean_patch/linear" in acc.Tags()["scalars"]


def test_no_trackers_writes_metrics_jsonl_only(tmp_path):
    build_store(tmp_path, ["train.steps=1", "train.checkpoint_every=1", "train.trackers=[]"])
    assert cli_main(["train", "--config", str(tmp_path / "config.toml")]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_tracker_names_are_accelerates(tmp_path):
    assert set(CHOICES["train.trackers"]) == {str(t) for t in LoggerType} - {"all"}
    cfg = build_store(tmp_path)
    with pytest.raises(ConfigError, match=r"train.trackers = 'tensorbord' is not one of 'tensorboard', 'wandb'"):
        load_config(tmp_path / "config.toml", ['train.trackers=["tensorbord"]'])
    flat = hparams(cfg)
    assert flat["gate.variant"] == "joint" and flat["teachers.mae.visible"] == 0.4
    assert json.loads(flat["student.arch_kwargs"]) == cfg.student.arch_kwargs
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
