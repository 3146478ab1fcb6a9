"""Resume after a hard kill gives the store an uninterrupted run writes; a held lock refuses a second run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from _extract_fixtures import all_rows, extract_config, write_tars
from extract.pipeline import SUMMARY_GROUP, run_extraction
from store_schema.lock import LOCK_KEY
from store_schema.store import FeatureStore, StoreError, unit_name

HELPER = Path(__file__).resolve().parent / "_extract_subprocess.py"
REPO = Path(__file__).resolve().parents[1]
SIZES = [6, 5, 6, 4]  # 6 samples = one batch of 4 + one of 2: a kill can land between a unit's writes


def complete_units(root: Path) -> int:
    if not (root / "zarr.json").exists():
        return 0
    try:
        with warnings.catch_warnings():  # the writer's temporary *.partial files show up in listings
            warnings.simplefilter("ignore")
            return len(FeatureStore.open(str(root)).units())
    except Exception:  # noqa: BLE001 — metadata being written at this instant: ask again
        return 0


def assert_stores_equal(a: FeatureStore, b: FeatureStore, teachers) -> None:
    assert [(u.name, u.source, u.n_samples) for u in a.units()] == [(u.name, u.source, u.n_samples) for u in b.units()]
    for u in a.units():
        assert a.unit_record(u.name)["keys"] == b.unit_record(u.name)["keys"]
    ra, rb = all_rows(a), all_rows(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        for f in ("index", "label", "views", "student_idx", "pixels"):
            np.testing.assert_array_equal(ra[k][f], rb[k][f])
        for t in teachers:
            for f in ("idx", "patch", "cls"):
                np.testing.assert_array_equal(ra[k]["teachers"][t][f], rb[k]["teachers"][t][f])
    for t in teachers:
        sa, sb = a.teacher_stats(t), b.teacher_stats(t)
        assert sa.count == sb.count
        np.testing.assert_array_equal(sa.mean, sb.mean)
        np.testing.assert_array_equal(sa.m2, sb.m2)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    tars = write_tars(tmp_path, SIZES)
    store_root = tmp_path / "store"
    child = subprocess.Popen([sys.executable, str(HELPER), "slow-run", str(tmp_path), "0.4", *map(str, tars)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    try:
        while complete_units(store_root) == 0:
            assert child.poll() is None, f"extraction ended before it could be killed:\n{child.stdout.read()}"
            assert time.time() < deadline, "no unit completed in time"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    done_at_kill = complete_units(store_root)
    assert 1 <= done_at_kill < len(tars), "the kill must land mid-run for this test to mean anything"
    assert (store_root / LOCK_KEY).exists()  # the killed run could not release it

    cfg = extract_config(tmp_path, tars)
    summary = run_extraction(cfg)  # takes over the dead process's lock, redoes only incomplete units
    assert summary["tars_already_complete"] == done_at_kill
    assert summary["tars_extracted"] == len(tars) - done_at_kill and summary["errors"] == []
    reference_cfg = extract_config(tmp_path, tars, [f'store.root="{tmp_path / "reference"}"'])
    run_extraction(reference_cfg)

    resumed, reference = FeatureStore.open(str(store_root)), FeatureStore.open(reference_cfg.store.root)
    assert_stores_equal(resumed, reference, list(cfg.teachers))
    # validate-style checks: every unit complete with every sample of its tar, nothing left half-written
    units = resumed.units(complete_only=False)
    assert len(units) == len(tars) and all(u.complete for u in units)
    for tar, n in zip(tars, SIZES):
        name = unit_name(str(tar))
        assert resumed.unit_info(name).n_samples == n
        assert resumed.array(f"units/{name}/student_pixels").shape[0] == n
        for t in cfg.teachers:
            assert resumed.array(f"units/{name}/teachers/{t}/patch").shape[:2] == (n, cfg.views.num_views)
    assert resumed.skipped() == [] and not (store_root / LOCK_KEY).exists()
    assert not list(store_root.rglob("*.partial"))  # the killed writer's temporary files went with its units
    assert len(dict(resumed.group[SUMMARY_GROUP].attrs)["runs"]) == 1  # the killed run never got to its summary


@pytest.mark.slow
def test_second_extraction_refused_while_lock_is_held(tmp_path):
    tars = write_tars(tmp_path, [2])
    cfg = extract_config(tmp_path, tars)
    run_extraction(cfg)
    holder = subprocess.Popen([sys.executable, str(HELPER), "hold-lock", cfg.store.root], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"being written by another extraction \(host .*, pid {holder.pid}"):
            run_extraction(cfg)
    finally:
        holder.kill()
        holder.wait()
    summary = run_extraction(cfg)  # the holder is dead: its lock is taken over
    assert summary["tars_already_complete"] == 1


def test_temporaries_of_a_killed_writer_are_ignored_then_removed(tmp_path, caplog):
    # A kill while zarr writes a parent's zarr.json leaves `zarr.<uuid hex>.partial` beside it (CI saw one in
    # units/, read as a fifth unit). Plant them where that happens, with the dead writer's lock, and rerun.
    tars = write_tars(tmp_path, [3, 2])
    cfg = extract_config(tmp_path, tars)
    run_extraction(cfg)
    root = Path(cfg.store.root)
    before = FeatureStore.open(str(root)).units()
    unit = root / "units" / unit_name(str(tars[0]))
    debris = [root / f"zarr.{'a' * 32}.partial", root / "units" / f"zarr.{'b' * 32}.partial",
              unit / f"zarr.{'c' * 32}.partial", unit / "teachers" / f"zarr.{'d' * 32}.partial"]
    for p in debris:
        p.write_bytes(b'{"zarr_format": 3, "node_')  # torn, as a kill mid-write leaves it
    keep = root / "units" / "notes.partial"  # not zarr's temporary name: not ours to delete
    keep.write_text("a user's file")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / LOCK_KEY).write_text(f'{{"host": "{os.uname().nodename}", "pid": {int(dead.stdout)}, "run_id": "x"}}')

    assert FeatureStore.open(str(root)).units() == before  # readers see no extra unit
    assert [u.name for u in FeatureStore.open(str(root)).units(complete_only=False)] == [u.name for u in before]
    with caplog.at_level("WARNING", logger="comad.extract"):
        summary = run_extraction(cfg)
    assert summary["tars_already_complete"] == 2 and summary["errors"] == []
    assert not any(p.exists() for p in debris) and keep.exists()
    assert "removed 4 temporary file(s) a killed writer left behind" in caplog.text
    assert FeatureStore.open(str(root)).units() == before and not (root / LOCK_KEY).exists()
