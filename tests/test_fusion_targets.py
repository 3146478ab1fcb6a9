"""Targets that can be fused: the shared CCA basis, the store's cross-teacher statistics and the command that
adds them, loss-level fusion, the CLS term, float32 numerics under autocast, and the collapse guard."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _extract_fixtures import extract_config, write_tars
from _train_worker import build_store

from distill.basis import cca_maps, effective_rank, pca_map
from distill.cli import main as distill_main
from distill.collapse import CollapseGuard, TargetCollapseError
from distill.heads import TeacherAdapter
from distill.model import CoMADDistiller
from distill.store_dataset import StoreBatches, check_store_matches
from distill.student import student_forward
from distill.train import train
from extract.pipeline import run_extraction
from store_schema.cli import main as store_main
from store_schema.config import load_config
from store_schema.joint_stats import JointStatsMissing, co_visible_rows, compute_joint_stats, read_joint_stats
from store_schema.store import FeatureStore
from store_schema.validate import validate_store
from vit_layers.pixels import normalize_pixels

TEACHERS = ("mae", "mocov3", "ibot")


def _features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Anisotropic Gaussian tokens (n, dim): distinct eigenvalues, so PCA directions are well defined."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scales + 0.5


def _adapted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ad = TeacherAdapter(w.shape[1], w.shape[0], trainable=False).double()
    ad.set_map(w, b)
    return ad(x)


def test_a_rotated_teacher_lands_on_the_same_targets_only_with_the_shared_basis():
    x = _features(4000, 96, seed=0)
    rot, _ = torch.linalg.qr(torch.randn(96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    y = x @ rot  # the same information in another basis
    joint = torch.cat([x, y], 1)
    maps, vals = cca_maps(joint.mean(0), torch.cov(joint.T), [96, 96], 24, ridge=1e-3)
    cos_cca = F.cosine_similarity(_adapted(x, *maps[0]), _adapted(y, *maps[1]), dim=-1)
    assert float(cos_cca.min()) > 0.999
    assert torch.allclose(vals, torch.full_like(vals, 2.0), atol=5e-3)  # two teachers, fully shared (less the ridge)
    # Per-teacher PCA: the same directions with signs chosen per teacher, so the tokens disagree.
    px, py = pca_map(x.mean(0), torch.cov(x.T), 24), pca_map(y.mean(0), torch.cov(y.T), 24)
    cos_pca = F.cosine_similarity(_adapted(x, *px), _adapted(y, *py), dim=-1)
    assert float(cos_pca.mean()) < 0.6


def test_cca_ranks_shared_components_before_private_ones():
    g = torch.Generator().manual_seed(2)
    shared, a, b = (torch.randn(5000, k, generator=g, dtype=torch.float64) for k in (3, 4, 4))
    mix_a, mix_b = (torch.randn(7, 7, generator=g, dtype=torch.float64) for _ in range(2))
    ta, tb = torch.cat([shared, a], 1) @ mix_a, torch.cat([shared, b], 1) @ mix_b
    joint = torch.cat([ta, tb], 1)
    maps, vals = cca_maps(joint.mean(0), torch.cov(joint.T), [7, 7], 5, ridge=1e-6)
    assert torch.allclose(vals[:3], torch.full((3,), 2.0, dtype=vals.dtype), atol=0.02)
    assert torch.allclose(vals[3:], torch.ones(2, dtype=vals.dtype), atol=0.05)
    za = (ta - ta.mean(0)) @ maps[0][0].T
    zb = (tb - tb.mean(0)) @ maps[1][0].T
    corr = [float(torch.corrcoef(torch.stack([za[:, c], zb[:, c]]))[0, 1]) for c in range(3)]
    assert min(corr) > 0.99  # shared variates: same sign, same channel in both teachers


def test_cca_maps_validate_their_arguments():
    with pytest.raises(ValueError, match="sum to"):
        cca_maps(torch.zeros(6), torch.eye(6), [3, 2], 2, 0.0)
    with pytest.raises(ValueError, match="out_dim"):
        cca_maps(torch.zeros(6), torch.eye(6), [3, 3], 7, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        cca_maps(torch.zeros(6), torch.full((6, 6), float("nan")), [3, 3], 2, 0.0)


def test_co_visible_rows_find_student_tokens_and_refuse_a_broken_superset():
    s, t = np.array([[2, 5]]), np.array([[1, 2, 4, 5, 7]])
    assert co_visible_rows(s, t, "x").tolist() == [[1, 3]]
    with pytest.raises(Exception, match="not visible to the teacher"):
        co_visible_rows(np.array([[3]]), t, "x")


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    cfg = build_store(root, with_joint_stats=False)  # as a store written before the shared basis existed
    return root, cfg


def test_joint_stats_equal_numpy_over_co_visible_features(store_cfg):
    _, cfg = store_cfg
    store = FeatureStore.open(cfg.store.root)
    stats, rec = compute_joint_stats(store, max_samples=0)
    rows = []
    for u in store.units():
        data = store.read_block(u.name, 0, u.n_samples, 0)
        parts = []
        for t in store.teachers:
            got = data["teachers"][t]
            for i in range(u.n_samples):  # brute force: look every student token up in the teacher's list
                pos = [list(got["idx"][i]).index(j) for j in data["student_idx"][i]]
                parts.append(got["patch"][i, pos])
        per_t = np.split(np.stack(parts), len(store.teachers))
        rows.append(np.concatenate(per_t, -1).reshape(-1, stats.dim))
    x = np.concatenate(rows).astype(np.float64)
    assert rec["count"] == stats.count == len(x) == 40 * cfg.student_tokens and rec["samples"] == 40
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-9)
    part, _ = compute_joint_stats(store, max_samples=10)
    assert part.count == 10 * cfg.student_tokens


def test_training_refuses_a_store_without_joint_stats_then_the_command_adds_them(store_cfg, capsys):
    root, cfg = store_cfg
    over = ['heads.adapter_init="cca"', "train.steps=2", f'train.run_dir="{root}/run-cca"']
    code = distill_main(["train", "--config", str(root / "config.toml"), *sum((["--set", o] for o in over), [])])
    err = capsys.readouterr().err
    assert code == 2 and f"comad-store joint-stats {cfg.store.root}" in err and "Traceback" not in err
    assert store_main(["joint-stats", cfg.store.root, "--samples", "0"]) == 0
    assert "40 samples" in capsys.readouterr().out
    c = load_config(root / "config.toml", over)
    joint, dims, _ = read_joint_stats(check_store_matches(c), ["ibot", "mae"])  # a subset, in that order
    assert dims == [32, 32] and joint.dim == 64
    summary = train(c)
    assert summary["step"] == 2 and np.isfinite(summary["last_metrics"]["loss"])


def test_missing_teacher_in_joint_stats_is_named(store_cfg):
    _, cfg = store_cfg
    store = FeatureStore.open(cfg.store.root)
    if "stats_joint" not in store.group:
        pytest.skip("needs the statistics written by the previous test")
    with pytest.raises(JointStatsMissing, match="teacher"):
        read_joint_stats(store, ["mae", "dino"])


def test_extraction_writes_joint_stats_that_match_a_read_back(tmp_path):
    tars = write_tars(tmp_path, [5, 4])
    cfg = extract_config(tmp_path, tars, ['store.dtype="float32"', "store.joint_stats_samples=0"])
    summary = run_extraction(cfg)
    assert summary["joint_stats"].startswith("9 samples")
    store = FeatureStore.open(cfg.store.root)
    stored, _, _ = read_joint_stats(store, list(TEACHERS))
    again, _ = compute_joint_stats(store)
    np.testing.assert_array_equal(stored.m2, again.m2)
    assert validate_store(cfg.store.root) == []  # the new group is part of the layout, not damage


def _model(cfg, **kw):
    store = check_store_matches(cfg)
    torch.manual_seed(0)
    model = CoMADDistiller(cfg, {t: store.teacher_meta(t).dim for t in store.teachers})
    model.init_from_statistics({t: store.teacher_stats(t) for t in cfg.distill_teachers},
                               pca=cfg.heads.adapter_init == "pca", **kw)
    return model


def test_loss_fusion_with_one_teacher_and_identity_head_equals_target_fusion(store_cfg):
    root, _ = store_cfg
    base = ['train.teachers=["mocov3"]']
    c_target = load_config(root / "config.toml", base)
    c_loss = load_config(root / "config.toml", base + ['heads.fusion="loss"'])
    batch = next(iter(StoreBatches(c_target, 0, 1)))
    m_target, m_loss = _model(c_target), _model(c_loss)
    m_loss.load_state_dict(m_target.state_dict(), strict=False)
    with torch.no_grad():
        m_loss.teacher_heads["mocov3"].proj.weight.copy_(torch.eye(32))
        m_loss.teacher_heads["mocov3"].proj.bias.zero_()
    (l1, x1), (l2, x2) = m_target(batch), m_loss(batch)
    torch.testing.assert_close(x1["loss_token"], x2["loss_token"])
    torch.testing.assert_close(x1["loss_map"], x2["loss_map"])
    torch.testing.assert_close(l1, l2)  # the CLS term is the same module in both: so is the total


def test_loss_fusion_trains_every_head_and_weights_tokens_by_the_gate(store_cfg):
    root, _ = store_cfg
    cfg = load_config(root / "config.toml", ['heads.fusion="loss"', 'gate.variant="affinity"'])
    model = _model(cfg)
    batch = next(iter(StoreBatches(cfg, 0, 1)))
    loss, metrics = model(batch)
    loss.backward()
    for t in TEACHERS:
        assert model.teacher_heads[t].proj.weight.grad.abs().sum() > 0
        assert model.adapters[t].proj.weight.grad is None  # frozen targets
    weights = torch.stack([metrics[f"gate_weight/{t}"] for t in TEACHERS])
    assert abs(float(weights.sum()) - 1.0) < 0.2 and float(weights.std()) > 0  # not uniform: affinity decides


def test_cls_term_reads_teacher_cls_and_trains_cls_heads(store_cfg):
    root, _ = store_cfg
    cfg = load_config(root / "config.toml", ["loss.cls_weight=1.0"])
    cfg0 = load_config(root / "config.toml", ["loss.cls_weight=0.0"])
    batch = next(iter(StoreBatches(cfg, 0, 1)))
    assert set(batch["teacher_cls"]) == set(TEACHERS)
    assert "teacher_cls" not in next(iter(StoreBatches(cfg0, 0, 1)))  # not read without a CLS term
    model = _model(cfg)
    loss, metrics = model(batch)
    assert float(metrics["loss_cls"]) > 0
    loss.backward()
    assert all(model.cls_heads[t].proj.weight.grad.abs().sum() > 0 for t in TEACHERS)
    assert model.student.cls_token.grad.abs().sum() > 0  # the student's CLS now has a loss of its own


def _adapted_cls(model, batch):
    """Each teacher's adapted CLS (B, T, d), computed outside the model's CLS term."""
    return torch.stack([model.adapters[t](batch["teacher_cls"][t].float()) for t in model.teacher_names], 1)


def _kl(student, target):
    """Reference τ = 1 KL(softmax(target) ‖ softmax(student)) over channels, mean over rows."""
    p_t = torch.softmax(target.double(), -1)
    return float((p_t * (p_t.log() - torch.log_softmax(student.double(), -1))).sum(-1).mean())


def test_cls_fusion_gate_matches_the_gated_cls_targets(store_cfg):
    root, _ = store_cfg
    batch = next(iter(StoreBatches(load_config(root / "config.toml", ["loss.cls_weight=1.0"]), 0, 1)))
    for variant in ("mean", "joint"):
        cfg = load_config(root / "config.toml", ["loss.cls_weight=1.0", 'loss.cls_fusion="gate"',
                                                 f'gate.variant="{variant}"', 'gate.prior="none"'])
        model = _model(cfg)
        assert not hasattr(model, "cls_heads")
        with torch.no_grad():
            model.cls_head.proj.weight.normal_(0, 0.2)  # a query that is not the zero-init head's
        loss, metrics = model(batch)
        with torch.no_grad():
            pixels = normalize_pixels(batch["pixels"], model.pixel_mean, model.pixel_std)
            cls = student_forward(model.student, pixels, batch["student_idx"])[0][:, 0]
            s = model.cls_head(cls)
            t = _adapted_cls(model, batch)  # (B, T, d)
            if variant == "mean":
                w = torch.full(t.shape[:2], 1.0 / t.shape[1])
            else:  # 0.5 (affinity to the query + mean agreement with the others), softmax at τ_g
                tn, sn = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
                aff = (tn * sn[:, None]).sum(-1)
                pair = tn @ tn.transpose(1, 2)
                agree = (pair.sum(-1) - pair.diagonal(dim1=1, dim2=2)) / (t.shape[1] - 1)
                w = torch.softmax(0.5 * (aff + agree) / cfg.gate.temperature, dim=1)
            expected = _kl(s, (w[..., None] * t).sum(1))
        assert abs(float(metrics["loss_cls"]) - expected) < 1e-4 * max(1.0, expected), variant
    loss.backward()
    assert model.cls_head.proj.weight.grad.abs().sum() > 0
    assert all(model.adapters[t].proj.weight.grad is None for t in TEACHERS)  # frozen targets


@pytest.mark.parametrize("fusion", ["target", "loss"])
def test_adapters_gate_and_losses_run_in_float32_under_bf16_autocast(store_cfg, fusion):
    root, _ = store_cfg
    cfg = load_config(root / "config.toml", [f'heads.fusion="{fusion}"', "loss.cls_weight=1.0"])
    model = _model(cfg)
    batch = next(iter(StoreBatches(cfg, 0, 1)))
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left as it is
        return hook
    hooks = [m.register_forward_hook(record(n))
             for n, m in [("adapter", model.adapters["mae"].proj), ("projector", model.projector),
                          ("decoder_pred", model.decoder.pred)]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(batch)
    for h in hooks:
        h.remove()
    assert seen["projector"] == torch.bfloat16 and seen["decoder_pred"] == torch.bfloat16  # autocast is on
    assert seen["adapter"] == torch.float32
    assert loss.dtype == torch.float32 and metrics["gate_weight/mae"].dtype == torch.float32


def test_collapse_guard_stops_or_warns_after_patience(store_cfg):
    root, _ = store_cfg
    cfg = load_config(root / "config.toml", ["heads.adapter_trainable=true", "heads.collapse_min_std=0.5",
                                             "heads.collapse_patience=3"])
    guard, ident = CollapseGuard(cfg), (lambda x: x)
    low = {"target_std/mae": torch.tensor(0.9), "target_std/ibot": torch.tensor(0.1)}
    high = {"target_std/mae": torch.tensor(0.9), "target_std/ibot": torch.tensor(0.9)}
    guard.update(1, low, ident), guard.update(2, low, ident), guard.update(3, high, ident)  # streak reset
    guard.update(4, low, ident), guard.update(5, low, ident)
    with pytest.raises(TargetCollapseError, match="'ibot'.*heads.collapse_min_std"):
        guard.update(6, low, ident)
    warn = CollapseGuard(load_config(root / "config.toml", [
        "heads.adapter_trainable=true", "heads.collapse_min_std=0.5", "heads.collapse_patience=1",
        'heads.collapse_action="warn"']))
    with pytest.warns(UserWarning, match="collapsed"):
        assert warn.update(1, low, ident) is not None
    assert warn.update(2, low, ident) is None  # once
    assert not CollapseGuard(load_config(root / "config.toml")).active  # frozen adapters cannot collapse


def test_a_collapsing_run_stops_with_one_line(store_cfg, capsys):
    root, _ = store_cfg
    over = ["heads.adapter_trainable=true", "heads.collapse_min_std=5.0", "heads.collapse_patience=2",
            "train.steps=6", f'train.run_dir="{root}/run-collapse"']  # std ~1 < 5: "collapsed" at once
    code = distill_main(["train", "--config", str(root / "config.toml"), *sum((["--set", o] for o in over), [])])
    err = capsys.readouterr().err
    assert code == 1 and "collapsed" in err and "step 2" in err and "Traceback" not in err


def test_effective_rank_is_rankme_and_orders_collapsed_below_rich_features():
    vals = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = vals / vals.sum()
    expected = float(torch.exp(-(p * p.log()).sum()))
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert abs(effective_rank(rot @ torch.diag(vals) @ rot.T) - expected) < 1e-9  # basis-free
    assert abs(effective_rank(torch.eye(6)) - 6.0) < 1e-9
    collapsed = torch.diag(torch.tensor([1.0, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]))
    assert effective_rank(collapsed) < 1.01 < effective_rank(torch.eye(6))


def test_the_rank_prior_comes_from_the_store_statistics(store_cfg):
    root, _ = store_cfg
    cfg = load_config(root / "config.toml", ['gate.prior="rankme"', 'heads.adapter_init="pca"'])
    store = FeatureStore.open(cfg.store.root)
    model = _model(cfg)
    ranks = torch.tensor([effective_rank(torch.from_numpy(np.asarray(store.teacher_stats(t).cov)))
                          for t in cfg.distill_teachers])
    a = cfg.gate.prior_power
    torch.testing.assert_close(model.gate_prior, (ranks**a / (ranks**a).sum()).float())
    assert "gate_prior" in model.state_dict()  # a resume reads the prior back with the model
    loss, _ = model(next(iter(StoreBatches(cfg, 0, 1))))
    assert torch.isfinite(loss)


def test_the_prior_power_sharpens_the_rank_shares(store_cfg):
    root, _ = store_cfg
    base = ['gate.prior="rankme"', 'heads.adapter_init="pca"']
    flat = _model(load_config(root / "config.toml", base + ["gate.prior_power=1.0"])).gate_prior.double()
    sharp = _model(load_config(root / "config.toml", base + ["gate.prior_power=3.0"])).gate_prior.double()
    torch.testing.assert_close(sharp, flat**3 / (flat**3).sum(), rtol=1e-5, atol=1e-7)
    assert abs(float(sharp.sum()) - 1) < 1e-6
    assert flat.max() > flat.min()  # the store's teachers differ in rank: else the power changes nothing
    assert sharp.max() > flat.max() and sharp.min() < flat.min()
