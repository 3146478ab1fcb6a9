"""Sweeps: several override sets trained from one store, no teacher run, one table row each."""
from __future__ import annotations

import csv
import math

import pytest
from _train_worker import build_store

import distill.evaluate  # noqa: F401 -- imported before no_teachers patches vit_layers.checkpoints: a module
import distill.sweep as sweep_mod  # first imported under the patch would bind the stub for good
import extract.pipeline  # noqa: F401
import vit_layers.checkpoints
from distill.checkpoint import latest_checkpoint
from distill.cli import main as cli_main
from store_schema.config import ConfigError, load_config


@pytest.fixture
def no_teachers(monkeypatch):
    """Every way into a teacher model raises: vit_layers.checkpoints.load_teacher and the names bound to it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a sweep must not load a teacher: it trains from the store")
    monkeypatch.setattr(vit_layers.checkpoints, "load_teacher", refuse)
    for module in ("extract.pipeline", "distill.evaluate"):
        monkeypatch.setattr(f"{module}.load_teacher", refuse)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_variants_from_one_store(tmp_path, no_teachers, capsys):
    build_store(tmp_path, ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2"])
    code = cli_main(["sweep", "--config", str(tmp_path / "config.toml"),
                     "--variant", "gate.variant=mean", "--variant", "gate.variant=agreement;loss.map_weight=0"])
    assert code == 0, capsys.readouterr().err
    sweep_dir = tmp_path / "run"
    rows = _read_csv(sweep_dir / "sweep.csv")
    assert [r["variant"] for r in rows] == ["gate.variant-mean", "gate.variant-agreement__loss.map_weight-0"]
    run_dirs = [sweep_dir / r["variant"] for r in rows]
    for r, run_dir, variant in zip(rows, run_dirs, ["mean", "agreement"]):
        assert r["status"] == "ok" and r["step"] == "2" and r["run_dir"] == str(run_dir)
        assert load_config(run_dir / "config.toml").gate.variant == variant
        assert latest_checkpoint(run_dir).name == "step_00000002"
        for key in ("loss", "loss_token", "loss_map", "gate_entropy", "gate_weight/mae"):
            assert math.isfinite(float(r[key])), (key, r)
        # the tiny config's eval data (data/imagenet-*.tar, relative) does not exist here
        assert r["eval"].startswith("eval skipped: eval.train_urls:") and "does not exist" in r["eval"]
    # map_weight = 0 drops L_map from the loss (the column still reports it); the CLS term (weight 1) stays
    assert math.isclose(float(rows[1]["loss"]), float(rows[1]["loss_token"]) + float(rows[1]["loss_cls"]), rel_tol=1e-5)
    assert not math.isclose(float(rows[0]["loss"]), float(rows[0]["loss_token"]) + float(rows[0]["loss_cls"]),
                            rel_tol=1e-3)
    # the mean gate weighs every teacher that saw a token alike; agreement does not
    assert float(rows[0]["gate_entropy"]) > float(rows[1]["gate_entropy"])
    md = (sweep_dir / "sweep.md").read_text()
    assert "gate.variant-mean" in md and "gate.variant-agreement__loss.map_weight-0" in md
    assert md.count("\n| ") == 3  # header + two rows


def test_eval_numbers_reach_the_table(tmp_path, no_teachers, monkeypatch):
    cfg = build_store(tmp_path, ["train.steps=1", "train.checkpoint_every=1"])
    for split in ("train", "test"):
        (tmp_path / f"{split}.tar").write_bytes(b"")  # reachable; the evaluation itself is faked below
    seen = []

    def fake_eval(cfg, checkpoint_dir):
        seen.append((cfg.gate.variant, str(checkpoint_dir)))
        return {"model": "x", "cls": {"knn@10": 0.5, "linear": 0.25}, "mean_patch": {"knn@10": 0.4, "linear": 0.2},
                "protocol": {}, "n_train": 2, "n_test": 2}
    monkeypatch.setattr(distill.evaluate, "evaluate_checkpoint", fake_eval)
    (tmp_path / "sweep.toml").write_text('[[variant]]\nname = "mean"\nset = ["gate.variant=mean"]\n')
    rows = sweep_mod.run_sweep(tmp_path / "config.toml", sweep_mod.read_variants_file(tmp_path / "sweep.toml"),
                               [f'eval.train_urls=["{tmp_path}/train.tar"]', f'eval.test_urls=["{tmp_path}/test.tar"]'])
    assert seen == [("mean", str(tmp_path / "run" / "mean" / "checkpoints" / "step_00000001"))]
    assert rows[0]["eval"] == "ok" and rows[0]["cls/linear"] == 0.25 and rows[0]["mean_patch/knn@10"] == 0.4
    assert _read_csv(tmp_path / "run" / "sweep.csv")[0]["cls/knn@10"] == "0.5"
    assert cfg.gate.variant == "joint"  # the base config is untouched


def test_bad_variants_fail_before_anything_trains(tmp_path, monkeypatch):
    build_store(tmp_path)
    trained = []
    monkeypatch.setattr("distill.train.train", lambda cfg, resume=False: trained.append(cfg))
    with pytest.raises(ConfigError, match="gate.variant"):
        sweep_mod.run_sweep(tmp_path / "config.toml", [(None, ["gate.variant=mean"]), (None, ["gate.variant=nope"])])
    with pytest.raises(ConfigError, match="more than once"):
        sweep_mod.run_sweep(tmp_path / "config.toml", [("a", ["gate.variant=mean"]), ("a", ["gate.variant=joint"])])
    with pytest.raises(ConfigError, match="section.key=value"):
        sweep_mod.parse_variant("gate.variant")
    (tmp_path / "bad.toml").write_text('[[variant]]\nsets = ["gate.variant=mean"]\n')
    with pytest.raises(ConfigError, match="variant #1"):
        sweep_mod.read_variants_file(tmp_path / "bad.toml")
    assert trained == []
