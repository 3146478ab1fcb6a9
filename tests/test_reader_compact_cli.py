"""`comad-store compact` (issue 14): writes the compact store; bad input is one line on stderr, exit 2."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from _train_worker import build_store
from distill.compact import COMPRESSION, COMPRESSION_LEVEL, compact_record
from store_schema.cli import main
from store_schema.config import dumps_toml, load_config
from store_schema.store import FeatureStore


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(config path of the full store, root of the compact store comad-store compact wrote, its stdout)."""
    root = tmp_path_factory.mktemp("compact_cli")
    build_store(root)
    out = root / "compact"
    res = subprocess.run([sys.executable, "-m", "store_schema.cli", "compact", "--config", str(root / "config.toml"),
                          "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return root / "config.toml", out, res.stdout


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("comad-store: compact: ") and "Traceback" not in err, err
    assert "\n" not in err, err
    return err


def test_writes_a_compact_store_with_its_codec(written):
    cfg_path, out, stdout = written
    summary = json.loads(stdout)
    assert summary["ok"] and summary["out"] == str(out)
    store = FeatureStore.open(str(out))
    rec = compact_record(store)
    assert rec["status"] == "complete" and rec["source_root"] == load_config(cfg_path).store.root
    assert isinstance(rec["source_effective_ranks"], dict)
    assert (store.meta["compression"], store.meta["compression_level"]) == (COMPRESSION, COMPRESSION_LEVEL)
    assert summary["compression"] == COMPRESSION and summary["target_dim"] == store.teacher_meta(store.teachers[0]).dim


def test_missing_config(capsys, tmp_path):
    err = _one_line_error(capsys, ["compact", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert "nope.toml" in err and "not found" in err
    assert not (tmp_path / "o").exists()


def test_target_exists(capsys, written, tmp_path):
    cfg_path, out, _ = written
    err = _one_line_error(capsys, ["compact", "--config", str(cfg_path), "--out", str(out)])
    assert f"{out} already exists" in err and "new --out" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a store")
    assert "already exists" in _one_line_error(capsys, ["compact", "--config", str(cfg_path), "--out", str(taken)])
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]  # nothing written into it


def test_already_a_compact_store(capsys, written, tmp_path):
    cfg_path, out, _ = written
    cfg = load_config(cfg_path)
    ccfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=str(out)))
    (tmp_path / "c.toml").write_text(dumps_toml(ccfg))
    err = _one_line_error(capsys, ["compact", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    assert "already a compact store" in err and cfg.store.root in err
    assert not (tmp_path / "o").exists()


def test_bad_codec_level(capsys, written, tmp_path):
    cfg_path, _, _ = written
    err = _one_line_error(capsys, ["compact", "--config", str(cfg_path), "--out", str(tmp_path / "o"),
                                   "--compression", "blosc", "--compression-level", "12"])
    assert "level 12" in err and "blosc (level 0-9)" in err


def test_store_schema_cli_does_not_import_distill():
    code = "import sys, store_schema.cli; print(any(m == 'distill' or m.startswith('distill.') for m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stdout + res.stderr
