"""The trainer on a tiny fabricated store: the forward's assembly, one step, the lr recipe, the
non-finite guard, and a short end-to-end run with its logs, config and checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import distill.train as train_mod
from _train_worker import build_store
from conftest import PIPELINE_TOML
from distill.checkpoint import ResumeError, complete_checkpoints
from distill.cli import main as cli_main
from distill.consensus_gate import consensus_gate
from distill.losses import MapKLLoss, TokenKLLoss
from distill.model import CoMADDistiller
from distill.store_dataset import StoreBatches, check_store_matches
from distill.student import student_forward
from distill.train import (NonFiniteLossError, build_optimizer, build_scheduler, learning_rate, peak_lr,
                           train, train_step)
from store_schema.config import ConfigError, load_config

TEACHERS = ("mae", "mocov3", "ibot")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_store(root)
    return root


def _cfg(root, extra=()):
    return load_config(root / "config.toml", list(extra))


def _batch(cfg):
    return next(iter(StoreBatches(cfg, 0, 1)))


def _model(cfg):
    store = check_store_matches(cfg)
    torch.manual_seed(0)
    model = CoMADDistiller(cfg, {t: store.teacher_meta(t).dim for t in store.teachers})
    stats, joint = train_mod.target_statistics(cfg, store)  # the trainer's own initialisation
    model.init_from_statistics(stats, pca=cfg.heads.adapter_init == "pca", joint=joint)
    return model, store


def _setup(cfg):
    model, _ = _model(cfg)
    optimizer = build_optimizer(model, cfg, 1)
    scheduler = build_scheduler(optimizer, cfg, 1)
    AcceleratorState._reset_state()  # an earlier test's train() may have left another precision set
    accelerator = Accelerator(mixed_precision="no")
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, accelerator


def test_forward_matches_a_loop_reference(store_root):
    cfg = _cfg(store_root, ['gate.prior="none"'])  # the reference is the plain gate; the prior has its own test
    model, _ = _model(cfg)
    batch = _batch(cfg)
    loss, metrics = model(batch)

    idx = batch["student_idx"]
    b, ks = idx.shape
    n, T = cfg.num_patches, len(TEACHERS)
    mean, std = torch.tensor(cfg.student.mean).view(3, 1, 1), torch.tensor(cfg.student.std).view(3, 1, 1)
    tokens, patch_tokens = student_forward(model.student, (batch["pixels"].float() / 255 - mean) / std, idx)
    s, s_map = model.projector(patch_tokens), model.decoder(tokens, idx)
    d = s.shape[-1]
    targets = torch.full((b, T, n, d), float("nan"))  # the gate must never read an unseen entry
    visible = torch.zeros(b, T, n, dtype=torch.bool)
    for k, t in enumerate(model.teacher_names):
        adapted = model.adapters[t](batch["teacher_patch"][t].float())
        for i in range(b):
            for j, pos in enumerate(batch["teacher_idx"][t][i].tolist()):
                targets[i, k, pos], visible[i, k, pos] = adapted[i, j], True
    query = s_map.clone()
    for i in range(b):
        for j, pos in enumerate(idx[i].tolist()):
            query[i, pos] = s[i, j]
    fused, weights = consensus_gate(query, targets, visible, cfg.gate.variant, cfg.gate.temperature)
    token_target = torch.stack([fused[i, idx[i]] for i in range(b)])
    expected_tok = TokenKLLoss(cfg.loss.token_temperature)(s, token_target)
    expected_map = MapKLLoss(cfg.loss.map_temperature)(s_map, fused, visible.any(1))
    # The CLS term: each teacher's head on the student CLS against its adapted CLS, KL over channels (τ = 1).
    assert cfg.loss.token_temperature == 1.0
    expected_cls = torch.stack([
        F.kl_div(F.log_softmax(model.cls_heads[t](tokens[:, 0]), -1),
                 F.log_softmax(model.adapters[t](batch["teacher_cls"][t].float()), -1),
                 reduction="batchmean", log_target=True) for t in model.teacher_names]).mean()
    torch.testing.assert_close(metrics["loss_token"], expected_tok.detach())
    torch.testing.assert_close(metrics["loss_map"], expected_map.detach())
    torch.testing.assert_close(metrics["loss_cls"], expected_cls.detach())
    torch.testing.assert_close(loss, expected_tok + expected_map + cfg.loss.cls_weight * expected_cls)
    assert math.isclose(sum(float(metrics[f"gate_weight/{t}"]) for t in TEACHERS), 1.0, rel_tol=1e-5)
    # MAE sees the fewest tokens (6 of 16), iBOT the most (11): its mean weight must be the larger.
    assert metrics["gate_weight/mae"] < metrics["gate_weight/ibot"]


def test_standardised_targets_use_store_statistics_and_correlation_pca(store_root):
    cfg = _cfg(store_root, ["loss.standardize_targets=true", 'heads.adapter_init="pca"'])
    model, store = _model(cfg)
    st = store.teacher_stats("mocov3")
    std = torch.from_numpy(np.sqrt(np.diag(st.cov))).float()
    torch.testing.assert_close(model.target_norm["mocov3"].mean, torch.from_numpy(st.mean).float())
    torch.testing.assert_close(model.target_norm["mocov3"].std, std)
    corr = torch.from_numpy(st.cov).float() / torch.outer(std, std)
    w = model.adapters["mocov3"].proj.weight.detach()
    eig = torch.linalg.eigvalsh(corr).flip(0)
    torch.testing.assert_close(w @ corr @ w.T, torch.diag(eig), atol=1e-3, rtol=1e-3)  # eigenvectors, in order
    loss, _ = model(_batch(cfg))
    assert torch.isfinite(loss)


def test_one_step_updates_trainable_parameters_only(store_root):
    cfg = _cfg(store_root, ["optim.warmup_steps=0"])
    model, optimizer, scheduler, accelerator = _setup(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics, applied = train_step(model, _batch(cfg), optimizer, scheduler, accelerator, cfg.optim.grad_clip)
    assert applied and torch.isfinite(metrics["grad_norm"])
    after = model.state_dict()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k in trainable:
            assert changed, f"{k} is trainable but did not change"
        else:
            assert not changed, f"{k} is frozen but changed"
    assert "student.pos_embed" in before and "student.pos_embed" not in trainable
    assert any(k.startswith("adapters.") for k in before) and not any(k.startswith("adapters.") for k in trainable)
    for prefix in ("student.blocks.", "projector.", "decoder."):
        assert any(k.startswith(prefix) for k in trainable)


def test_loss_decreases_on_a_fixed_batch(store_root):
    # peak lr 1e-3 (base_lr 0.032 x 8 / 256), no warm-up, cosine over the 30 steps
    cfg = _cfg(store_root, ["optim.base_lr=0.032", "optim.warmup_steps=0", "train.steps=30"])
    model, optimizer, scheduler, accelerator = _setup(cfg)
    batch = _batch(cfg)
    losses = []
    for _ in range(30):
        metrics, applied = train_step(model, batch, optimizer, scheduler, accelerator, cfg.optim.grad_clip)
        assert applied
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_lr_schedule_warmup_peak_cosine_and_scaling(store_root):
    cfg = _cfg(store_root, ["optim.base_lr=0.032", "optim.warmup_steps=4", "train.steps=15", "optim.min_lr=1e-5"])
    peak = 0.032 * 8 / 256
    assert math.isclose(peak_lr(cfg, 1), peak) and math.isclose(peak_lr(cfg, 4), 4 * peak)
    assert math.isclose(learning_rate(cfg, 1, 0), peak / 4)  # warm-up starts above 0
    assert math.isclose(learning_rate(cfg, 1, 3), peak)  # the last warm-up step reaches the peak
    assert math.isclose(learning_rate(cfg, 1, 4), peak)  # cosine starts at the peak
    assert math.isclose(learning_rate(cfg, 1, 9), 1e-5 + (peak - 1e-5) * 0.5)  # half-way down the cosine
    assert math.isclose(learning_rate(cfg, 1, 14), 1e-5)  # the last step is at min_lr
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg, 1)
    scheduler = build_scheduler(optimizer, cfg, 1)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert np.allclose(seen, [learning_rate(cfg, 1, s) for s in range(15)], rtol=1e-12, atol=0)
    # no weight decay on biases: the Linear's bias sits in the zero-decay group
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[1]["params"][0].ndim == 1


def test_nonfinite_loss_skips_the_update(store_root):
    cfg = _cfg(store_root)
    model, optimizer, scheduler, accelerator = _setup(cfg)
    batch = _batch(cfg)
    batch["teacher_patch"]["ibot"][0, 0, 0] = float("nan")  # a visible token of one teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics, applied = train_step(model, batch, optimizer, scheduler, accelerator, cfg.optim.grad_clip)
    assert not applied and not torch.isfinite(metrics["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(optimizer.state) == 0  # AdamW never stepped
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.last_epoch == 1  # the lr still follows the step index


def _poisoned(bad_steps):
    real = train_mod.make_batches

    def make_batches(run, start_step):
        for step, batch in enumerate(real(run, start_step), start=start_step + 1):
            if step in bad_steps:
                batch["teacher_patch"]["mae"] = torch.full_like(batch["teacher_patch"]["mae"], float("inf"))
            yield batch
    return make_batches


def test_nonfinite_guard_skips_isolated_steps_and_stops_after_too_many(store_root, tmp_path, monkeypatch):
    cfg = _cfg(store_root, [f'train.run_dir="{tmp_path}/run"', "train.steps=8", "train.max_nonfinite_steps=3",
                            "train.checkpoint_every=100"])
    monkeypatch.setattr(train_mod, "make_batches", _poisoned({2, 4, 5, 6}))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps up to step 6"):
        train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(2, 1), (4, 1)]
    assert math.isfinite(rows[0]["loss"])  # the window mean covers the applied steps only
    assert complete_checkpoints(tmp_path / "run") == []


def test_end_to_end_run(store_root, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(store_root, [f'train.run_dir="{run}"', "train.steps=6", "train.log_every=3",
                            "train.checkpoint_every=2", "train.keep_checkpoints=2", "optim.min_lr=1e-7"])
    summary = train(cfg)
    assert summary["step"] == 6 and summary["skipped_steps"] == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    keys = {"step", "lr", "img_per_s", "skipped_steps", "loss", "loss_token", "loss_map", "loss_cls", "gate_entropy",
            "covered_fraction", "grad_norm"} | {f"gate_weight/{t}" for t in TEACHERS}
    for r in rows:
        assert set(r) == keys
        assert all(math.isfinite(v) for v in r.values())
        assert 0 < r["gate_entropy"] < math.log(3)
    assert math.isclose(rows[-1]["lr"], 1e-7)
    assert math.isclose(rows[0]["loss"], rows[0]["loss_token"] + rows[0]["loss_map"]
                        + cfg.loss.cls_weight * rows[0]["loss_cls"], rel_tol=1e-5)
    assert load_config(run / "config.toml") == cfg
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000004", "step_00000006"]  # keep 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["last_metrics"] == rows[-1]
    with pytest.raises(ResumeError, match="--resume"):
        train(cfg)  # a second run into the same run_dir must not clobber it
    again = train(cfg, resume=True)  # nothing left to train
    assert again["step"] == 6 and again["last_metrics"] == rows[-1]


def test_bf16_autocast_run_after_a_full_precision_one(store_root, tmp_path):
    """bf16 autocast (on the CPU here; 'auto' picks it on CUDA) in the same process as fp32 runs."""
    cfg = _cfg(store_root, [f'train.run_dir="{tmp_path}/run"', "train.steps=2", 'train.mixed_precision="bf16"'])
    summary = train(cfg)
    assert summary["step"] == 2 and math.isfinite(summary["last_metrics"]["loss"])


def test_trainable_adapters_log_target_variance_and_learn(store_root):
    cfg = _cfg(store_root, ["heads.adapter_trainable=true"])
    model, _ = _model(cfg)
    batch = _batch(cfg)
    loss, metrics = model(batch)
    for t in TEACHERS:
        # LayerNorm'd PCA features of distinct tokens: per-channel variance over tokens near 1, never 0
        assert 0.7 < float(metrics[f"target_std/{t}"]) < 1.42  # ~1 for LayerNorm'd targets that vary
    loss.backward()
    for t in TEACHERS:  # the option is real: gradient reaches every adapter through the fused target
        grad = model.adapters[t].proj.weight.grad if hasattr(model.adapters[t], "proj") else \
            next(p.grad for p in model.adapters[t].parameters())
        assert grad is not None and grad.abs().sum() > 0
    frozen, _ = _model(_cfg(store_root))
    frozen_loss, _ = frozen(batch)
    assert torch.allclose(frozen_loss, loss.detach(), atol=1e-5)  # same targets, same loss; only gradients differ


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    code = cli_main(["train", "--config", str(PIPELINE_TOML), "--set", "gate.variant=bogus"])
    err = capsys.readouterr().err
    assert code == 2 and "gate.variant" in err and "Traceback" not in err
    code = cli_main(["train", "--config", str(PIPELINE_TOML), "--set", f'store.root="{tmp_path}/nowhere"'])
    err = capsys.readouterr().err
    assert code == 2 and "no store at" in err and "Traceback" not in err


def test_online_targets_train_from_live_teachers_without_a_store(tmp_path):
    from _extract_fixtures import extract_config, write_tars
    from _train_worker import TRAIN_OVERRIDES
    tars = write_tars(tmp_path, [8])
    online = TRAIN_OVERRIDES + ['train.targets="online"', "train.batch_size=4", "train.shuffle_window=8",
                                "train.steps=2", "train.log_every=1"]
    cfg = extract_config(tmp_path, tars, online + ['heads.adapter_init="random"', 'gate.prior="none"'])
    summary = train(cfg)  # no store was ever written: the teachers run live (no statistics: no rank prior)
    assert not (tmp_path / "store").exists()
    assert summary["step"] == 2 and math.isfinite(summary["last_metrics"]["loss"])
    with pytest.raises(ConfigError, match="adapter_init = \"random\""):
        train(extract_config(tmp_path, tars, online + [f'train.run_dir="{tmp_path}/pca"']))  # pca needs stats


def test_single_teacher_student_from_the_three_teacher_store(store_root):
    """train.teachers picks a subset of the store's teachers: single-teacher ablations need no new store."""
    cfg = _cfg(store_root, ['train.teachers=["mocov3"]'])
    batch = _batch(cfg)
    assert list(batch["teacher_patch"]) == ["mocov3"]  # only that teacher's bytes are read
    model, _ = _model(cfg)
    assert list(model.adapters) == ["mocov3"]
    loss, metrics = model(batch)
    assert torch.isfinite(loss) and float(metrics["gate_weight/mocov3"]) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="train.teachers names 'dino'"):
        _cfg(store_root, ['train.teachers=["dino"]'])


@pytest.mark.parametrize("kwargs", ["{embed_dim = 30, depth = 1, num_heads = 4}", "{depth = -1}",
                                    "{embed_dim = 0, depth = 1, num_heads = 1}"])
def test_an_unbuildable_student_is_one_line_naming_the_keys(store_root, tmp_path, capsys, kwargs):
    code = cli_main(["train", "--config", str(store_root / "config.toml"), "--set", f"student.arch_kwargs={kwargs}",
                     "--set", f'train.run_dir="{tmp_path}/run"'])
    err = capsys.readouterr().err
    assert code == 2 and "student.arch_kwargs" in err and "Traceback" not in err


def test_store_is_listed_once_and_a_unit_completed_later_is_not_trained_on(tmp_path, monkeypatch):
    import distill.store_dataset as dataset_mod
    from store_fixtures import write_unit
    from store_schema.store import FeatureStore
    build_store(tmp_path / "store")
    cfg = _cfg(tmp_path / "store", [f'train.run_dir="{tmp_path}/run"'])
    checks = []
    for mod in (train_mod, dataset_mod):
        monkeypatch.setattr(mod, "check_store_matches", lambda *a, real=mod.check_store_matches: checks.append(1)
                            or real(*a))
    datasets = []
    monkeypatch.setattr(train_mod, "make_loader", lambda ds, workers: datasets.append(ds) or [])
    AcceleratorState._reset_state()
    run = train_mod.set_up(cfg, resume=False)
    samples = run.data["store_samples"]
    writer = FeatureStore.open(cfg.store.root, mode="a")
    write_unit(writer, cfg, "data/late.tar", 8, seed=9)  # extraction completes a unit after set-up
    assert len(run.store.units()) == len(run.units) + 1
    train_mod.make_batches(run, 0)
    assert checks == [1]  # set_up checked the store; make_batches did not again
    assert datasets[0].num_samples == samples  # the set-up's units, not the late one
    assert StoreBatches(cfg, 0, 1).num_samples == samples + 8  # a fresh listing sees it


def test_ranks_that_see_different_units_are_refused(store_root, tmp_path, monkeypatch):
    cfg = _cfg(store_root, [f'train.run_dir="{tmp_path}/run"'])
    monkeypatch.setattr(train_mod, "_all_gather", lambda x, world: [x, {**x, "store_units": x["store_units"] + 1}])
    AcceleratorState._reset_state()
    with pytest.raises(RuntimeError, match="processes see different store contents"):
        train_mod.set_up(cfg, resume=False)
