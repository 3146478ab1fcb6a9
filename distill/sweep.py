"""Ablation sweeps from ONE store: each variant is a set of config overrides trained and evaluated in turn.

No teacher is run: every variant reads the same cached features (a variant that changes what the
store holds is refused by the store check before it trains). Results go to run_dir/sweep.md and
run_dir/sweep.csv, one row per variant, rewritten after each variant so a long sweep shows progress.

Variants file (TOML):
    [[variant]]
    name = "mean-gate"            # optional; default: a slug of the overrides
    set = ["gate.variant=mean"]
"""
from __future__ import annotations

import csv
import json
import re
import traceback
from pathlib import Path
from typing import Any

from store_schema.config import ConfigError, load_config, read_toml

# Columns of the table, in order; eval numbers and gate weights are appended as they appear.
LOSS_COLUMNS = ("loss", "loss_token", "loss_map", "loss_cls", "gate_entropy")


def parse_variant(text: str) -> list[str]:
    """'gate.variant=joint;loss.map_weight=0' -> ['gate.variant=joint', 'loss.map_weight=0']."""
    items = [s.strip() for s in text.split(";") if s.strip()]
    if not items or any("=" not in s for s in items):
        raise ConfigError(f"--variant {text!r} must be 'section.key=value' overrides joined by ';'")
    return items


def read_variants_file(path: str | Path) -> list[tuple[str | None, list[str]]]:
    path = Path(path)
    raw = read_toml(path, "variants file")
    tables = raw.get("variant")
    if not isinstance(tables, list) or not tables or set(raw) != {"variant"}:
        raise ConfigError(f"{path}: expected one or more [[variant]] tables (keys: name, set), got keys {sorted(raw)}")
    out = []
    for i, t in enumerate(tables):
        overrides = t.get("set")
        if set(t) - {"name", "set"} or not isinstance(overrides, list) or not all(isinstance(s, str) for s in overrides):
            raise ConfigError(f"{path}: variant #{i + 1} must have set = [\"section.key=value\", ...] and an "
                              f"optional name, got {t}")
        out.append((t.get("name"), [s for o in overrides for s in parse_variant(o)]))
    return out


def slug(overrides: list[str]) -> str:
    """A directory name for a variant: 'gate.variant=mean' -> 'gate.variant-mean'."""
    text = "__".join(o.replace("=", "-") for o in overrides) or "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def eval_unavailable(cfg) -> str | None:
    """Why evaluation cannot run for this config, or None when its data looks reachable."""
    e = cfg.eval
    if not e.train_urls or not e.test_urls:
        return "eval.train_urls / eval.test_urls are empty"
    from extract.shards import expand_urls
    import fsspec
    for name, urls in (("eval.train_urls", e.train_urls), ("eval.test_urls", e.test_urls)):
        try:
            expanded = expand_urls(urls)
        except Exception as err:  # an unreadable "@list" or a bad pattern
            return f"{name}: {err}"
        for url in (expanded[0], expanded[-1]):
            try:
                fs, path = fsspec.core.url_to_fs(url)
                if not fs.exists(path):
                    return f"{name}: {url} does not exist"
            except Exception as err:  # unknown protocol, no credentials, no network
                return f"{name}: {url} is not reachable ({type(err).__name__}: {err})"
    return None


def run_sweep(config: str | Path, variants: list[tuple[str | None, list[str]]], base_overrides: list[str] = (),
              resume: bool = False) -> list[dict[str, Any]]:
    """Train (and evaluate) every variant in turn; returns one result row per variant."""
    from distill.train import train
    if not variants:
        raise ConfigError("no variant given: pass --variant 'section.key=value;...' (repeatable) or --variants-file")
    base = load_config(config, list(base_overrides))
    sweep_dir = Path(base.train.run_dir)
    named = [(name or slug(o), o) for name, o in variants]
    dupes = sorted({n for n, _ in named if [m for m, _ in named].count(n) > 1})
    if dupes:
        raise ConfigError(f"variants {dupes} appear more than once: give them distinct names")
    # Every variant's config is loaded before anything trains, so a typo fails the sweep at once.
    cfgs = [load_config(config, list(base_overrides) + o + [f"train.run_dir={json.dumps(str(sweep_dir / n))}"]) for n, o in named]
    rows: list[dict[str, Any]] = []
    for (name, overrides), cfg in zip(named, cfgs):
        row: dict[str, Any] = {"variant": name, "overrides": "; ".join(overrides), "run_dir": cfg.train.run_dir}
        rows.append(row)
        try:
            summary = train(cfg, resume=resume)
        except Exception as e:  # one diverging variant must not lose the others' results
            row["status"] = f"train failed: {type(e).__name__}: {e}"
            traceback.print_exc()
            write_tables(sweep_dir, rows)
            continue
        row["status"] = "ok"
        row["step"] = summary["step"]
        last = summary["last_metrics"]
        row.update({k: last.get(k) for k in LOSS_COLUMNS})
        row.update({k: v for k, v in last.items() if k.startswith("gate_weight/")})
        row.update(_evaluate(cfg, summary["checkpoint"]))
        write_tables(sweep_dir, rows)
    return rows


def _evaluate(cfg, checkpoint: str | None) -> dict[str, Any]:
    reason = eval_unavailable(cfg)
    if reason is None and checkpoint is None:
        reason = "no checkpoint was written"
    if reason is None:
        try:
            from distill.evaluate import evaluate_checkpoint
        except ImportError as e:
            reason = f"distill.evaluate is not importable ({e})"
    if reason is not None:
        return {"eval": f"eval skipped: {reason}"}
    try:
        result = evaluate_checkpoint(cfg, checkpoint)
    except Exception as e:
        traceback.print_exc()
        return {"eval": f"eval failed: {type(e).__name__}: {e}"}
    out = {"eval": "ok"}
    for feature, accs in result.items():
        if isinstance(accs, dict) and "linear" in accs:
            out.update({f"{feature}/{k}": v for k, v in accs.items()})
    return out


def write_tables(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """sweep.csv (every column) and sweep.md (the same, as a Markdown table)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    csv_path, md_path = sweep_dir / "sweep.csv", sweep_dir / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    cell = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("# Sweep\n\nLosses: mean of the last log window. Eval: accuracies in [0, 1].\n\n"
                       + "\n".join(lines) + "\n")
    return csv_path, md_path
