"""`comad-distill report`: the PNG of a run or a sweep, opened and checked for what it shows."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from _train_worker import build_store
from conftest import tiny_config
from distill.cli import main as cli_main
from distill.report import read_metrics, report_figure, report_run, ModelResult
from store_schema.config import dumps_toml

TEACHERS = ("mae", "mocov3", "ibot")


def _metrics(steps=range(5, 45, 5), shift=0.0) -> list[dict]:
    return [{"step": s, "loss": 3.0 / s + shift, "loss_token": 1.0 / s, "loss_map": 1.0 / s, "loss_cls": 1.0 / s,
             "gate_entropy": 0.9, **{f"gate_weight/{t}": w for t, w in zip(TEACHERS, (0.2, 0.3, 0.5))}}
            for s in steps]


def _eval(model: str, acc: float) -> dict:
    return {"model": model, "cls": {"knn@10": acc, "knn@20": acc, "linear": acc + 0.05},
            "mean_patch": {"knn@10": acc / 2, "knn@20": acc / 2, "linear": acc / 3}, "protocol": {"linear": {}}}


def _fake_run(run_dir, cfg, evals=(("step_00000040", 0.7), ("random_init_0", 0.4))):
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics()))
    for model, acc in evals:
        (run_dir / f"eval_{model}.json").write_text(json.dumps(_eval(model, acc)))


def _check_png(path, min_width=1500):
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = image.shape
    assert w >= min_width and h >= 400
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert (image < 250).any(axis=2).mean() > 0.03 and colours > 50  # drawn on, in several colours: not blank


def test_report_of_a_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    _fake_run(run_dir, cfg)
    assert cli_main(["report", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'report.png'}" in capsys.readouterr().out
    _check_png(run_dir / "report.png")

    fig = report_figure({"run": read_metrics(run_dir / "metrics.jsonl")},
                        [ModelResult("step_00000040", "eval", _eval("s", 0.7))], "t")
    assert len(fig.axes) == 3
    loss_ax, gate_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["loss", "loss_token", "loss_map", "loss_cls"]
    assert sorted(line.get_label() for line in gate_ax.lines) == sorted(TEACHERS)
    assert [round(float(v), 2) for v in gate_ax.lines[0].get_ydata()[:2]] in ([0.5, 0.5], [0.2, 0.2], [0.3, 0.3])
    assert [t.get_text() for t in acc_ax.get_yticklabels()] == ["step_00000040"]
    assert len(acc_ax.patches) == 4  # cls knn@20, cls linear, mean_patch knn@20, mean_patch linear

    # the title comes from the run's config
    from distill.report import describe_config
    title = describe_config(run_dir / "config.toml")
    assert "mae, mocov3, ibot -> vit_tiny_patch16_224" in title and "gate joint" in title and "32 px" in title


def test_a_run_without_evaluation_says_how_to_get_one(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run(run_dir, tiny_config(tmp_path), evals=())
    path = report_run(run_dir, tmp_path / "elsewhere" / "r.png")
    _check_png(path)
    fig = report_figure({"run": _metrics()}, [], "t")
    assert "comad-distill eval --checkpoint" in fig.axes[2].texts[0].get_text()


def test_report_of_a_sweep_with_long_variant_names(tmp_path):
    cfg = tiny_config(tmp_path)
    names = ["gate.variant-mean__loss.map_weight-0__heads.adapter_init-pca", "train.teachers-_mae_"]
    rows = [{"variant": "baseline: teacher mae", "status": "ok", "cls/knn@20": 0.8, "cls/linear": 0.9, "run_dir": ""}]
    for i, name in enumerate(names):
        _fake_run(tmp_path / "run" / name, cfg, evals=())
        rows.append({"variant": name, "status": "ok", "step": 40, "cls/knn@20": 0.5 + i / 10, "cls/linear": 0.6,
                     "run_dir": str(tmp_path / "run" / name)})
    with open(tmp_path / "run" / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[1]))
        w.writeheader()
        w.writerows(rows)
    path = report_run(tmp_path / "run")
    _check_png(path)
    from distill.report import _sweep_inputs
    runs, results = _sweep_inputs(tmp_path / "run")
    assert list(runs) == names and [r.name for r in results] == ["baseline: teacher mae", *names]
    fig = report_figure(runs, results, "t")
    loss_ax, gate_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == names  # the total loss of each variant
    assert len(gate_ax.patches) == len(TEACHERS) * len(names)  # the last gate weight per teacher per variant
    labels = [t.get_text() for t in acc_ax.get_yticklabels()]
    assert labels[0] == "baseline: teacher mae" and all(max(map(len, s.split("\n"))) <= 26 for s in labels)
    assert labels[1].split("\n") == ["gate.variant-mean__", "loss.map_weight-0__", "heads.adapter_init-pca"]


def test_report_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "neither a training run (no metrics.jsonl) nor a sweep (no sweep.csv)" in err and "Traceback" not in err


def test_train_ends_with_the_report(tmp_path, capsys):
    build_store(tmp_path, ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2"])
    assert cli_main(["train", "--config", str(tmp_path / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert out.count("trained ") == 1 and f"report: {tmp_path / 'run' / 'report.png'}" in out
    _check_png(tmp_path / "run" / "report.png")


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_the_first_process_prints_and_reports(tmp_path, capsys, monkeypatch, rank, printed):
    cfg = tiny_config(tmp_path)
    (tmp_path / "config.toml").write_text(dumps_toml(cfg))
    _fake_run(tmp_path / "run", cfg)
    summary = {"run_dir": str(tmp_path / "run"), "step": 40, "checkpoint": "c", "last_metrics": {}}
    monkeypatch.setattr("distill.train.train", lambda cfg, resume=False: summary)  # every rank returns this
    monkeypatch.setenv("RANK", rank)
    assert cli_main(["train", "--config", str(tmp_path / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert ("trained " in out) == printed and (tmp_path / "run" / "report.png").exists() == printed
