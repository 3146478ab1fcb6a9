"""`comad-distill report RUN_DIR`: a PNG of a training run or a sweep, and the demo's table of accuracies.

Inputs are the files the pipeline writes: a run's `metrics.jsonl` (one JSON row per log window: step,
loss, loss_token, loss_map, loss_cls, gate_weight/<teacher>, ...), its `config.toml`, the evaluation
JSONs `comad-distill eval` leaves in the run (`eval_*.json`: {"model", "<feature>": {"knn@<k>": acc,
..., "linear": acc}, ...}) and, for a sweep, `sweep.csv` (one row per variant, run_dir among its
columns). Three panels: losses over steps, the consensus gate's mean weight per teacher (over steps
for a run, the last window per variant for a sweep), accuracies as horizontal bars (model names on the
axis, where long names stay readable); titled from the config. Plots use matplotlib's Agg canvas
directly (no pyplot), so importing this never changes a caller's backend.
"""
from __future__ import annotations

import csv
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.sweep import GATE_PREFIX, LOSS_COLUMNS, PROTOCOL, SWEEP_CONFIG
from store_schema.choices import FEATURES
from store_schema.config import ConfigError, load_config

LOSS_KEYS = tuple(k for k in LOSS_COLUMNS if k.startswith("loss"))
REPORT_FILE = "report.png"


@dataclass(frozen=True)
class ModelResult:
    name: str  # row label, e.g. "teacher mae (masked_reconstruction)"
    kind: str  # teacher | random-init | distilled | a sweep variant
    eval: dict[str, Any]  # the eval command's JSON: {feature: {metric: accuracy}}


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
        if not results or not all(isinstance(r.eval.get(f), dict) for r in results):
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


# ---------------------------------------------------------------------------------------------- the figure

def _label(name: str, width: int = 26) -> str:
    """A tick label of at most 3 lines of `width`: broken after spaces and a variant's '__' separators first."""
    lines: list[str] = []
    for piece in re.split(r"(?<=__)|(?<= )", name):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines += textwrap.wrap(piece, width, break_on_hyphens=False, drop_whitespace=False) or [piece]
    return "\n".join(line.rstrip() for line in lines[:3]) or "(unnamed)"


def _hbars(ax, names: list[str], series: list[tuple[str, list[float | None]]], xlabel: str, xlim=(0, 1)) -> None:
    """Grouped horizontal bars: one group per name (top to bottom), one bar per series, values at the bar ends."""
    k = max(len(series), 1)
    height = 0.8 / k
    for j, (label, values) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * height for i in range(len(names))]
        bars = ax.barh(ys, [v if v is not None else 0.0 for v in values], height, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=6, padding=2)
    ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=7)
    ax.invert_yaxis()  # first model on top, as in the tables
    ax.set(xlabel=xlabel, xlim=(xlim[0], xlim[1] * 1.15))
    if series:
        ax.legend(fontsize=7, loc="lower right")


def report_figure(runs: dict[str, list[dict[str, Any]]], results: list[ModelResult], title: str):
    """The report as a matplotlib Figure (3 axes: losses, gate weights, accuracies); tests inspect it."""
    # here: matplotlib is optional (the `extras`); a missing one fails `report` only (main_report says so)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in results]
    gate_groups = len(runs) if len(runs) > 1 else 0
    height = max(4.8, 1.2 + 0.45 * max(len(names), gate_groups))
    fig = Figure(figsize=(17, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_gate, ax_acc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
    single = len(runs) == 1
    for run, rows in runs.items():
        for key in (LOSS_KEYS if single else ("loss",)):  # a sweep: the total loss of each variant
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                ax_loss.plot(*zip(*pts), label=key if single else run, marker="." if len(pts) < 30 else None)
    ax_loss.set(title="distillation losses" + ("" if single else " (total, per variant)"), xlabel="step",
                ylabel="loss")
    teachers = sorted({k.removeprefix(GATE_PREFIX) for rows in runs.values() for r in rows for k in r
                       if k.startswith(GATE_PREFIX)})
    if single:
        rows = next(iter(runs.values()))
        for t in teachers:
            pts = [(r["step"], r[GATE_PREFIX + t]) for r in rows if isinstance(r.get(GATE_PREFIX + t), (int, float))]
            ax_gate.plot(*zip(*pts), label=t, marker="." if len(pts) < 30 else None)
        ax_gate.set(title="consensus gate: mean weight per teacher", xlabel="step", ylabel="weight", ylim=(0, 1))
    elif teachers:
        last = {run: next((r for r in reversed(rows) if any(k.startswith(GATE_PREFIX) for k in r)), {})
                for run, rows in runs.items()}
        _hbars(ax_gate, list(runs), [(t, [last[run].get(GATE_PREFIX + t) for run in runs]) for t in teachers],
               "mean gate weight (last log window)")
        ax_gate.set_title("consensus gate: weight per teacher")
    for ax, what in ((ax_loss, "no losses logged"), (ax_gate, "no gate weights logged")):
        if ax.lines or ax.patches:
            if ax.lines:
                ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
    evaluated = [r for r in results if any(isinstance(r.eval.get(f), dict) for f in FEATURES)]
    if evaluated:
        cols = accuracy_columns(evaluated)
        _hbars(ax_acc, [r.name for r in evaluated],
               [(f"{f} {m}", [r.eval[f].get(m) for r in evaluated]) for f, m in cols], "accuracy (frozen features)")
        ax_acc.set_title("evaluation: test accuracy")
    else:
        ax_acc.text(0.5, 0.5, "no evaluation yet:\ncomad-distill eval --checkpoint RUN_DIR", ha="center",
                    va="center", transform=ax_acc.transAxes)
        ax_acc.set(title="evaluation", xticks=[], yticks=[])
    fig.suptitle(title)
    return fig


def write_report_png(path: str | Path, metrics: list[dict[str, Any]] | dict[str, list[dict[str, Any]]],
                     results: list[ModelResult], title: str = "CoMAD"):
    """Write the report PNG; `metrics` is one run's rows or {run name: rows}. Returns the Figure."""
    runs = metrics if isinstance(metrics, dict) else {"run": metrics}
    fig = report_figure(runs, results, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------------- a run dir

def describe_config(path: Path) -> str:
    """'teachers -> student (steps, gate, fusion, adapters, size)' from a resolved config; '' if unreadable."""
    try:
        cfg = load_config(path)
    except ConfigError:
        return ""
    return (f"{', '.join(cfg.distill_teachers)} -> {cfg.student.arch} ({cfg.train.steps} steps, gate "
            f"{cfg.gate.variant}, fusion {cfg.heads.fusion}, adapters {cfg.heads.adapter_init}, "
            f"{cfg.data.image_size} px)")


def _run_results(run_dir: Path) -> list[ModelResult]:
    """The eval JSONs `comad-distill eval` wrote into the run (eval_<model>.json), in name order."""
    out = []
    for p in sorted(run_dir.glob("eval_*.json")):
        try:
            result = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{p}: not an evaluation JSON ({e}); remove it or rerun comad-distill eval") from None
        out.append(ModelResult(result.get("model", p.stem.removeprefix("eval_")), "eval", result))
    return out


def _sweep_inputs(sweep_dir: Path) -> tuple[dict[str, list[dict]], list[ModelResult]]:
    """Each variant's metrics and each row's accuracies, from sweep.csv (numbers come back as text)."""
    with open(sweep_dir / "sweep.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    runs, results = {}, []
    for r in rows:
        metrics = Path(r.get("run_dir") or "") / "metrics.jsonl"
        if r.get("step") and metrics.is_file():  # a trained variant (baseline rows have no metrics)
            runs[r["variant"]] = read_metrics(metrics)
        accs: dict[str, dict[str, float]] = {}
        for key, value in r.items():
            feature, _, metric = key.partition("/")
            if feature in FEATURES and metric and value not in ("", None) and key != PROTOCOL:
                accs.setdefault(feature, {})[metric] = float(value)
        results.append(ModelResult(r["variant"], "sweep", accs))
    return runs, results


def report_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run directory (metrics.jsonl) or a sweep (sweep.csv); returns the PNG's path."""
    run_dir = Path(run_dir)
    if (run_dir / "sweep.csv").is_file():
        runs, results = _sweep_inputs(run_dir)
        base = describe_config(run_dir / SWEEP_CONFIG)
        title = f"CoMAD sweep {run_dir.name}: {len(runs)} variants" + (f" of {base}" if base else "")
    elif (run_dir / "metrics.jsonl").is_file():
        runs = {run_dir.name: read_metrics(run_dir / "metrics.jsonl")}
        results = _run_results(run_dir)
        title = f"CoMAD run {run_dir.name}: {describe_config(run_dir / 'config.toml')}".rstrip(": ")
    else:
        raise FileNotFoundError(f"{run_dir} is neither a training run (no metrics.jsonl) nor a sweep (no sweep.csv); "
                                "pass the train.run_dir of a run or a sweep")
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    write_report_png(path, runs, results, title)
    return path


def main_report(args: Any) -> Path:
    """CLI: `comad-distill report RUN_DIR [--out FILE.png]`."""
    try:
        import matplotlib  # noqa: F401 -- an optional dependency (the `extras`)
    except ImportError:
        raise ValueError("the report needs matplotlib: pip install matplotlib (or the package's [extras])") from None
    path = report_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return path
