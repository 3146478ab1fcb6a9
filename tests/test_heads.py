"""Heads (projector, masked decoder, teacher adapters), sin-cos positions and the student."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from distill.consensus_gate import consensus_gate
from distill.heads import MaskedDecoder, Projector, TeacherAdapter
from distill.losses import MapKLLoss, TokenKLLoss
from distill.student import build_student, student_forward
from store_schema.config import StudentConfig
from vit_layers.forward import patchify
from vit_layers.positions import sincos_pos_embed_2d

IMG, PATCH, GRID = 32, 8, 4
N = GRID * GRID
DIM = 32
STUDENT = StudentConfig(arch="vit_tiny_patch16_224", arch_kwargs={"embed_dim": DIM, "depth": 2, "num_heads": 2},
                        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def mae_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    """MAE's util/pos_embed.py, transcribed in numpy as the independent reference."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def random_idx(b: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:k].sort().values for _ in range(b)])


# ------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("dim,grid,cls", [(32, 4, True), (64, 7, False), (192, 14, True)])
def test_sincos_matches_mae(dim, grid, cls):
    ours = sincos_pos_embed_2d(dim, grid, cls)
    assert ours.shape == (1, grid * grid + int(cls), dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], torch.from_numpy(mae_2d_sincos(dim, grid, cls)).float())
    if cls:
        assert (ours[0, 0] == 0).all()


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4, True)


# -------------------------------------------------------------------------------------- decoder


def make_decoder(depth: int = 2) -> MaskedDecoder:
    torch.manual_seed(0)
    return MaskedDecoder(DIM, depth=depth, num_heads=2, mlp_ratio=2.0, grid_size=GRID).eval()


def test_projector_shape():
    assert Projector(DIM)(torch.randn(2, 5, DIM)).shape == (2, 5, DIM)


def test_decoder_shape_and_fixed_positions():
    dec = make_decoder()
    tokens, idx = torch.randn(3, 1 + 5, DIM), random_idx(3, 5, 0)
    assert dec(tokens, idx).shape == (3, N, DIM)
    names = {n for n, _ in dec.named_parameters()}
    assert "pos_embed" not in names and "pos_embed" not in dec.state_dict()
    assert not dec.pos_embed.requires_grad
    torch.testing.assert_close(dec.pos_embed, sincos_pos_embed_2d(DIM, GRID, cls_token=True))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        dec(tokens, idx[:, :4])


def test_decoder_places_tokens_on_grid_and_mask_token_elsewhere():
    dec = make_decoder()
    tokens, idx = torch.randn(2, 1 + 5, DIM), random_idx(2, 5, 1)
    seen = {}
    dec.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    dec(tokens, idx)
    x = seen["x"] - dec.pos_embed  # (B, 1+N, d) without positions
    for b in range(2):
        torch.testing.assert_close(x[b, 0], tokens[b, 0])
        for i in range(N):
            where = (idx[b] == i).nonzero()
            expect = tokens[b, 1 + int(where[0])] if len(where) else dec.mask_token[0, 0]
            torch.testing.assert_close(x[b, 1 + i], expect)


def test_decoder_depends_on_visible_tokens_and_mask_token():
    dec = make_decoder()
    tokens, idx = torch.randn(2, 1 + 5, DIM), random_idx(2, 5, 2)
    out = dec(tokens, idx)
    changed = tokens.clone()
    changed[:, 3] += 1.0
    assert not torch.allclose(dec(changed, idx), out)
    # the same tokens listed in another order land on the same positions
    perm = torch.tensor([0, 3, 1, 5, 2, 4])
    torch.testing.assert_close(dec(tokens[:, perm], idx[:, perm[1:] - 1]), out)
    dec(tokens, idx).sum().backward()
    assert dec.mask_token.grad is not None and dec.mask_token.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- adapters


def known_covariance(in_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g, dtype=torch.float64))
    eig = torch.linspace(10.0, 0.5, in_dim, dtype=torch.float64)  # distinct, descending
    return q, eig, q @ torch.diag(eig) @ q.T, torch.randn(in_dim, generator=g, dtype=torch.float64)


def test_adapter_pca_init_uses_top_eigenvectors():
    in_dim, out_dim = 12, 5
    q, _, cov, mean = known_covariance(in_dim, 0)
    ad = TeacherAdapter(in_dim, out_dim, trainable=False)
    ad.init_from_statistics(mean.float(), cov.float())
    w = ad.proj.weight.double()
    torch.testing.assert_close(w @ w.T, torch.eye(out_dim, dtype=torch.float64), atol=1e-5, rtol=0)
    for r in range(out_dim):  # each row is ± the r-th eigenvector, sign: largest component positive
        assert abs(float(w[r] @ q[:, r])) == pytest.approx(1.0, abs=1e-5)
        assert float(w[r, w[r].abs().argmax()]) > 0
    torch.testing.assert_close(ad.proj.bias.double(), -(w @ mean), atol=1e-5, rtol=0)
    # re-running gives identical weights (deterministic signs)
    before = ad.proj.weight.clone()
    ad.init_from_statistics(mean.float(), cov.float())
    assert torch.equal(before, ad.proj.weight)


def test_adapter_pca_init_from_sampled_data_spans_top_subspace():
    in_dim, out_dim = 10, 3
    q, eig, _, mean = known_covariance(in_dim, 1)
    g = torch.Generator().manual_seed(1)
    x = mean + (torch.randn(20000, in_dim, generator=g, dtype=torch.float64) * eig.sqrt()) @ q.T
    ad = TeacherAdapter(in_dim, out_dim, trainable=False)
    ad.init_from_statistics(x.mean(0), torch.cov(x.T))
    w = ad.proj.weight.double()
    top = q[:, :out_dim]
    # projectors onto the two subspaces agree
    torch.testing.assert_close(w.T @ w, top @ top.T, atol=0.05, rtol=0)


def test_adapter_output_is_layer_normalised_and_centred():
    in_dim, out_dim = 12, 6
    _, _, cov, mean = known_covariance(in_dim, 2)
    ad = TeacherAdapter(in_dim, out_dim, trainable=False)
    ad.init_from_statistics(mean, cov)
    y = ad(torch.randn(2, 7, in_dim) * 3 + mean.float())
    assert y.shape == (2, 7, out_dim)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)
    torch.testing.assert_close(ad.proj(mean.float()), torch.zeros(out_dim), atol=1e-5, rtol=0)
    assert not any(isinstance(p, torch.nn.Parameter) for p in ad.norm.parameters())


def test_adapter_frozen_vs_trainable_gradients():
    x = torch.randn(2, 3, 12)
    frozen, trainable = TeacherAdapter(12, 6, trainable=False), TeacherAdapter(12, 6, trainable=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())
    assert frozen(x).grad_fn is None
    (trainable(x) * torch.randn(2, 3, 6)).sum().backward()
    assert trainable.proj.weight.grad is not None and trainable.proj.weight.grad.abs().sum() > 0


def test_adapter_init_errors():
    with pytest.raises(ValueError, match="out_dim <= in_dim"):
        TeacherAdapter(4, 8, trainable=False).init_from_statistics(torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"cov must be \(6, 6\)"):
        TeacherAdapter(6, 3, trainable=False).init_from_statistics(torch.zeros(6), torch.eye(5))
    with pytest.raises(ValueError, match=r"mean must be \(6,\)"):
        TeacherAdapter(6, 3, trainable=False).init_from_statistics(torch.zeros(5), torch.eye(6))
    with pytest.raises(ValueError, match="non-finite"):
        TeacherAdapter(6, 3, trainable=False).init_from_statistics(torch.zeros(6), torch.full((6, 6), float("nan")))


# -------------------------------------------------------------------------------------- student


def test_build_student_is_a_plain_timm_vit_with_fixed_positions():
    model = build_student(STUDENT, IMG, PATCH)
    assert type(model) is VisionTransformer
    assert model.pos_embed.shape == (1, 1 + N, DIM) and not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed.data, sincos_pos_embed_2d(DIM, GRID, cls_token=True))
    fresh = timm.create_model(STUDENT.arch, pretrained=False, num_classes=0, img_size=IMG, patch_size=PATCH,
                              **STUDENT.arch_kwargs)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(fresh.eval().forward_features(x), model.eval().forward_features(x))
    with pytest.raises(ValueError, match="arch_kwargs must not set"):
        build_student(StudentConfig(STUDENT.arch, {"img_size": 64}, STUDENT.mean, STUDENT.std), IMG, PATCH)


def test_student_forward_all_tokens_equals_forward_features():
    torch.manual_seed(0)
    model = build_student(STUDENT, IMG, PATCH).eval()
    images = torch.randn(2, 3, IMG, IMG)
    idx = torch.arange(N).expand(2, -1)
    tokens, patch_tokens = student_forward(model, patchify(images, PATCH), idx)
    torch.testing.assert_close(tokens, model.forward_features(images), atol=1e-5, rtol=1e-5)
    assert torch.equal(patch_tokens, tokens[:, 1:])


def test_student_forward_visible_subset_shapes():
    model = build_student(STUDENT, IMG, PATCH).eval()
    images, idx = torch.randn(2, 3, IMG, IMG), random_idx(2, 4, 3)
    patches = torch.gather(patchify(images, PATCH), 1, idx[:, :, None, None, None].expand(-1, -1, 3, PATCH, PATCH))
    tokens, patch_tokens = student_forward(model, patches, idx)
    assert tokens.shape == (2, 5, DIM) and patch_tokens.shape == (2, 4, DIM)


def test_gradients_reach_student_not_frozen_adapters_or_targets():
    """One CoMAD step's graph: student -> (projector, decoder) -> gate + dual KL."""
    torch.manual_seed(0)
    b, k, teachers, t_dim = 2, 4, 3, 48
    student = build_student(STUDENT, IMG, PATCH).train()
    proj, dec = Projector(DIM), MaskedDecoder(DIM, 2, 2, 2.0, GRID)
    adapters = [TeacherAdapter(t_dim, DIM, trainable=False) for _ in range(teachers)]
    idx = random_idx(b, k, 4)
    patches = torch.gather(patchify(torch.randn(b, 3, IMG, IMG), PATCH), 1,
                           idx[:, :, None, None, None].expand(-1, -1, 3, PATCH, PATCH))
    tokens, patch_tokens = student_forward(student, patches, idx)
    s, s_map = proj(patch_tokens), dec(tokens, idx)

    teacher_feats = torch.randn(b, teachers, N, t_dim, requires_grad=True)
    visible = torch.rand(b, teachers, N) < 0.6
    visible.scatter_(2, idx.unsqueeze(1).expand(-1, teachers, -1), True)  # V_k ⊇ V_s
    targets = torch.stack([adapters[j](teacher_feats[:, j]) for j in range(teachers)], dim=1)
    gidx = idx.unsqueeze(-1).expand(-1, -1, DIM)
    query = s_map.scatter(1, gidx, s)
    fused, _ = consensus_gate(query, targets, visible, "joint", 0.1)
    loss = TokenKLLoss(1.0)(s, torch.gather(fused, 1, gidx)) + MapKLLoss(1.0)(s_map, fused, visible.any(1))
    loss.backward()

    assert student.pos_embed.grad is None
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert proj.proj.weight.grad.abs().sum() > 0 and dec.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for a in adapters for p in a.parameters())
    assert teacher_feats.grad is None
