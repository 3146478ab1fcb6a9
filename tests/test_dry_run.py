"""`comad-extract --dry-run` (issue 12, item 7): teachers loaded strictly and described, inputs counted, the
store's size as the real extraction then writes it, a time estimate; nothing written."""
from __future__ import annotations

import json

import torch
from _extract_fixtures import extract_config, write_tars
from conftest import PIPELINE_TOML, tiny_overrides
from wds_fixtures import good_samples, write_tar

from extract.cli import main as extract_main
from extract.dry_run import count_samples, dry_run
from extract.pipeline import run_extraction
from store_schema.inspection import inspect_store
from vit_layers.checkpoints import load_teacher


def _argv(tmp_path, tars, extra=()):
    over = tiny_overrides(tmp_path) + ["data.urls=" + json.dumps([str(t) for t in tars]),
                                       'teachers.mae.format="mae"', 'teachers.mocov3.format="mocov3"',
                                       'teachers.ibot.format="ibot"', *extra]
    return ["--config", str(PIPELINE_TOML), *[a for o in over for a in ("--set", o)], "--dry-run"]


def test_dry_run_describes_teachers_and_inputs_and_writes_nothing(tmp_path, capsys):
    tars = write_tars(tmp_path, [5, 3, 4])
    cfg = extract_config(tmp_path, tars)  # writes the teacher checkpoints
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert extract_main(_argv(tmp_path, tars)) == 0
    out = capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no store, no lock, no file
    for name, tc in cfg.teachers.items():
        model, sha = load_teacher(tc, cfg.data.image_size, cfg.data.patch_size)
        params = sum(p.numel() for p in model.parameters())
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert f"{params:,} parameters" in line and sha[:16] in line and f"({tc.format}:" in line
    assert "inputs: 3 tars; 3 counted (5, 3, 4 samples) -> about 12 images, 24 views" in out
    assert "time: decoding" in out and "per image" in out


def test_dry_run_size_is_what_the_extraction_then_stores(tmp_path):
    tars = write_tars(tmp_path, [5, 3, 4])
    for dtype in ("float16", "int8"):
        cfg = extract_config(tmp_path, tars, [f'store.dtype="{dtype}"'], store=f"store-{dtype}")
        plan = dry_run(cfg)
        assert plan.images_estimate == 12 and plan.sampled == {str(t): n for t, n in zip(tars, [5, 3, 4])}
        run_extraction(cfg)
        info = inspect_store(cfg.store.root)
        assert info["samples"] == 12
        assert plan.total_bytes == info["decoded_bytes"]  # every array the store holds, byte for byte
        assert plan.decode_s_per_image > 0 and plan.forward_s_per_image > 0 and plan.seconds_estimate > 0


def test_sample_count_groups_members_like_the_reader(tmp_path):
    samples = good_samples(3) + [{"__key__": "only_text", "txt": "no image"}]  # still a sample group
    tar = write_tar(tmp_path / "a.tar", samples)
    assert count_samples(str(tar), None) == 4
    assert count_samples(f"pipe:cat {tar}", None) == 4


def test_dry_run_refuses_a_bad_teacher_in_one_line(tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    extract_config(tmp_path, tars)
    torch.save({"model": {"nonsense": torch.zeros(1)}}, tmp_path / "ckpt" / "mae.pth")
    assert extract_main(_argv(tmp_path, tars)) == 2
    err = capsys.readouterr().err
    assert "teachers.mae" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


def test_dry_run_names_an_unreadable_input(tmp_path, capsys):
    tars = write_tars(tmp_path, [2])
    extract_config(tmp_path, tars)
    missing = tmp_path / "data" / "missing.tar"
    assert extract_main(_argv(tmp_path, [tars[0], missing])) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
