"""`comad-demo --quick` end to end: digits shards, cached teacher fixtures, extract, train, eval, table, report.

The teacher fixtures are cached in $COMAD_DEMO_CACHE or else pytest's cache directory
(`.pytest_cache/d/comad-demo-teachers`), so only the first run pays for training them (a few minutes
on 2 cores); the cache key covers the recipe, the teacher configs, the code and the library versions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from store_schema.config import load_config
from vit_layers.checkpoints import load_teacher

pytestmark = pytest.mark.slow

ROWS = ["teacher mae", "teacher mocov3", "teacher ibot", "student random-init", "student distilled"]


def _command() -> list[str]:
    exe = shutil.which("comad-demo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "import sys; from distill.demo import main; sys.exit(main())"]


def _fixture_cache(request, tmp_path_factory) -> Path:
    """$COMAD_DEMO_CACHE if set, else pytest's cache dir (kept across runs), else a temporary dir."""
    if os.environ.get("COMAD_DEMO_CACHE"):
        return Path(os.environ["COMAD_DEMO_CACHE"])
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("comad-demo-teachers") if cache is not None else tmp_path_factory.mktemp("teachers")


def test_comad_demo_quick_runs_end_to_end(tmp_path, tmp_path_factory, request):
    cache = _fixture_cache(request, tmp_path_factory)
    out = tmp_path / "demo"
    env = {**os.environ, "COMAD_DEMO_CACHE": str(cache)}
    proc = subprocess.run([*_command(), "--quick", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # The printed table: a header, a rule, one row per model, every accuracy a percentage in [0, 100].
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model") and "knn@20" in line)
    rows = lines[head + 2: head + 2 + len(ROWS)]
    for prefix, row in zip(ROWS, rows):
        assert row.startswith(prefix), (prefix, row)
        values = [float(tok.rstrip("%")) for tok in row.split() if tok.endswith("%")]
        assert len(values) == 4 and all(0.0 <= v <= 100.0 for v in values), row

    results = json.loads((out / "results.json").read_text())
    assert [r["name"].split(" (")[0] for r in results["rows"]] == ROWS
    for r in results["rows"]:
        for feature in ("cls", "mean_patch"):
            accs = r["eval"][feature]
            assert set(accs) == {"knn@10", "knn@20", "linear"}
            assert all(0.0 <= a <= 1.0 for a in accs.values()), (r["name"], accs)
        assert r["eval"]["n_train"] == 1437 and r["eval"]["n_test"] == 360
        transform = r["eval"]["protocol"]["transform"]  # DINO's eval transform: 32 / 0.875 -> 36, centre 32
        assert (transform["crop_fraction"], transform["resize_shorter_side"], transform["crop"]) == (0.875, 36, 32)
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # The resolved config is a complete pipeline config pointing at this run; the run logged its gate.
    cfg = load_config(out / "demo.toml")
    assert Path(cfg.store.root) == out / "store" and cfg.train.steps == 40
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert metrics[-1]["step"] == 40 and {f"gate_weight/{t}" for t in cfg.teachers} <= set(metrics[-1])

    # The full (cached) teacher fixtures: well above chance (10 %) on digits, and different from each other.
    # iBOT's masked self-distillation needs far more than the demo's 200 steps: its EMA teacher stays near its
    # random init (kNN ~0.47), so it is held to "not collapsed" (3x chance) and to the linear-probe bar.
    knn_floor = {"mae": 0.8, "mocov3": 0.6, "ibot": 0.3}
    fixtures = results["teacher_fixtures"]
    assert set(results["teacher_weights_sha256"]) == set(cfg.teachers)
    for name, tcfg in cfg.teachers.items():  # the recorded hash is that of the weights the pipeline loaded
        assert (load_teacher(tcfg, 32, 4)[1] == results["teacher_weights_sha256"][name]
                == fixtures["teachers"][name]["sha256"])
    for name, info in fixtures["teachers"].items():
        assert max(info["knn_cls"], info["knn_mean_patch"]) > knn_floor[name], (name, info)
    for name, row in zip(cfg.teachers, results["rows"][:3]):
        assert max(row["eval"][f]["knn@20"] for f in ("cls", "mean_patch")) > knn_floor[name], row["name"]
        assert max(row["eval"][f]["linear"] for f in ("cls", "mean_patch")) > 0.6, row["name"]
    assert len(fixtures["cka"]) == 3
    for pair, cka in fixtures["cka"].items():
        assert cka["cls"] < 0.95, (pair, cka)


def test_comad_demo_refuses_a_foreign_out_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("not the demo's")
    proc = subprocess.run([*_command(), "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "not written by comad-demo" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "not the demo's"
