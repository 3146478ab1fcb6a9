"""What a sweep shows: the comparison printed at the end, the protocol in the header, cached baseline rows."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

import distill.evaluate
import distill.sweep as sweep_mod
from _train_worker import build_store
from distill.cli import main as cli_main


def fake_result(knn: float, ks=(10, 20)) -> dict:
    protocol = {"features": {"cls": "CLS"}, "knn": {"k": list(ks), "temperature": 0.07},
                "linear": {"epochs": 3, "lr": 0.1, "weight_decay": 0.0, "batch_size": 4, "seed": 0},
                "transform": {"resize_shorter_side": 36, "crop": 32, "interpolation": "bicubic"},
                "num_classes": 2, "train_urls": ["train.tar"], "test_urls": ["test.tar"]}
    return {"model": "x", "cls": {"knn@10": knn, "linear": knn / 2}, "protocol": protocol, "n_train": 8, "n_test": 4}


@pytest.fixture
def eval_data(tmp_path, monkeypatch):
    """Reachable eval tars and a faked evaluation (the real one is tested in test_evaluate.py)."""
    for split in ("train", "test"):
        (tmp_path / f"{split}.tar").write_bytes(b"")

    def fake_eval(cfg, checkpoint_dir):
        return fake_result(0.5, cfg.eval.knn_k)
    monkeypatch.setattr(distill.evaluate, "evaluate_checkpoint", fake_eval)
    return [f'eval.train_urls=["{tmp_path}/train.tar"]', f'eval.test_urls=["{tmp_path}/test.tar"]']


def test_the_sweep_prints_its_comparison_and_keeps_the_protocol_in_the_header(tmp_path, eval_data, capsys,
                                                                              monkeypatch):
    build_store(tmp_path, ["train.steps=1", "train.checkpoint_every=1", "train.log_every=1"])
    calls = []
    monkeypatch.setattr(sweep_mod, "_evaluate_baseline", lambda cfg, which: calls.append(which) or fake_result(0.9))
    argv = ["sweep", "--config", str(tmp_path / "config.toml"), "--baselines",
            "--variant", "gate.variant=mean", "--variant", "eval.knn_k=[1]"]
    for arg in eval_data:
        argv += ["--set", arg]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    table = out[:out.index("\n\n")].splitlines()
    header = table[0].split()
    assert header[:3] == ["variant", "loss", "loss_token"] and "gate_entropy" in header
    assert {"gate", "mae", "mocov3", "ibot"} <= set(header) and "cls/knn@10" in header and "cls/linear" in header
    rows = [line.split()[0] for line in table[2:]]
    assert rows == ["baseline:"] * 4 + ["gate.variant-mean", "eval.knn_k-_1_"]
    assert "baseline: teacher mae" in out and "baseline: random-init (seed 0)" in out
    assert f"wrote {tmp_path / 'run' / 'sweep.md'} and {tmp_path / 'run' / 'sweep.csv'}" in out
    assert 'eval.knn_k-_1_ was evaluated otherwise: knn = {"k": [1], "temperature": 0.07}' in out
    assert "DINO weighted kNN (k = 10, 20, T = 0.07)" in out and "8 train images" in out
    assert calls == ["mae", "mocov3", "ibot", "random-init"]
    assert f"report: {tmp_path / 'run' / 'report.png'}" in out  # the sweep's PNG (tests/test_report.py checks one)
    assert (tmp_path / "run" / "report.png").stat().st_size > 20_000

    md = (tmp_path / "run" / "sweep.md").read_text()
    head, table_md = md.split("\n| ", 1)
    assert "linear probe (3 epochs, lr 0.1" in head and "kNN@k = DINO weighted kNN (k = 10, 20," in head
    assert "protocol" not in table_md.splitlines()[0].replace("eval_protocol_differs", "")  # not a column
    with open(tmp_path / "run" / "sweep.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert "eval_protocol" not in csv_rows[0]
    # the one row evaluated otherwise says how; the others are blank there
    assert [r["eval_protocol_differs"] for r in csv_rows] == [""] * 5 + ['knn = {"k": [1], "temperature": 0.07}']
    assert csv_rows[0]["cls/knn@10"] == "0.9" and csv_rows[4]["cls/knn@10"] == "0.5"


def test_baselines_are_computed_once_and_recomputed_when_their_inputs_change(tmp_path, eval_data, monkeypatch):
    cfg = build_store(tmp_path, eval_data)
    weights = Path(cfg.teachers["ibot"].weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"a teacher checkpoint")
    calls = []
    monkeypatch.setattr(sweep_mod, "_evaluate_baseline", lambda cfg, which: calls.append(which) or fake_result(0.7))
    first = sweep_mod.baseline_rows(cfg)
    assert [r["variant"] for r in first] == ["baseline: teacher mae", "baseline: teacher mocov3",
                                             "baseline: teacher ibot", "baseline: random-init (seed 0)"]
    assert all(r["cls/knn@10"] == 0.7 and r["status"] == "ok" for r in first)
    assert sweep_mod.baseline_rows(cfg) == first and len(calls) == 4  # cached: nothing evaluated again
    os.utime(weights, ns=(1, 1))  # a replaced teacher file
    sweep_mod.baseline_rows(cfg)
    assert calls[4:] == ["ibot"]
    from store_schema.config import load_config
    other = load_config(tmp_path / "config.toml", eval_data + ["eval.probe_epochs=2"])  # another protocol
    sweep_mod.baseline_rows(other)
    assert calls[5:] == ["mae", "mocov3", "ibot", "random-init"]


def test_baselines_without_eval_data_are_rows_that_say_why(tmp_path, monkeypatch):
    cfg = build_store(tmp_path)
    monkeypatch.setattr(sweep_mod, "_evaluate_baseline", lambda cfg, which: pytest.fail("nothing to evaluate on"))
    rows = sweep_mod.baseline_rows(cfg)
    assert len(rows) == 4 and all(r["eval"].startswith("eval skipped: eval.train_urls") for r in rows)
