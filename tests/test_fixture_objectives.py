"""The demo teacher objectives are their methods in small: MAE masking, MoCo v3 momentum contrast, iBOT MIM."""
from __future__ import annotations

import copy

import pytest
import torch

from distill.demo.fixture_objectives import IBOT, MAE, MoCoV3, cosine_to_one, mocov3_mlp
from distill.demo.fixture_recipe import FixtureRecipe
from distill.demo.fixture_views import block_masks, random_keep
from vit_layers.checkpoints import build_vit

MEAN, STD = [0.31] * 3, [0.35] * 3
R = FixtureRecipe()


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("vit_tiny_patch16_224", {"embed_dim": 32, "depth": 1, "num_heads": 2}, 32, 4)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_block_masks_ratio_probability_and_seed():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    m = block_masks(200, 8, (0.25, 0.25), 1.0, 2, 0.3, gen(0))
    assert m.shape == (200, 64) and m.dtype == torch.bool
    counts = m.sum(1)
    assert int(counts.max()) <= 16 and float(counts.float().mean()) > 13  # the target, never above it
    grids = m.view(200, 8, 8)
    # blockwise, not scattered: a masked cell almost always has a masked 4-neighbour (random masks: ~68 %)
    nb = torch.zeros_like(grids)
    nb[:, 1:] |= grids[:, :-1]
    nb[:, :-1] |= grids[:, 1:]
    nb[:, :, 1:] |= grids[:, :, :-1]
    nb[:, :, :-1] |= grids[:, :, 1:]
    assert float((nb & grids).sum() / grids.sum()) > 0.95
    assert not block_masks(50, 8, (0.1, 0.5), 0.0, 2, 0.3, gen(0)).any()  # prob 0: no image masked
    half = block_masks(400, 8, (0.1, 0.5), 0.5, 2, 0.3, gen(1)).any(1).float().mean()
    assert 0.4 < float(half) < 0.6
    assert torch.equal(block_masks(30, 8, (0.1, 0.5), 0.5, 2, 0.3, gen(3)),
                       block_masks(30, 8, (0.1, 0.5), 0.5, 2, 0.3, gen(3)))
    assert not torch.equal(block_masks(30, 8, (0.1, 0.5), 1.0, 2, 0.3, gen(3)),
                           block_masks(30, 8, (0.1, 0.5), 1.0, 2, 0.3, gen(4)))


def test_mae_loss_counts_only_dropped_patches():
    obj = MAE(_vit(), MEAN, STD, R, torch.Generator().manual_seed(0))
    keep = random_keep(4, 64, 16, torch.Generator().manual_seed(0))
    assert keep.shape == (4, 16) and all(len(set(k.tolist())) == 16 for k in keep)
    seen: dict = {}
    decode = obj.decoder.forward

    def spy(cls, tokens, keep):
        cls.retain_grad()
        seen["cls"] = cls
        out = decode(cls, tokens, keep)
        out.retain_grad()
        seen["pred"], seen["keep"], seen["k"] = out, keep, tokens.shape[1]
        return out

    obj.decoder.forward = spy
    loss = obj.loss(_images(4), 0.0)
    loss.backward()
    assert seen["k"] == 16  # the encoder saw 25 % of the 64 tokens
    g = seen["pred"].grad.abs().sum(-1)  # (B, N)
    kept = torch.zeros(4, 64, dtype=torch.bool).scatter(1, seen["keep"], True)
    assert bool((g[kept] == 0).all()) and bool((g[~kept] > 0).all())  # reconstruction of dropped patches only
    assert seen["cls"].grad.abs().sum() > 0  # the encoder's CLS output goes through the decoder, as upstream


def test_mocov3_momentum_encoder_is_an_ema_and_keys_get_no_gradient():
    obj = MoCoV3(_vit(), MEAN, STD, R, torch.Generator().manual_seed(0))
    assert ([type(m).__name__ for m in obj.base_head]
            == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"])
    assert not obj.base_head[-1].affine and len(obj.predictor) == 5  # 2-layer predictor, last BN without affine
    assert not obj.base_encoder.patch_embed.proj.weight.requires_grad  # stop-grad conv1
    with torch.no_grad():  # make base and momentum differ, as after some training
        for p in obj.base_encoder.parameters():
            p.add_(0.1)
    before_m = copy.deepcopy(obj.momentum_encoder.state_dict())
    base = {k: v.clone() for k, v in obj.base_encoder.state_dict().items()}
    progress = 0.3
    loss = obj.loss(_images(8), progress)
    loss.backward()
    m = cosine_to_one(R.mocov3_momentum, progress)
    key = "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(obj.momentum_encoder.state_dict()[key], m * before_m[key] + (1 - m) * base[key])
    assert all(p.grad is None for p in obj.momentum_encoder.parameters())
    assert obj.base_encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert obj.predictor[0].weight.grad.abs().sum() > 0
    assert cosine_to_one(0.99, 0.0) == pytest.approx(0.99) and cosine_to_one(0.99, 1.0) == 1.0


def test_mocov3_mlp_layout():
    mlp = mocov3_mlp(3, 16, 32, 8)
    assert [tuple(mlp[i].weight.shape) for i in (0, 3, 6)] == [(32, 16), (32, 32), (8, 32)]
    assert all(mlp[i].bias is None for i in (0, 3, 6))


def test_ibot_masked_patches_hide_their_pixels_and_the_teacher_is_an_ema():
    obj = IBOT(_vit(), MEAN, STD, R, torch.Generator().manual_seed(0))
    x = obj.norm(_images(2))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 9] = True  # grid cell (1, 1): pixels 4..8 x 4..8
    y = x.clone()
    y[:, :, 4:8, 4:8] += 1.0
    with torch.no_grad():
        a, b = obj._tokens(obj.student, x, mask), obj._tokens(obj.student, y, mask)
        c = obj._tokens(obj.student, y, None)
    torch.testing.assert_close(a, b)  # the student cannot see a masked patch's pixels
    assert not torch.allclose(a, c)  # ... which it sees unmasked
    cls, patch = obj.student_head(a)
    assert cls.shape == (2, R.ibot_out_dim) and patch.shape == (2, 64, R.ibot_patch_out_dim)

    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(0.05)
    teacher_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    center_before = obj.center.clone()
    loss = obj.loss(_images(8), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and obj.masked_embed.grad is not None  # MIM trains the mask embedding
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert not torch.equal(obj.center, center_before)  # centring follows the teacher outputs
    obj.after_step(0.5)
    m = cosine_to_one(R.ibot_momentum, 0.5)
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(obj.teacher.state_dict()[key],
                               m * teacher_before[key] + (1 - m) * obj.student.state_dict()[key])
    assert obj._teacher_temp(0.0) == R.ibot_teacher_temp[0] and obj._teacher_temp(1.0) == R.ibot_teacher_temp[1]


def test_ibot_patch_loss_only_at_masked_positions():
    obj = IBOT(_vit(), MEAN, STD, FixtureRecipe(ibot_cls_weight=0.0, ibot_mask_prob=0.0),
               torch.Generator().manual_seed(0))
    loss = obj.loss(_images(4), 0.5)  # nothing masked, no CLS term: nothing to learn
    assert float(loss.detach()) == 0.0
