"""Extraction survives a hard kill at each of its fault points, refuses a second writer, and reports failures.

Kill tests: `python -m extract` runs in a subprocess with COMAD_FAULT=<point>:<n> (store_schema/faults.py:
SIGKILL at the n-th hit), then the same command line runs again without it. The resumed store must
validate and equal an uninterrupted run's bit for bit (stats to 1e-12), with no sample lost or
duplicated. Only the runs that must die or run concurrently are subprocesses: the reruns, the reference
and `comad-store validate` call the same CLI entry points in this process (a subprocess spends seconds
importing torch and timm). Tiny data: 3 tars of 6 images, 2 views, 2 samples per teacher batch, shards
of 4 samples (2 shard writes per unit), one DataLoader worker (so `decode` runs in a worker process).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _extract_fixtures import all_rows, decoded, extract_config, write_tars
from extract.cli import main as extract_cli
from extract.pipeline import ExtractionError, run_extraction
from store_schema.cli import main as store_cli
from store_schema.config import dumps_toml
from store_schema.lock import LOCK_KEY
from store_schema.store import FeatureStore, unit_name
from store_schema.inspection import RUNS_GROUP, inspect_store
from store_schema.validate import validate_store
from store_schema.writer import UnitWriter
from store_fixtures import make_rows, teacher_meta
from wds_fixtures import good_samples, write_tar

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "_extract_subprocess.py"
SIZES = [6, 6, 6]
# point -> (n, units complete when the process dies). The run makes 18 decodes, 27 teacher forwards
# (9 batches x 3 teachers), 6 shard writes, 3 commits and 3 statistics merges (one per teacher).
KILLS = {
    # sample 2 of tar 3: the worker runs at most 2 batches ahead, so tar 1's commit is queued (and drained)
    "decode": (14, {1, 2}),
    # batch 2 of tar 3: the writer thread may lag behind the teachers, so any unit but the last may be done
    "teacher_forward": (23, {0, 1, 2}),
    "shard_write": (3, {1}),  # the first shard of tar 2
    "between_units": (1, {1}),  # right after tar 1's commit
    "stats_merge": (2, {3}),  # every unit complete; statistics written for 2 of the 3 teachers
}


def extract_args(config: Path, store: Path) -> list[str]:
    """The comad-extract command line (after the program name) for `store`."""
    return ["--config", str(config), "--set", f'store.root="{store}"']


def no_fault_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "COMAD_FAULT"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tars, a config file for the CLI, the keys the tars hold, an uninterrupted run's store, and every
    fault point's killed run (started together: their torch/timm imports dominate and overlap well)."""
    tmp = tmp_path_factory.mktemp("reliability")
    tars = write_tars(tmp, SIZES)
    cfg = extract_config(tmp, tars, ["data.num_workers=1", "data.batch_size=4", "store.chunk_samples=2",
                                     "store.shard_samples=4"])
    config = tmp / "extract.toml"
    config.write_text(dumps_toml(cfg))
    killed = {point: subprocess.Popen([sys.executable, "-m", "extract", *extract_args(config, tmp / f"killed-{point}")],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**no_fault_env(), "COMAD_FAULT": f"{point}:{n}"})
              for point, (n, _) in KILLS.items()}
    try:
        assert extract_cli(extract_args(config, tmp / "reference")) == 0
        keys = {k for t in tars for k in decoded(t)}
        assert len(keys) == sum(SIZES)
        yield SimpleNamespace(tmp=tmp, config=config, cfg=cfg, keys=keys, killed=killed,
                              reference=FeatureStore.open(str(tmp / "reference")))
    finally:
        for proc in killed.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def complete_units(root: Path) -> int:
    return len(FeatureStore.open(str(root)).units()) if (root / "zarr.json").exists() else 0


def assert_same_store(store: FeatureStore, ref: FeatureStore, expected_keys: set[str]) -> tuple[int, int]:
    """Same units, keys, rows (bitwise) and statistics (1e-12); returns (samples lost, samples duplicated)."""
    described = lambda s: [(u.name, u.source, u.n_samples, u.complete, u.excluded_rows)  # noqa: E731
                           for u in s.units(complete_only=False)]
    assert described(store) == described(ref)
    for u in ref.units():
        assert store.keys(u.name) == ref.keys(u.name)
    rows, ref_rows = all_rows(store), all_rows(ref)
    assert rows.keys() == ref_rows.keys()
    for k, want in ref_rows.items():
        got = rows[k]
        for f in ("index", "label", "views", "student_idx", "pixels"):
            np.testing.assert_array_equal(got[f], want[f], err_msg=f"{k} {f}")
        for t, arrays in want["teachers"].items():
            for f, a in arrays.items():
                np.testing.assert_array_equal(got["teachers"][t][f], a, err_msg=f"{k} {t} {f}")
    for t in ref.teachers:
        s, r = store.teacher_stats(t), ref.teacher_stats(t)
        assert s.count == r.count
        np.testing.assert_allclose(s.mean, r.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.m2, r.m2, rtol=1e-12, atol=1e-12)
    stored = [k for u in store.units() for r, k in enumerate(store.keys(u.name)) if r not in u.excluded_rows]
    return len(expected_keys - set(stored)), len(stored) - len(set(stored))


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILLS))
def test_killed_extraction_resumes_to_the_uninterrupted_store(data, point, capsys):
    n, complete_at_kill = KILLS[point]
    root = data.tmp / f"killed-{point}"
    killed = data.killed[point]
    output, _ = killed.communicate(timeout=240)
    if point == "decode":
        # The worker dies by SIGKILL; the main process notices at once and stops with a clear error (exit 1).
        assert killed.returncode == 1, output
        assert "comad-extract: a decoding worker died" in output and "killed by signal: Killed" in output
    else:
        assert killed.returncode == -signal.SIGKILL, output
        assert (root / LOCK_KEY).exists()  # no cleanup ran: the lock is left for the rerun to take over
    done_at_kill = complete_units(root)
    assert done_at_kill in complete_at_kill
    assert store_cli(["validate", str(root)]) in (0, 1)  # the interrupted store gets a report, never a crash

    assert extract_cli(extract_args(data.config, root)) == 0  # the same command line, without the fault
    capsys.readouterr()
    assert store_cli(["validate", str(root)]) == 0, capsys.readouterr().out
    store = FeatureStore.open(str(root))
    lost, duplicated = assert_same_store(store, data.reference, data.keys)
    assert (lost, duplicated) == (0, 0)
    last = inspect_store(str(root))["last_run"]
    assert (last["tars_already_complete"], last["tars_extracted"]) == (done_at_kill, 3 - done_at_kill)
    assert last["errors"] == [] and last["store_images"] == sum(SIZES)
    assert store.skipped() == [] and not (root / LOCK_KEY).exists()
    assert not list(root.rglob("*.partial"))  # temporary files of the killed writes went with their units
    with capsys.disabled():
        print(f"\n[reliability] {point}:{n} -> exit {killed.returncode}, {done_at_kill}/3 units complete at the "
              f"kill; resumed: {lost} samples lost, {duplicated} duplicated, store equal to the uninterrupted one")


@pytest.mark.slow
def test_second_extraction_on_the_same_store_is_refused(data, capsys):
    root, gate = data.tmp / "concurrent", data.tmp / "concurrent.go"
    first = subprocess.Popen([sys.executable, str(HELPER), "gated-cli", str(gate), *extract_args(data.config, root)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=no_fault_env())
    try:
        deadline = time.time() + 120
        while not (root / LOCK_KEY).exists():  # the first run holds the lock; its teachers wait for the gate
            assert first.poll() is None, f"the first extraction ended early:\n{first.stdout.read()}"
            assert time.time() < deadline, "the first extraction never took the lock"
            time.sleep(0.05)
        capsys.readouterr()
        assert extract_cli(extract_args(data.config, root)) == 2
        err = capsys.readouterr().err
        assert f"is being written by another extraction (host {socket.gethostname()}, pid {first.pid}" in err
        assert err.startswith("comad-extract: error: ") and "Two writers would corrupt it" in err
        gate.touch()
        out, _ = first.communicate(timeout=240)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, out
    assert store_cli(["validate", str(root)]) == 0
    assert assert_same_store(FeatureStore.open(str(root)), data.reference, data.keys) == (0, 0)
    assert inspect_store(str(root))["runs"] == 1  # the refused run recorded nothing


def test_unit_writer_fail_drops_the_rows_and_records_the_reason(tmp_path, tiny_cfg, capsys):
    store = FeatureStore.create(tiny_cfg.store.root, tiny_cfg, teacher_meta(tiny_cfg))
    url, rng = "s3://bucket/shard-000007.tar", np.random.default_rng(0)
    keys = [f"k{i}" for i in range(11)]
    w = UnitWriter(store, url)
    w.append(make_rows(tiny_cfg, keys[:9], rng))  # one whole shard (8 rows) is on disk already
    w.fail("cannot read input tar: connection reset")
    name = unit_name(url)
    assert list(store.group[f"units/{name}"].array_keys()) == [] and store.units() == []
    assert not store.is_complete(url)
    assert store.skipped() == [{"unit": name, "source": url, "index": 0, "key": None,
                                "reason": "cannot read input tar: connection reset"}]
    problems = [str(p) for p in validate_store(tiny_cfg.store.root) if p.where.startswith("units/")]
    assert problems == [f"units/{name}: failed unit: its input tar was not read: source {url}: cannot read input "
                        "tar: connection reset; readers ignore it; fix the cause and rerun comad-extract to retry it"]
    assert store_cli(["validate", tiny_cfg.store.root]) == 1
    assert f"source {url}: cannot read input tar" in capsys.readouterr().out

    w = UnitWriter(store, url)  # a rerun redoes the unit from scratch
    w.append(make_rows(tiny_cfg, keys, rng))
    assert w.commit().complete and store.skipped() == []
    store.finalize_stats()
    assert validate_store(tiny_cfg.store.root) == []


def test_inspect_and_validate_show_a_failed_tar_and_the_last_run(tmp_path, capsys):
    tars = write_tars(tmp_path, [3]) + [tmp_path / "data" / "missing.tar"]
    cfg = extract_config(tmp_path, tars)
    with pytest.raises(ExtractionError, match="input tar not read"):
        run_extraction(cfg)
    root, failed = cfg.store.root, unit_name(str(tars[1]))

    problems = validate_store(root)
    assert [p.where for p in problems] == [f"units/{failed}"]
    assert f"source {tars[1]}: cannot open input tar" in problems[0].what
    capsys.readouterr()
    assert store_cli(["validate", root]) == 1
    assert f"units/{failed}: failed unit" in capsys.readouterr().out

    info = inspect_store(root)
    assert info["units"]["incomplete_units"] == [
        {"unit": failed, "source": str(tars[1]), "status": "failed", "reason": info["skipped"][0]["reason"]}]
    assert info["runs"] == 1 and info["last_run"]["tars_extracted"] == 1
    assert "missing.tar" in info["last_run"]["errors"][0]
    assert store_cli(["inspect", root]) == 0
    text = capsys.readouterr().out
    assert f"failed      {failed}  {tars[1]}: cannot open input tar" in text
    assert "skipped     1 inputs" in text and f"  {tars[1]} #0 None: cannot open input tar" in text
    assert "last run    " in text and "(1 run(s) recorded)" in text
    assert "  tars      2: 1 extracted, 0 already complete, 1 failed" in text
    assert "  error     input tar not read" in text

    write_tar(tars[1], good_samples(2, start=100))  # the tar appears: the rerun retries it
    run_extraction(cfg)
    assert validate_store(root) == []
    info = inspect_store(root)
    assert info["runs"] == 2 and info["last_run"]["tars_already_complete"] == 1 and info["skipped"] == []

    store = FeatureStore.open(root, mode="r+")  # a damaged summary record is a problem, not a crash
    store.group[RUNS_GROUP].attrs.put({"runs": "not a list"})
    assert [(p.where, p.what.split(":")[0]) for p in validate_store(root)] == \
        [(RUNS_GROUP, "run summaries are not a list of records")]
