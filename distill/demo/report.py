"""The demo's results: a text table of accuracies and a PNG with training curves, gate weights and accuracy bars.

Inputs are the files the pipeline writes: the run's `metrics.jsonl` (one JSON row per log window:
step, loss, loss_token, loss_map, gate_weight/<teacher>, ...) and one `comad-distill eval --out` JSON
per model ({"model", "<feature>": {"knn@<k>": acc, ..., "linear": acc}, ...}). Plots use matplotlib's
Agg canvas directly (no pyplot), so importing this never changes a caller's backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelResult", "accuracy_columns", "format_table", "read_metrics", "write_report_png"]

FEATURES = ("cls", "mean_patch")
LOSS_KEYS = ("loss", "loss_token", "loss_map")
GATE_PREFIX = "gate_weight/"


@dataclass(frozen=True)
class ModelResult:
    name: str  # row label, e.g. "teacher mae (masked_reconstruction)"
    kind: str  # teacher | random-init | distilled
    eval: dict[str, Any]  # the eval command's JSON


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl in file order; blank lines are skipped, a malformed line is an error naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON row ({e})") from None
    return rows


def accuracy_columns(results: list[ModelResult]) -> list[tuple[str, str]]:
    """(feature, metric) columns present in every result: per feature the largest kNN k, then linear."""
    cols = []
    for f in FEATURES:
        if not all(isinstance(r.eval.get(f), dict) for r in results):
            continue
        common = set.intersection(*(set(r.eval[f]) for r in results))
        knn = sorted((m for m in common if m.startswith("knn@")), key=lambda m: int(m.split("@")[1]))
        cols += [(f, m) for m in knn[-1:] + (["linear"] if "linear" in common else [])]
    if not cols:
        raise ValueError("the evaluation results share no accuracy column (expected e.g. cls.knn@20, cls.linear)")
    return cols


def format_table(results: list[ModelResult]) -> str:
    """One row per model, accuracies in percent; header names feature and protocol."""
    cols = accuracy_columns(results)
    width = max(len(r.name) for r in results) + 2
    head = f"{'model':<{width}}" + "".join(f"{f + ' ' + m:>18}" for f, m in cols)
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<{width}}" + "".join(f"{100 * r.eval[f][m]:>17.1f}%" for f, m in cols))
    return "\n".join(lines)


def write_report_png(path: str | Path, metrics: list[dict[str, Any]], results: list[ModelResult],
                     title: str = "CoMAD demo") -> None:
    """Three panels: losses over steps, mean gate weight per teacher over steps, accuracy bars per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_gate, ax_acc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
    rows = [r for r in metrics if "step" in r]

    def curve(ax, key: str, label: str) -> None:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)

    for key in LOSS_KEYS:
        curve(ax_loss, key, key)
    ax_loss.set(title="distillation losses", xlabel="step", ylabel="loss")
    gate_keys = sorted({k for r in rows for k in r if k.startswith(GATE_PREFIX)})
    for key in gate_keys:
        curve(ax_gate, key, key.removeprefix(GATE_PREFIX))
    ax_gate.set(title="consensus gate: mean weight per teacher", xlabel="step", ylabel="weight", ylim=(0, 1))
    for ax in (ax_loss, ax_gate):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax.transAxes)

    cols = accuracy_columns(results)
    width = 0.8 / len(cols)
    for j, (f, m) in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(results))]
        bars = ax_acc.bar(xs, [r.eval[f][m] for r in results], width, label=f"{f} {m}")
        ax_acc.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    ax_acc.set_xticks(range(len(results)), [r.name.replace(" (", "\n(") for r in results], fontsize=7)
    ax_acc.set(title="digits test accuracy (frozen features)", ylabel="accuracy", ylim=(0, 1.15))
    ax_acc.legend(fontsize=7, ncols=2, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
