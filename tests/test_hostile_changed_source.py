"""An input that changed since its unit was written is named and refused, or redone with --redo-changed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _extract_fixtures import extract_config
from extract.cli import main as cli_main
from extract.pipeline import run_extraction
from extract.resume import source_identity
from store_schema.config import dumps_toml
from store_schema.store import FeatureStore, StoreError, unit_name
from store_schema.validate import validate_store
from wds_fixtures import good_samples, member_offsets, truncate, write_tar


@pytest.fixture
def setup(tmp_path):
    full = write_tar(tmp_path / "full" / "b.tar", good_samples(6, start=10, size=(30, 22)))
    a = write_tar(tmp_path / "data" / "a.tar", good_samples(4, size=(30, 22)))
    b = tmp_path / "data" / "b.tar"
    shutil.copy(full, b)
    start, _ = member_offsets(b)["000013.cls"]
    truncate(b, start - 512 + 100)  # an interrupted download: 3 whole samples, then a cut header
    cfg = extract_config(tmp_path, [a, b])
    run_extraction(cfg)
    return cfg, a, b, full


def n_samples(cfg, url) -> int:
    return FeatureStore.open(cfg.store.root).unit_record(unit_name(str(url)))["n_samples"]


def test_the_unit_records_its_source(setup):
    cfg, a, b, _ = setup
    rec = FeatureStore.open(cfg.store.root).unit_record(unit_name(str(b)))
    assert rec["source_id"]["size"] == b.stat().st_size and rec["source_id"]["mtime"] == b.stat().st_mtime
    assert rec["n_samples"] == 3 and any("truncated" in s["reason"] for s in rec["skipped"])


def _replace(b: Path, full: Path, how: str) -> None:
    if how == "full file":
        shutil.copy(full, b)  # other size
    elif how == "same size, other bytes":
        data = bytearray(b.read_bytes())
        data[600] ^= 0xFF
        st = b.stat()
        b.write_bytes(bytes(data))
        os.utime(b, (st.st_atime, st.st_mtime + 5))
    elif how == "touched":
        st = b.stat()
        os.utime(b, (st.st_atime, st.st_mtime + 60))


@pytest.mark.parametrize("how", ["full file", "same size, other bytes", "touched"])
def test_a_changed_input_is_refused_and_named(setup, how):
    cfg, a, b, full = setup
    _replace(b, full, how)
    before = FeatureStore.open(cfg.store.root).unit_record(unit_name(str(b)))
    with pytest.raises(StoreError) as e:
        run_extraction(cfg)
    msg = str(e.value)
    assert str(b) in msg and "--redo-changed" in msg and str(a) not in msg
    assert ("size" in msg) == (how == "full file") and "mtime" in msg
    assert FeatureStore.open(cfg.store.root).unit_record(unit_name(str(b))) == before  # nothing touched
    assert validate_store(cfg.store.root) == []


def test_redo_changed_re_extracts_only_the_changed_input(setup):
    cfg, a, b, full = setup
    _replace(b, full, "full file")
    write_id_a = FeatureStore.open(cfg.store.root).unit_record(unit_name(str(a)))["write_id"]
    summary = run_extraction(cfg, redo_changed=True)
    assert summary["tars_extracted"] == 1 and summary["tars_already_complete"] == 1 and summary["images"] == 6
    store = FeatureStore.open(cfg.store.root)
    rec = store.unit_record(unit_name(str(b)))
    assert rec["n_samples"] == 6 and rec["skipped"] == [] and rec["source_id"]["size"] == full.stat().st_size
    assert store.unit_record(unit_name(str(a)))["write_id"] == write_id_a
    assert validate_store(cfg.store.root) == []
    assert run_extraction(cfg)["tars_extracted"] == 0  # now in step: a plain rerun has nothing to do


def test_an_unchanged_or_missing_input_is_not_refused(setup):
    cfg, a, b, _ = setup
    assert run_extraction(cfg)["tars_already_complete"] == 2
    b.unlink()  # a complete unit whose input is gone: kept, nothing to compare
    assert run_extraction(cfg)["tars_already_complete"] == 2 and n_samples(cfg, b) == 3


def test_cli_refuses_with_one_line_and_redoes_with_the_flag(setup, capsys, tmp_path):
    cfg, a, b, full = setup
    _replace(b, full, "full file")
    toml = tmp_path / "p.toml"
    toml.write_text(dumps_toml(cfg))
    assert cli_main(["--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--redo-changed" in err.splitlines()[-1]
    assert cli_main(["--config", str(toml), "--redo-changed"]) == 0
    assert n_samples(cfg, b) == 6


def test_source_identity_of_missing_and_present_files(tmp_path):
    assert source_identity(str(tmp_path / "nope.tar")) is None
    f = tmp_path / "x.tar"
    f.write_bytes(b"x" * 10)
    assert source_identity(str(f)) == {"size": 10, "mtime": f.stat().st_mtime}
    assert source_identity(f"file://{f}")["size"] == 10
