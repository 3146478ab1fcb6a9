"""Ablation sweeps from ONE store: each variant is a set of config overrides trained and evaluated in turn.

No teacher is run: every variant reads the same cached features (a variant that changes what the
store holds is refused by the store check before it trains). Results go to run_dir/sweep.md and
run_dir/sweep.csv, one row per variant, rewritten after each variant so a long sweep shows progress;
the evaluation protocol, the same for every row, is in sweep.md's header (a row evaluated otherwise,
because its variant changes eval.*, names what differs). `baselines=True` adds a row per configured
teacher and one for a random-init student: each evaluated once and cached in run_dir/baselines/, keyed
by everything its numbers depend on (the model's config and weights file, the eval config), so a rerun
or a second sweep into the same run_dir reuses them; only these rows load a teacher.

Variants file (TOML):
    [[variant]]
    name = "mean-gate"            # optional; default: a slug of the overrides
    set = ["gate.variant=mean"]
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import traceback
from pathlib import Path
from typing import Any

import fsspec

import distill.evaluate as evaluation  # module attributes, looked up at call time (tests patch them)
import distill.train as training
from store_schema.choices import FEATURES
from store_schema.config import ConfigError, PipelineConfig, dumps_toml, load_config, read_toml
from store_schema.shards import expand_urls

# Columns of the table, in order; eval numbers and gate weights are appended as they appear.
LOSS_COLUMNS = ("loss", "loss_token", "loss_map", "loss_cls", "gate_entropy")
GATE_PREFIX = "gate_weight/"
PROTOCOL = "eval_protocol"  # a row's protocol: kept out of the table, written in its header
BASELINES_DIR = "baselines"
SWEEP_CONFIG = "sweep_config.toml"  # the base config every variant overrides (the report's title reads it)


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
        if (set(t) - {"name", "set"} or not isinstance(overrides, list)
                or not all(isinstance(s, str) for s in overrides)):
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
              resume: bool = False, baselines: bool = False) -> list[dict[str, Any]]:
    """Train (and evaluate) every variant in turn; returns one result row per variant (baseline rows first)."""
    if not variants:
        raise ConfigError("no variant given: pass --variant 'section.key=value;...' (repeatable) or --variants-file")
    base = load_config(config, list(base_overrides))
    sweep_dir = Path(base.train.run_dir)
    named = [(name or slug(o), o) for name, o in variants]
    dupes = sorted({n for n, _ in named if [m for m, _ in named].count(n) > 1})
    if dupes:
        raise ConfigError(f"variants {dupes} appear more than once: give them distinct names")
    # Every variant's config is loaded before anything trains, so a typo fails the sweep at once.
    cfgs = [load_config(config, list(base_overrides) + o + [f"train.run_dir={json.dumps(str(sweep_dir / n))}"])
            for n, o in named]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_CONFIG).write_text(dumps_toml(base), encoding="utf-8")
    rows: list[dict[str, Any]] = baseline_rows(base) if baselines else []
    for (name, overrides), cfg in zip(named, cfgs):
        row: dict[str, Any] = {"variant": name, "overrides": "; ".join(overrides), "run_dir": cfg.train.run_dir}
        rows.append(row)
        try:
            summary = training.train(cfg, resume=resume)
        except Exception as e:  # one diverging variant must not lose the others' results
            row["status"] = f"train failed: {type(e).__name__}: {e}"
            traceback.print_exc()
            write_tables(sweep_dir, rows)
            continue
        row["status"] = "ok"
        row["step"] = summary["step"]
        last = summary["last_metrics"]
        row.update({k: last.get(k) for k in LOSS_COLUMNS})
        row.update({k: v for k, v in last.items() if k.startswith(GATE_PREFIX)})
        row.update(_evaluate(cfg, summary["checkpoint"]))
        write_tables(sweep_dir, rows)
    return rows


def _evaluate(cfg, checkpoint: str | None) -> dict[str, Any]:
    reason = eval_unavailable(cfg)
    if reason is None and checkpoint is None:
        reason = "no checkpoint was written"
    if reason is not None:
        return {"eval": f"eval skipped: {reason}"}
    try:
        result = evaluation.evaluate_checkpoint(cfg, checkpoint)
    except Exception as e:
        traceback.print_exc()
        return {"eval": f"eval failed: {type(e).__name__}: {e}"}
    return eval_columns(result)


def eval_columns(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluate_model result as row cells: 'feature/metric' accuracies, and the protocol (not a column)."""
    out: dict[str, Any] = {"eval": "ok"}
    for feature in FEATURES:  # not every dict of the result: its protocol has a "linear" entry too
        if isinstance(result.get(feature), dict):
            out.update({f"{feature}/{k}": v for k, v in result[feature].items()})
    out[PROTOCOL] = {**result.get("protocol", {}), "n_train": result.get("n_train"), "n_test": result.get("n_test")}
    return out


# ---------------------------------------------------------------------------------------------- baselines

def _file_identity(path: str) -> list[Any]:
    """(size, mtime) of a local weights file: a replaced checkpoint invalidates its cached numbers."""
    try:
        st = os.stat(path)
    except OSError:
        return []  # a timm tag or a remote URL: its name is its identity
    return [st.st_size, st.st_mtime_ns]


def baseline_key(cfg: PipelineConfig, which: str) -> str:
    """Everything a baseline's numbers depend on, hashed: the model's config (and file), the eval, the sizes."""
    model = (dataclasses.asdict(cfg.teachers[which]) | {"file": _file_identity(cfg.teachers[which].weights)}
             if which != "random-init" else dataclasses.asdict(cfg.student) | {"seed": cfg.seed})
    blob = {"model": model, "eval": dataclasses.asdict(cfg.eval), "seed": cfg.seed,
            "sizes": [cfg.data.image_size, cfg.data.patch_size, cfg.data.max_image_pixels]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def baseline_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """A row per configured teacher and one random-init student, each evaluated once and cached."""
    reason = eval_unavailable(cfg)
    rows = []
    for which in [*cfg.teachers, "random-init"]:
        name = f"baseline: teacher {which}" if which != "random-init" else f"baseline: random-init (seed {cfg.seed})"
        row: dict[str, Any] = {"variant": name, "status": "ok"}
        rows.append(row)
        if reason is not None:
            row["eval"] = f"eval skipped: {reason}"
            continue
        path = Path(cfg.train.run_dir) / BASELINES_DIR / f"{which}.json"
        key = baseline_key(cfg, which)
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}
        if cached.get("key") != key:
            try:
                cached = {"key": key, "result": _evaluate_baseline(cfg, which)}
            except Exception as e:  # a teacher file that is gone must not lose the variants' results
                traceback.print_exc()
                row.update(status=f"eval failed: {type(e).__name__}: {e}", eval="failed")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1) + "\n", encoding="utf-8")
        row.update(eval_columns(cached["result"]))
        row["run_dir"] = str(path)
    return rows


def _evaluate_baseline(cfg: PipelineConfig, which: str) -> dict[str, Any]:
    if which == "random-init":
        model, mean, std, _ = evaluation.load_eval_model(cfg, random_init_seed=cfg.seed)
    else:
        model, mean, std, _ = evaluation.load_eval_model(cfg, teacher=which)
    return evaluation.evaluate_model(model.to(evaluation._device()), cfg, mean, std)


def write_tables(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """sweep.csv (every column) and sweep.md (the same as a Markdown table, under the protocol it was run with)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    columns = table_columns(rows)
    protocol = header_protocol(rows)
    differs = {id(r): _differences(r.get(PROTOCOL), protocol) for r in rows}
    if any(differs.values()):
        columns.append("eval_protocol_differs")
    cells = [{**r, "eval_protocol_differs": differs[id(r)]} for r in rows]
    csv_path, md_path = sweep_dir / "sweep.csv", sweep_dir / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(cells)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in cells]
    md_path.write_text("# Sweep\n\n" + "\n".join(protocol_lines(protocol)) + "\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every row's keys without the protocol (it goes in the header): the variant, its losses and gate weights,
    the accuracies, then the rest; in order of appearance within each group (baseline rows have no losses)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns and k != PROTOCOL]

    def group(c: str) -> int:
        return (0 if c in ("variant", "status", "step") else 1 if c in LOSS_COLUMNS else
                2 if c.startswith(GATE_PREFIX) else 3 if c == "eval" or "/" in c else 4)
    return sorted(columns, key=group)  # stable: appearance order within a group


def _cell(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def header_protocol(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The protocol most rows were evaluated with (the first evaluated row's on a tie); None: no row was."""
    seen = [r[PROTOCOL] for r in rows if r.get(PROTOCOL)]
    if not seen:
        return None
    texts = [json.dumps(p, sort_keys=True) for p in seen]
    return seen[max(range(len(seen)), key=lambda i: (texts.count(texts[i]), -i))]


def _differences(p: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    if not p or not ref or p == ref:
        return ""
    return "; ".join(f"{k} = {json.dumps(p.get(k))}" for k in sorted(set(p) | set(ref)) if p.get(k) != ref.get(k))


def protocol_lines(p: dict[str, Any] | None) -> list[str]:
    """The protocol as prose: what every accuracy in the table means."""
    losses = "Losses and gate weights: mean of the last log window of each run."
    if not p:
        return [losses, "Evaluation: none ran (see the eval column)."]
    knn, lin, tf = p.get("knn", {}), p.get("linear", {}), p.get("transform", {})
    return [losses,
            f"Evaluation (every row unless eval_protocol_differs says otherwise): accuracies in [0, 1] on frozen "
            f"features ({', '.join(p.get('features', {}))}); kNN@k = DINO weighted kNN (k = "
            f"{', '.join(map(str, knn.get('k', [])))}, T = {knn.get('temperature')}); linear = linear probe "
            f"({lin.get('epochs')} epochs, lr {lin.get('lr')}, weight decay {lin.get('weight_decay')}, batch "
            f"{lin.get('batch_size')}, seed {lin.get('seed')}).",
            f"Transform: shorter side to {tf.get('resize_shorter_side')}, centre crop {tf.get('crop')} "
            f"({tf.get('interpolation')}). Data: {p.get('n_train')} train images "
            f"({', '.join(p.get('train_urls', []))}), "
            f"{p.get('n_test')} test images ({', '.join(p.get('test_urls', []))}), {p.get('num_classes')} classes."]


def format_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> str:
    """The comparison printed at the end of a sweep: variant, losses, gate weight per teacher, every eval metric."""
    columns = [c for c in table_columns(rows) if c == "variant" or c in LOSS_COLUMNS or c.startswith(GATE_PREFIX)
               or "/" in c or (c == "status" and any(r.get("status") != "ok" for r in rows))
               or (c == "eval" and any(r.get("eval") not in ("ok", None) for r in rows))]
    head = ["gate " + c.removeprefix(GATE_PREFIX) if c.startswith(GATE_PREFIX) else c for c in columns]
    body = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), "-" * len(fmt(head))] + [fmt(b) for b in body]
    protocol = header_protocol(rows)
    lines.append("")
    lines += [f"{r['variant']} was evaluated otherwise: {d}"
              for r in rows if (d := _differences(r.get(PROTOCOL), protocol))]
    lines += [*protocol_lines(protocol),
              f"wrote {sweep_dir / 'sweep.md'} and {sweep_dir / 'sweep.csv'}"]
    return "\n".join(lines)
