"""Stage 1 end to end on tiny tars and tiny teachers: contents, determinism, statistics, summary, CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_fixtures import all_rows, decoded, extract_config, write_tars

from extract.cli import main as cli_main
from extract.masks import draw_masks
from extract.pipeline import SUMMARY_GROUP, ExtractionError, run_extraction
from extract.views import ViewParams, apply_view, draw_view
from store_schema.store import FeatureStore, unit_name
from store_schema.writer import UnitWriter
from vit_layers.checkpoints import load_teacher
from vit_layers.forward import forward_visible, patchify

SIZES = [5, 3, 6]  # samples per tar; batch_size 8 with 2 views = 4 samples per forward, so tars span batches


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    tars = write_tars(tmp, SIZES)
    cfg = extract_config(tmp, tars, ['store.dtype="float32"'])
    summary = run_extraction(cfg)
    return tmp, tars, cfg, summary, FeatureStore.open(cfg.store.root)


def test_every_sample_stored_with_its_source(extracted):
    _, tars, cfg, _, store = extracted
    rows = all_rows(store)
    assert len(rows) == sum(SIZES) * cfg.views.num_views
    assert {u.source for u in store.units()} == {str(t) for t in tars} and all(u.complete for u in store.units())
    for tar in tars:
        samples = decoded(tar)
        rec = store.unit_record(unit_name(str(tar)))
        assert rec["keys"] == list(samples) and rec["skipped"] == [] and rec["n_samples"] == len(samples)
        for key, s in samples.items():
            for v in range(cfg.views.num_views):
                row = rows[(key, v)]
                assert row["source"] == str(tar) and row["index"] == s.index and row["label"] == s.label
    assert store.skipped() == []


def test_views_masks_and_student_pixels_replay(extracted):
    _, tars, cfg, _, store = extracted
    rows = all_rows(store)
    S, p = cfg.data.image_size, cfg.data.patch_size
    for tar in tars:
        for key, s in decoded(tar).items():
            for v in range(cfg.views.num_views):
                row = rows[(key, v)]
                params = draw_view(cfg, key, v, *s.image.size)
                np.testing.assert_array_equal(row["views"], params.to_array())
                masks = draw_masks(cfg, key, v)
                np.testing.assert_array_equal(row["student_idx"], masks.student)
                for t in cfg.teachers:
                    np.testing.assert_array_equal(row["teachers"][t]["idx"], masks.teachers[t])
                image = apply_view(s.image, ViewParams.from_array(row["views"]), S, cfg.views.interpolation)
                expect = patchify(image[None], p)[0][torch.from_numpy(masks.student)]
                np.testing.assert_array_equal(row["pixels"], expect.numpy())


def test_teacher_features_equal_forward_visible(extracted):
    _, tars, cfg, _, store = extracted
    rows = all_rows(store)
    views, idx, stored = [], {t: [] for t in cfg.teachers}, []
    for tar in tars:
        for key, s in decoded(tar).items():
            for v in range(cfg.views.num_views):
                row = rows[(key, v)]
                views.append(apply_view(s.image, ViewParams.from_array(row["views"]), cfg.data.image_size,
                                        cfg.views.interpolation))
                stored.append(row["teachers"])
                for t in cfg.teachers:
                    idx[t].append(torch.from_numpy(row["teachers"][t]["idx"]))
    images = torch.stack(views).float() / 255  # every (sample, view) in one forward per teacher
    for t, tc in cfg.teachers.items():
        model, sha = load_teacher(tc, cfg.data.image_size, cfg.data.patch_size)
        assert store.teacher_meta(t).weights_sha256 == sha
        x = (images - torch.tensor(tc.mean).view(1, 3, 1, 1)) / torch.tensor(tc.std).view(1, 3, 1, 1)
        with torch.no_grad():
            cls, patch = forward_visible(model, x, torch.stack(idx[t]))
        np.testing.assert_allclose(np.stack([r[t]["patch"] for r in stored]), patch.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.stack([r[t]["cls"] for r in stored]), cls.numpy(), rtol=1e-4, atol=1e-5)


def test_statistics_equal_numpy_over_stored_features(extracted):
    _, _, cfg, summary, store = extracted
    rows = all_rows(store)
    for t in cfg.teachers:
        x = np.concatenate([r["teachers"][t]["patch"] for r in rows.values()]).astype(np.float64)
        stats = store.teacher_stats(t)
        assert stats.count == len(x) == sum(SIZES) * cfg.views.num_views * cfg.teacher_tokens(t)
        assert summary["stats_count"][t] == stats.count
        np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-9)
        assert f"stats/{t}" in store.group  # finalised, not merged on the fly


def test_summary_numbers_and_record(extracted):
    tmp, tars, cfg, summary, store = extracted
    n = sum(SIZES)
    assert summary["images"] == summary["store_images"] == n and summary["views"] == 2 * n
    assert summary["tars"] == summary["tars_extracted"] == len(tars) and summary["tars_already_complete"] == 0
    assert summary["skipped"] == 0 and summary["tars_failed"] == [] and summary["errors"] == []
    on_disk = sum(f.stat().st_size for u in store.units() for f in (tmp / "store" / "units" / u.name).rglob("*")
                  if f.is_file())
    assert summary["bytes_written"] == on_disk > 0
    assert summary["images_per_s"] > 0 and summary["seconds"] > 0
    assert sorted(summary["units_by_rank"]["0"]) == sorted(unit_name(str(t)) for t in tars)
    runs = dict(store.group[SUMMARY_GROUP].attrs)["runs"]
    assert runs[-1]["run_id"] == summary["run_id"] and runs[-1]["images"] == n
    assert not (tmp / "store" / "extract.lock").exists()  # released


def test_same_config_twice_gives_identical_store(extracted, tmp_path):
    tmp, tars, cfg, _, store = extracted
    # Another store, and DataLoader workers this time: decoding in worker processes must not change anything.
    again = extract_config(tmp, tars, ['store.dtype="float32"', f'store.root="{tmp_path / "again"}"',
                                       "data.num_workers=2"])
    run_extraction(again)
    a, b = all_rows(store), all_rows(FeatureStore.open(again.store.root))
    assert a.keys() == b.keys()
    for k in a:
        for f in ("index", "label", "views", "student_idx", "pixels"):
            np.testing.assert_array_equal(a[k][f], b[k][f])
        for t in cfg.teachers:
            for f in ("idx", "patch", "cls"):
                np.testing.assert_array_equal(a[k]["teachers"][t][f], b[k]["teachers"][t][f])


def test_rerun_of_complete_store_resumes_without_work(extracted):
    _, tars, cfg, _, store = extracted
    before = all_rows(store)
    summary = run_extraction(cfg)
    assert summary["tars_already_complete"] == len(tars) and summary["images"] == 0
    assert summary["store_images"] == sum(SIZES)
    after = all_rows(FeatureStore.open(cfg.store.root))
    assert before.keys() == after.keys()


def test_writer_thread_failure_stops_the_run(tmp_path, monkeypatch):
    tars = write_tars(tmp_path, [3, 3])

    def broken(self, rows):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(UnitWriter, "append", broken)
    with pytest.raises(ExtractionError, match="store writer failed: OSError: disk full"):
        run_extraction(extract_config(tmp_path, tars))
    store = FeatureStore.open(str(tmp_path / "store"))
    assert store.units() == []  # nothing marked complete


def test_cli_exit_codes(tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    cfg = extract_config(tmp_path, tars)  # writes the teacher checkpoints
    toml = Path(__file__).resolve().parents[1] / "pipeline.toml"
    from conftest import tiny_overrides
    sets = [a for o in tiny_overrides(tmp_path) + [f'data.urls=["{tars[0]}"]', 'teachers.mae.format="mae"',
                                                    'teachers.mocov3.format="mocov3"', 'teachers.ibot.format="ibot"']
            for a in ("--set", o)]
    assert cli_main(["--config", str(toml), *sets]) == 0
    assert FeatureStore.open(cfg.store.root).units()[0].n_samples == 2
    # the same store with another seed: refused, the differing field named, exit 2
    assert cli_main(["--config", str(toml), *sets, "--set", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "Traceback" not in err
    assert cli_main(["--config", str(toml), *sets, "--set", f'teachers.mae.weights="{tmp_path}/nope.pth"']) == 2
    assert "teachers.mae" in capsys.readouterr().err
    # python -m extract: a config error is a message and exit 2
    r = subprocess.run([sys.executable, "-m", "extract", "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "missing.toml" in r.stderr and "Traceback" not in r.stderr
