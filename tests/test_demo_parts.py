"""The offline demo's parts: digits shards, teacher fixtures (train, save, strict load, cache), config, report."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from distill.demo.digits_data import digits_images, stratified_split, write_digits_shards
from distill.demo.run_demo import DEMO_TOML, DemoError, path_overrides, prepare_out_dir
from distill.demo.teacher_fixtures import (
    OBJECTIVES,
    FixtureRecipe,
    ensure_teachers,
    fixture_key,
    knn_accuracy,
    linear_cka,
    mocov3_sincos_pos_embed,
    teacher_features,
    train_teacher,
)
from distill.report import ModelResult, accuracy_columns, format_table, read_metrics, write_report_png
from store_schema.config import load_config
from store_schema.shards import Sample, iter_tar
from vit_layers.checkpoints import build_vit, load_teacher, state_dict_sha256
from vit_layers.positions import sincos_pos_embed_2d

REPO = Path(__file__).resolve().parents[1]
SHORT = FixtureRecipe(batch_size=16, mae_steps=2, mocov3_steps=2, ibot_steps=2)


@pytest.fixture(scope="module")
def digits():
    return digits_images(32)


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config(DEMO_TOML)


# ----------------------------------------------------------------------------------------------
# Data


def test_shards_hold_every_digit_once_with_its_label_and_pixels(tmp_path, digits):
    images, labels = digits
    s = write_digits_shards(tmp_path, size=32, test_fraction=0.2, seed=0, train_shards=4, test_shards=2)
    assert len(s.train_urls) == 4 and len(s.test_urls) == 2
    seen: dict[str, list[int]] = {"train": [], "test": []}
    for split, urls in (("train", s.train_urls), ("test", s.test_urls)):
        for url in urls:
            samples = list(iter_tar(url, 10**8))  # the pipeline's own tar reader
            assert samples and all(isinstance(x, Sample) for x in samples)
            for x in samples:
                i = int(x.key.removeprefix("digit-"))
                assert x.label == labels[i]
                assert np.array_equal(np.asarray(x.image), images[i])
                seen[split].append(i)
    assert sorted(seen["train"] + seen["test"]) == list(range(1797))  # all, each once
    assert not set(seen["train"]) & set(seen["test"])
    assert seen["train"] == list(s.train_index) and seen["test"] == list(s.test_index)
    assert len(seen["test"]) == 360


def test_split_is_stratified_and_seeded(digits):
    _, labels = digits
    train, test = stratified_split(labels, 0.2, seed=0)
    per_class, test_counts = Counter(labels.tolist()), Counter(labels[test].tolist())
    for c, n in per_class.items():
        assert abs(test_counts[c] - 0.2 * n) <= 1, (c, test_counts[c], n)
    again, _ = stratified_split(labels, 0.2, seed=0)
    other, _ = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_shards_are_reproducible_bytes_and_stale_shards_go(tmp_path):
    a = write_digits_shards(tmp_path / "a", size=16, test_fraction=0.2, seed=0, train_shards=3, test_shards=1)
    (tmp_path / "b").mkdir()
    stale = tmp_path / "b" / "digits-train-000007.tar"
    stale.write_bytes(b"old")
    b = write_digits_shards(tmp_path / "b", size=16, test_fraction=0.2, seed=0, train_shards=3, test_shards=1)
    for x, y in zip(a.train_urls + a.test_urls, b.train_urls + b.test_urls):
        assert Path(x).read_bytes() == Path(y).read_bytes()
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# Config


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and not k.endswith("arch_kwargs"):
            out |= _keys(v, prefix + k + ".")
    return out


def test_demo_toml_has_exactly_pipeline_toml_keys_and_demo_sizes(demo_cfg):
    ref = tomllib.loads((REPO / "pipeline.toml").read_text())
    demo = tomllib.loads(DEMO_TOML.read_text())
    assert _keys(demo) == _keys(ref)
    c = demo_cfg
    assert (c.data.image_size, c.data.patch_size, c.num_patches) == (32, 4, 64)
    assert c.views.num_views == 2
    assert {t.format for t in c.teachers.values()} == set(OBJECTIVES)
    student = c.student.arch_kwargs
    for t in c.teachers.values():  # the student is smaller than every teacher (PCA adapters need d_s <= d_t)
        assert student["embed_dim"] < t.arch_kwargs["embed_dim"] and student["depth"] <= t.arch_kwargs["depth"]
    assert c.train.shuffle_window % c.train.batch_size == 0


def test_path_overrides_load_even_with_awkward_paths(tmp_path):
    out = tmp_path / 'o "q" \\ x'
    o = path_overrides(out, [str(out / "a.tar")], [str(out / "b.tar")], {"mae": str(out / "m.pth")})
    cfg = load_config(DEMO_TOML, o)
    assert cfg.data.urls == [str(out / "a.tar")] and cfg.eval.test_urls == [str(out / "b.tar")]
    assert cfg.store.root == str(out / "store") and cfg.teachers["mae"].weights == str(out / "m.pth")


def test_out_dir_is_refused_when_foreign_and_cleared_when_ours(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not written by comad-demo"):
        prepare_out_dir(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    ours = tmp_path / "ours"
    prepare_out_dir(ours)
    (ours / "run").mkdir()
    (ours / "results.json").write_text("{}")
    (ours / "notes.txt").write_text("user file")
    prepare_out_dir(ours)
    assert not (ours / "run").exists() and not (ours / "results.json").exists()
    assert (ours / "notes.txt").exists()  # only what the demo writes is cleared


# ----------------------------------------------------------------------------------------------
# Teacher fixtures


OFFICIAL_TOP = {"mae": {"model"}, "mocov3": {"epoch", "arch", "state_dict"}, "ibot": {"state_dict"}}


@pytest.mark.parametrize("name", ["mae", "mocov3", "ibot"])
def test_fixture_trains_and_loads_strictly_in_its_official_format(tmp_path, digits, demo_cfg, name):
    images, _ = digits
    tcfg = demo_cfg.teachers[name]
    torch.manual_seed(SHORT.seed)
    init = build_vit(tcfg.arch, tcfg.arch_kwargs, 32, 4).state_dict()
    fx = train_teacher(tcfg, 32, 4, images[:64], SHORT)
    sd = fx.backbone
    assert fx.log["objective"] == OBJECTIVES[tcfg.format] and fx.log["steps"] == 2
    assert any(not torch.equal(sd[k], init[k]) for k in sd if k != "pos_embed")  # it trained
    if name in ("mae", "mocov3"):  # fixed sin-cos positions, each in its official layout, kept frozen
        pos = sincos_pos_embed_2d(96, 8, True) if name == "mae" else mocov3_sincos_pos_embed(96, 8)
        assert torch.equal(sd["pos_embed"], pos)
    path = tmp_path / f"{name}.pth"
    torch.save(fx.checkpoint, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == OFFICIAL_TOP[name]  # the official top-level layout, not a bare state dict
    if name == "mocov3":  # the whole MoCo v3 model: query encoder + projector, key encoder + projector, predictor
        prefixes = {k.split(".")[1] for k in raw["state_dict"]}
        assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}
        assert "module.base_encoder.head.0.weight" in raw["state_dict"]
        assert "module.momentum_encoder.head.6.weight" in raw["state_dict"]  # 3-layer projector
        assert torch.equal(raw["state_dict"]["module.base_encoder.patch_embed.proj.weight"],
                           init["patch_embed.proj.weight"])  # stop-grad conv1: the patch projection stays random
    loaded, sha = load_teacher(dataclasses.replace(tcfg, weights=str(path)), 32, 4)
    assert sha == state_dict_sha256(sd)  # what the pipeline loads is the fixture's backbone
    if name == "mocov3":  # ... the query encoder, not the momentum copy
        assert not torch.equal(raw["state_dict"]["module.momentum_encoder.blocks.0.attn.qkv.weight"],
                               sd["blocks.0.attn.qkv.weight"])
    if name == "ibot":  # ... the EMA teacher, not the student
        assert torch.equal(sd["blocks.0.attn.qkv.weight"], fx.state["teacher.blocks.0.attn.qkv.weight"])
        assert not torch.equal(sd["blocks.0.attn.qkv.weight"], fx.state["student.blocks.0.attn.qkv.weight"])
    ref = build_vit(tcfg.arch, tcfg.arch_kwargs, 32, 4)
    ref.load_state_dict(sd, strict=True)
    a = teacher_features(loaded, images[:40], tcfg.mean, tcfg.std)
    b = teacher_features(ref, images[:40], tcfg.mean, tcfg.std)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_objectives_give_different_representations_from_one_init(digits):
    # Small backbones keep this quick; the full-size fixtures' CKA is checked by the end-to-end test.
    images, _ = digits
    cfg = load_config(DEMO_TOML, [f"teachers.{n}.arch_kwargs={{embed_dim = 32, depth = 2, num_heads = 2}}"
                                  for n in ("mae", "mocov3", "ibot")])
    # The two EMA methods move slowly from the init, and over a short schedule how far is sensitive to rounding
    # (other CPUs train other bits: README "Reproducible teachers"). At the old 100 steps, MoCo v3 lr 3e-3 and
    # iBOT momentum 0.9, CKA(iBOT, MoCo v3) was 0.96 on one machine and 0.84 with 2 threads. These settings move
    # both far: measured max pairwise CLS CKA 0.81 (seed 0), 0.72 (2 threads), 0.67 / 0.35 (seeds 1 / 2).
    # Patch means are no help: they barely move in 150 steps (CKA to their own init >= 0.87 for every objective).
    recipe = FixtureRecipe(batch_size=32, mae_steps=40, mocov3_steps=150, ibot_steps=150,
                           mae_lr=3e-3, mocov3_lr=5e-3, ibot_lr=3e-3, ibot_momentum=0.5)
    sub = np.arange(0, 1797, 4)  # 450 images to compare features on
    feats, init_feats = {}, {}
    for name, tcfg in cfg.teachers.items():
        for out, steps in ((init_feats, 0), (feats, None)):
            fx = train_teacher(tcfg, 32, 4, images, recipe, steps=steps)
            model = build_vit(tcfg.arch, tcfg.arch_kwargs, 32, 4)
            model.load_state_dict(fx.backbone, strict=True)
            out[name] = teacher_features(model, images[sub], tcfg.mean, tcfg.std)[0]  # CLS features
    names = sorted(feats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            trained, initial = linear_cka(feats[a], feats[b]), linear_cka(init_feats[a], init_feats[b])
            print(f"CKA {a}-{b}: initial {initial:.3f}, trained {trained:.3f}")
            # One initial backbone (only the position tables differ): the objectives made the difference. Two
            # identical objectives would stay near 1.
            assert initial > 0.95 and trained < 0.9, (a, b, trained, initial)


def test_cka_and_knn_helpers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.3
    y = torch.arange(200) % 4
    centers = torch.randn(4, 16, generator=g) * 5
    feats = centers[y] + torch.randn(200, 16, generator=g)
    assert knn_accuracy(feats[:100], y[:100], feats[100:], y[100:], num_classes=4) > 0.95
    assert knn_accuracy(feats[:100], y[:100], feats[100:], (y[100:] + 1) % 4, num_classes=4) < 0.05


def test_ensure_teachers_caches_by_recipe(tmp_path, monkeypatch):
    tiny = "{embed_dim = 32, depth = 1, num_heads = 2}"
    cfg = load_config(DEMO_TOML, [f"teachers.{n}.arch_kwargs={tiny}" for n in ("mae", "mocov3", "ibot")])
    logs: list[str] = []
    paths, manifest = ensure_teachers(cfg, SHORT, root=tmp_path, log=logs.append)
    assert set(paths) == {"mae", "mocov3", "ibot"} and all(Path(p).is_file() for p in paths.values())
    assert Path(paths["mae"]).parent.name == fixture_key(cfg, SHORT)
    for name, info in manifest["teachers"].items():
        assert 0.0 <= info["knn_cls"] <= 1.0 and info["objective"] == OBJECTIVES[name]
        _, sha = load_teacher(dataclasses.replace(cfg.teachers[name], weights=paths[name]), 32, 4)
        assert sha == info["sha256"]
        assert hashlib.sha256(Path(paths[name]).read_bytes()).hexdigest() == info["file_sha256"]
    assert json.loads((Path(paths["mae"]).parent / "manifest.json").read_text()) == manifest

    def no_training(*a, **k):
        raise AssertionError("a cached fixture was retrained")

    monkeypatch.setattr("distill.demo.teacher_fixtures.train_teacher", no_training)
    again, _ = ensure_teachers(cfg, SHORT, root=tmp_path, log=logs.append)
    assert again == paths and "cached" in logs[-1]
    assert fixture_key(cfg, dataclasses.replace(SHORT, mae_steps=3)) != fixture_key(cfg, SHORT)
    monkeypatch.undo()
    Path(paths["ibot"]).unlink()  # a damaged entry is rebuilt, not returned
    rebuilt, _ = ensure_teachers(cfg, SHORT, root=tmp_path, log=logs.append)
    assert rebuilt == paths and Path(paths["ibot"]).is_file() and "cached" not in logs[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


# ----------------------------------------------------------------------------------------------
# Report


def _eval(acc: float) -> dict:
    return {"model": "m", "cls": {"knn@10": acc, "knn@20": acc - 0.01, "linear": acc + 0.01},
            "mean_patch": {"knn@10": acc / 2, "knn@20": acc / 2, "linear": acc / 3}, "n_train": 1, "n_test": 1}


def test_table_and_png_report(tmp_path):
    results = [ModelResult("teacher mae (masked_reconstruction)", "teacher", _eval(0.9)),
               ModelResult("student random-init (seed 0)", "random-init", _eval(0.5)),
               ModelResult("student distilled (40 steps)", "distilled", _eval(0.7))]
    assert accuracy_columns(results) == [("cls", "knn@20"), ("cls", "linear"), ("mean_patch", "knn@20"),
                                         ("mean_patch", "linear")]
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and "cls knn@20" in lines[0]
    assert "89.0%" in lines[2] and "91.0%" in lines[2] and "student distilled" in lines[4]
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 2.0 / s, "loss_token": 1.0 / s, "loss_map": 1.0 / s,
             "gate_weight/mae": 0.2, "gate_weight/ibot": 0.8} for s in range(5, 45, 5)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_metrics(metrics) == rows
    write_report_png(tmp_path / "r" / "report.png", rows, results)
    png = (tmp_path / "r" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    metrics.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(metrics)
