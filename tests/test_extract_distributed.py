"""torchrun with 2 processes (gloo) writes the store a single process writes, each unit by one process."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _extract_fixtures import FORMATS, all_rows, extract_config, write_tars
from conftest import PIPELINE_TOML, tiny_overrides
from extract.pipeline import SUMMARY_GROUP, ExtractionError, run_extraction
from store_schema.store import FeatureStore, unit_name

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_extract(tmp_path: Path, tars: list[Path], store: str) -> subprocess.CompletedProcess:
    urls = "[" + ", ".join(f'"{t}"' for t in tars) + "]"
    sets = tiny_overrides(tmp_path) + [f"data.urls={urls}", f'store.root="{tmp_path / store}"',
                                       'store.dtype="float32"', "data.max_failure_fraction=1.0"]
    sets += [f'teachers.{t}.format="{fmt}"' for t, fmt in FORMATS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "extract", "--config", str(PIPELINE_TOML)]
    cmd += [a for s in sets for a in ("--set", s)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_processes_write_the_store_one_process_writes(tmp_path):
    tars = write_tars(tmp_path, [4, 3, 5, 2, 3])  # 5 tars: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
    extract_config(tmp_path, tars)  # the teacher checkpoints
    r = torchrun_extract(tmp_path, tars, "dist")
    assert r.returncode == 0, r.stdout + r.stderr
    single = extract_config(tmp_path, tars, ['store.dtype="float32"', f'store.root="{tmp_path / "single"}"'])
    run_extraction(single)

    a, b = FeatureStore.open(str(tmp_path / "dist")), FeatureStore.open(single.store.root)
    assert [(u.name, u.source, u.n_samples) for u in a.units()] == [(u.name, u.source, u.n_samples) for u in b.units()]
    ra, rb = all_rows(a), all_rows(b)
    assert ra.keys() == rb.keys() and len(ra) == 17 * single.views.num_views
    for k in ra:
        for f in ("index", "label", "views", "student_idx", "pixels"):
            np.testing.assert_array_equal(ra[k][f], rb[k][f])
        for t in single.teachers:
            np.testing.assert_array_equal(ra[k]["teachers"][t]["idx"], rb[k]["teachers"][t]["idx"])
            for f in ("patch", "cls"):
                np.testing.assert_allclose(ra[k]["teachers"][t][f], rb[k]["teachers"][t][f], rtol=1e-5, atol=1e-6)
    for t in single.teachers:
        sa, sb = a.teacher_stats(t), b.teacher_stats(t)
        assert sa.count == sb.count
        np.testing.assert_allclose(sa.mean, sb.mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sa.cov, sb.cov, rtol=1e-6, atol=1e-9)

    (summary,) = dict(a.group[SUMMARY_GROUP].attrs)["runs"]
    assert summary["world_size"] == 2 and summary["images"] == 17 and summary["errors"] == []
    by_rank = summary["units_by_rank"]  # each unit written by exactly the process that owns its tar
    assert sorted(by_rank["0"]) == sorted(unit_name(str(t)) for t in tars[0::2])
    assert sorted(by_rank["1"]) == sorted(unit_name(str(t)) for t in tars[1::2])
    assert "extraction: 17 images (34 views) from 5 tars" in r.stderr  # rank 0's closing summary

    # A tar of rank 1 is missing: both processes finish, rank 0 reports it, and the run fails (no hang).
    missing = tmp_path / "data" / "gone.tar"
    r = torchrun_extract(tmp_path, tars + [missing], "dist")  # 6 tars: the new one is rank 1's
    assert r.returncode != 0
    assert "gone.tar" in r.stderr and "rerun" in r.stderr, r.stderr
    a = FeatureStore.open(str(tmp_path / "dist"))
    assert len(a.units()) == 5 and not a.is_complete(str(missing))
    with pytest.raises(ExtractionError, match="gone.tar"):  # one process agrees
        run_extraction(extract_config(tmp_path, tars + [missing], ['store.dtype="float32"',
                                                                   f'store.root="{tmp_path / "single"}"']))
