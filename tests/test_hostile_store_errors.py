"""Store-side OS errors are one line naming the path and what to do; the store stays valid and a rerun resumes."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import zarr.storage

from _extract_fixtures import all_rows, extract_config, write_tars
from extract.cli import main as cli_main
from extract.pipeline import ExtractionError, run_extraction
from store_schema import lock
from store_schema.cli import main as store_cli
from store_schema.config import dumps_toml
from store_schema.oserrors import explain
from store_schema.store import FeatureStore, StoreError
from store_schema.validate import validate_store

SIZES = [5, 4, 6]


def _cli(tmp_path: Path, cfg, capsys, *sets: str) -> tuple[int, str]:
    toml = tmp_path / "p.toml"
    toml.write_text(dumps_toml(cfg))
    args = ["--config", str(toml)] + [a for s in sets for a in ("--set", s)]
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("comad-extract")][-1]


@pytest.mark.parametrize("root, words", [
    ("afile", "is a file, not a directory"),
    ("afile/sub", "a parent of"),
    ("afile/sub/deeper", "a parent of"),
    ("foo://bucket/store", "unknown protocol 'foo'"),
    ("nosuch-proto://x/y", "unknown protocol 'nosuch-proto'"),
])
def test_unusable_store_root_is_one_line(tmp_path, capsys, root, words):
    tars = write_tars(tmp_path, [2])
    (tmp_path / "afile").write_text("not a store")
    full = root if "://" in root else str(tmp_path / root)
    cfg = extract_config(tmp_path, tars, [f'store.root="{full}"'])
    with pytest.raises(StoreError, match=words):
        run_extraction(cfg)
    rc, line = _cli(tmp_path, cfg, capsys)
    assert rc == 2 and words in line and "store.root" in line
    assert (tmp_path / "afile").read_text() == "not a store"


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                         (errno.EPERM, "permission denied")])
def test_unwritable_store_is_one_line_and_untouched(tmp_path, capsys, monkeypatch, code, words):
    tars = write_tars(tmp_path, SIZES)
    cfg = extract_config(tmp_path, tars)
    run_extraction(cfg)
    before = all_rows(FeatureStore.open(cfg.store.root))
    real = lock.os.open

    def refuse(path, *a, **k):
        if str(path).endswith("extract.lock"):
            raise OSError(code, "simulated", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(lock.os, "open", refuse)
    rc, line = _cli(tmp_path, cfg, capsys)
    assert rc == 2 and words in line and "extract.lock" in line
    monkeypatch.undo()
    assert validate_store(cfg.store.root) == [] and all_rows(FeatureStore.open(cfg.store.root)).keys() == before.keys()


class _DiskFull:
    """LocalStore.set that fails with ENOSPC from its n-th call on (the disk stays full until undone)."""

    def __init__(self, monkeypatch, after: int):
        self.calls, self.after, self.real = 0, after, zarr.storage.LocalStore.set
        monkeypatch.setattr(zarr.storage.LocalStore, "set", self)

    def __get__(self, obj, owner):
        return lambda key, value: self(obj, key, value)

    async def __call__(self, store, key, value):
        self.calls += 1
        if self.calls > self.after:
            raise OSError(errno.ENOSPC, "No space left on device", str(store.root / key))
        return await self.real(store, key, value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = extract_config(tmp, write_tars(tmp, SIZES))
    run_extraction(cfg)
    return all_rows(FeatureStore.open(cfg.store.root))


# Of 225 writes of the run: the root record, unit 1 (two shards, its record), unit 3, the duplicate-key pass and
# the statistics (189..), the joint statistics (216..), the run summary (223).
@pytest.mark.parametrize("after", [0, 3, 40, 140, 189, 200, 217, 223])
def test_disk_full_is_named_and_a_rerun_resumes(tmp_path, monkeypatch, reference, after):
    cfg = extract_config(tmp_path, write_tars(tmp_path, SIZES))
    full = _DiskFull(monkeypatch, after)
    with pytest.raises((StoreError, ExtractionError)) as e:
        run_extraction(cfg)
    msg = str(e.value)
    assert "no space left on the device" in msg and "rerun" in msg and "\n" not in msg, msg
    assert full.calls > after  # the failure really happened where asked
    monkeypatch.undo()
    if Path(cfg.store.root, "zarr.json").exists():
        problems = validate_store(cfg.store.root)  # nothing damaged: only what a rerun finishes
        assert all(p.what.startswith(("incomplete unit", "finalised statistics missing",
                                      "finalised statistics are stale")) for p in problems), problems
    summary = run_extraction(cfg)
    assert summary["errors"] == []
    assert validate_store(cfg.store.root) == []
    rows = all_rows(FeatureStore.open(cfg.store.root))
    assert rows.keys() == reference.keys()
    assert all((rows[k]["pixels"] == reference[k]["pixels"]).all() for k in rows)


def test_disk_full_in_the_writer_is_reported_not_the_statistics_merge(tmp_path, monkeypatch):
    cfg = extract_config(tmp_path, write_tars(tmp_path, SIZES))
    _DiskFull(monkeypatch, 30)
    with pytest.raises(ExtractionError, match="store writer failed: .*no space left on the device while writing"):
        run_extraction(cfg)


@pytest.mark.parametrize("which", ["unit", "teacher", "both"])
def test_torn_unit_metadata_is_redone(tmp_path, reference, which):
    cfg = extract_config(tmp_path, write_tars(tmp_path, SIZES))
    run_extraction(cfg)
    store = FeatureStore.open(cfg.store.root)
    unit = store.units()[1].name
    paths = {"unit": [f"units/{unit}/zarr.json"], "teacher": [f"units/{unit}/teachers/mocov3/zarr.json"]}
    paths["both"] = paths["unit"] + paths["teacher"]
    for p in paths[which]:
        f = Path(cfg.store.root, p)
        f.write_bytes(f.read_bytes()[:50])  # torn mid-write
    problems = validate_store(cfg.store.root)
    assert any(p.where == f"units/{unit}" for p in problems)
    summary = run_extraction(cfg)
    assert summary["tars_extracted"] == 1 and summary["tars_already_complete"] == 2
    assert validate_store(cfg.store.root) == []
    assert all_rows(FeatureStore.open(cfg.store.root)).keys() == reference.keys()


def test_torn_root_metadata_is_one_line(tmp_path, capsys):
    cfg = extract_config(tmp_path, write_tars(tmp_path, [2]))
    run_extraction(cfg)
    f = Path(cfg.store.root, "zarr.json")
    f.write_bytes(f.read_bytes()[:80])
    rc, line = _cli(tmp_path, cfg, capsys)
    assert rc == 2 and "zarr.json" in line and "torn" in line
    assert store_cli(["inspect", cfg.store.root]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("e, words", [
    (OSError(errno.ENOSPC, "x", "/s/a"), "/s/a: no space left"), (OSError(errno.EDQUOT, "x"), "no space left"),
    (PermissionError(errno.EACCES, "x", "/s/b"), "/s/b: permission denied"),
    (OSError(errno.EROFS, "x", "/s/c"), "read-only"), (FileExistsError(errno.EEXIST, "x", "/s"), "is a file"),
    (NotADirectoryError(errno.ENOTDIR, "x", "/s/d"), "a parent of /s/d"),
    (ValueError("Protocol not known: foo"), "unknown protocol"), (ImportError("no s3fs"), "not installed"),
    (OSError(errno.EIO, "I/O error"), "check the storage"),
    (type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})("no creds"), "credentials"),
])
def test_explain_names_the_path_and_the_remedy(e, words):
    msg = explain("/s", e)
    assert words in msg and "\n" not in msg


def test_unknown_errors_are_not_hidden():
    assert explain("/s", ValueError("a bug")) is None and explain("/s", KeyError("x")) is None


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, capsys, monkeypatch):
    """Found by the hostile run: on a full disk the O_EXCL create succeeded, the JSON write failed, and the
    empty lock file then refused every later run."""
    cfg = extract_config(tmp_path, write_tars(tmp_path, [2]))
    run_extraction(cfg)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.json, "dump", full)
    rc, line = _cli(tmp_path, cfg, capsys)
    assert rc == 2 and "no space left" in line
    assert not Path(cfg.store.root, "extract.lock").exists()
    monkeypatch.undo()
    assert run_extraction(cfg)["errors"] == []


@pytest.mark.parametrize("age, taken", [(5 * 60, True), (3600 * 24, True), (1, False)])
def test_an_empty_lock_is_taken_over_only_when_old(tmp_path, age, taken):
    import os
    import time
    cfg = extract_config(tmp_path, write_tars(tmp_path, [2]))
    run_extraction(cfg)
    f = Path(cfg.store.root, "extract.lock")
    f.write_bytes(b"")  # its writer died between creating and writing it (or is doing so right now)
    os.utime(f, (time.time() - age, time.time() - age))
    if taken:
        assert run_extraction(cfg)["errors"] == [] and not f.exists()
    else:
        with pytest.raises(StoreError, match="being written by another extraction"):
            run_extraction(cfg)


@pytest.mark.parametrize("run_dir, words", [("afile", "is a file"), ("afile/run", "a parent of")])
def test_distill_run_dir_errors_are_one_line(tmp_path, capsys, run_dir, words):
    from distill.cli import main as distill_main
    cfg = extract_config(tmp_path, write_tars(tmp_path, [4]))
    run_extraction(cfg)
    (tmp_path / "afile").write_text("x")
    toml = tmp_path / "p.toml"
    toml.write_text(dumps_toml(cfg))
    rc = distill_main(["train", "--config", str(toml), "--set", "train.steps=1", "--set", "heads.decoder_heads=2",
                       "--set", f'train.run_dir="{tmp_path / run_dir}"'])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("comad-distill train: error: train.run_dir") and words in line


def test_a_torn_array_in_a_complete_unit_is_refused_naming_the_unit(tmp_path):
    cfg = extract_config(tmp_path, write_tars(tmp_path, SIZES))
    run_extraction(cfg)
    store = FeatureStore.open(cfg.store.root)
    unit = store.units()[0].name
    Path(cfg.store.root, f"units/{unit}/teachers/ibot/patch/zarr.json").write_bytes(b"")
    assert [p.where for p in validate_store(cfg.store.root)] == [f"units/{unit}/teachers/ibot/patch"]
    with pytest.raises(StoreError, match=f"delete units/{unit} and rerun comad-extract") as e:
        FeatureStore.open(cfg.store.root).read_block(unit, 0, 2, 0)
    assert "\n" not in str(e.value)
    import shutil
    shutil.rmtree(Path(cfg.store.root, "units", unit))  # what the message says to do
    assert run_extraction(cfg)["tars_extracted"] == 1 and validate_store(cfg.store.root) == []


def test_distill_full_disk_while_writing_weights_is_one_line(tmp_path, capsys, monkeypatch):
    import safetensors
    import safetensors.torch
    from distill.cli import main as distill_main
    cfg = extract_config(tmp_path, write_tars(tmp_path, [10]))
    run_extraction(cfg)
    toml = tmp_path / "p.toml"
    toml.write_text(dumps_toml(cfg))

    def full(*a, **k):  # what safetensors raises on ENOSPC (its own type, not OSError)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    args = ["train", "--config", str(toml), "--set", "train.steps=1", "--set", "heads.decoder_heads=2"]
    assert distill_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left" in err.strip().splitlines()[-1]
    monkeypatch.undo()
    assert distill_main(args + ["--resume"]) == 0  # space back: the run goes on
