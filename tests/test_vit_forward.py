"""Token-dropping ViT forward: equal to timm's full forward and to MAE's reference encoder."""
from __future__ import annotations

import pytest
import timm
import torch

from vit_layers.forward import (
    check_supported_vit,
    embed_image_tokens,
    embed_patch_pixels,
    encode_tokens,
    forward_visible,
    patchify,
    unpatchify,
)

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2
TINY = dict(embed_dim=64, depth=2, num_heads=2)


def tiny_vit(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(TINY, img_size=IMG, patch_size=PATCH, num_classes=0)
    args.update(kw)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    # Random (not sin-cos / zero) positions and CLS so that a misplaced token changes the output.
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
        model.cls_token.normal_(std=0.5)
    return model


def random_keep(b: int, k: int, seed: int) -> torch.Tensor:
    """Random per-sample kept indices in MAE's order (argsort of noise): irregular, unsorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(b, N, generator=g), dim=1)[:, :k]


def mae_forward_encoder(model, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Independent re-implementation of MAE's ``forward_encoder`` (models_mae.py) with given ids_keep."""
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    x = x + model.pos_embed[:, 1:, :]
    d = x.shape[-1]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    cls_tokens = cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)


@torch.no_grad()
def test_all_tokens_kept_equals_timm_forward_features():
    model = tiny_vit()
    imgs = torch.randn(3, 3, IMG, IMG)
    keep = torch.arange(N).expand(3, -1)
    cls, tokens = forward_visible(model, imgs, keep)
    ref = model.forward_features(imgs)
    assert cls.shape == (3, 64) and tokens.shape == (3, N, 64)
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, ref[:, 1:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_matches_mae_reference_for_unsorted_random_keep():
    model = tiny_vit(1)
    imgs = torch.randn(4, 3, IMG, IMG)
    keep = random_keep(4, 6, seed=3)
    assert not torch.equal(keep, keep.sort(dim=1).values)  # the case under test really is unsorted
    ref = mae_forward_encoder(model, imgs, keep)
    cls, tokens = forward_visible(model, imgs, keep)
    # Order is preserved: token j is patch keep[:, j], exactly as in MAE.
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, ref[:, 1:], atol=1e-5, rtol=0)
    # Dropping tokens must matter, else the comparison above proves nothing.
    full = model.forward_features(imgs)
    assert (cls - full[:, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_sorting_keep_permutes_tokens_only():
    model = tiny_vit(2)
    imgs = torch.randn(2, 3, IMG, IMG)
    keep = random_keep(2, 7, seed=4)
    sorted_keep, order = keep.sort(dim=1)
    cls_a, tok_a = forward_visible(model, imgs, keep)
    cls_b, tok_b = forward_visible(model, imgs, sorted_keep)
    torch.testing.assert_close(cls_a, cls_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.gather(tok_a, 1, order.unsqueeze(-1).expand(-1, -1, 64)), tok_b,
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_embed_patch_pixels_equals_embed_image_tokens():
    model = tiny_vit(3)
    imgs = torch.randn(3, 3, IMG, IMG)
    keep = random_keep(3, 5, seed=5)
    patches = patchify(imgs, PATCH)  # (B, N, 3, p, p)
    visible = torch.gather(patches, 1, keep[:, :, None, None, None].expand(-1, -1, 3, PATCH, PATCH))
    a = embed_patch_pixels(model, visible, keep)
    b = embed_image_tokens(model, imgs, keep)
    assert a.shape == (3, 6, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_tokens(model, a), encode_tokens(model, b), atol=1e-5, rtol=0)


@torch.no_grad()
def test_embed_patch_pixels_with_patch_norm():
    # Some ViTs (e.g. CLIP-style) normalise patch tokens inside patch_embed; it must be applied too.
    model = tiny_vit(4)
    model.patch_embed.norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        model.patch_embed.norm.weight.normal_()
    imgs = torch.randn(2, 3, IMG, IMG)
    keep = random_keep(2, 4, seed=6)
    visible = torch.gather(patchify(imgs, PATCH), 1, keep[:, :, None, None, None].expand(-1, -1, 3, PATCH, PATCH))
    torch.testing.assert_close(embed_patch_pixels(model, visible, keep), embed_image_tokens(model, imgs, keep),
                               atol=1e-5, rtol=0)


def test_gradients_flow_through_embed_patch_pixels():
    # Not out.sum(): the final LayerNorm's outputs sum to a constant (its bias) over each token, so that
    # gradient is zero analytically and only rounding noise would be checked. A fixed random weighting of
    # the outputs has a gradient that is non-zero with probability 1, and everything is seeded.
    model = tiny_vit(5).train()
    keep = random_keep(2, 4, seed=7)
    g = torch.Generator().manual_seed(11)
    patches = torch.randn(2, 4, 3, PATCH, PATCH, generator=g)
    out = encode_tokens(model, embed_patch_pixels(model, patches, keep))
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    w_grad = model.patch_embed.proj.weight.grad
    assert w_grad is not None and float(w_grad.abs().max()) > 1e-3  # a real gradient, not float32 noise (~1e-7)
    # Only the kept positions (and CLS) receive position-embedding gradient; the others get exactly zero.
    per_pos = model.pos_embed.grad[0].abs().sum(-1)
    kept = {0} | {int(i) + 1 for i in keep.flatten()}
    assert set(torch.nonzero(per_pos).flatten().tolist()) == kept
    assert float(per_pos[sorted(kept)].min()) > 1e-3


def test_gradient_of_a_sum_after_layer_norm_is_zero():
    # Why the test above weights its outputs: with out.sum() the gradient reaching the tokens is ~0.
    model = tiny_vit(5).train()
    keep = random_keep(2, 4, seed=7)
    patches = torch.randn(2, 4, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(11))
    encode_tokens(model, embed_patch_pixels(model, patches, keep)).sum().backward()
    assert float(model.patch_embed.proj.weight.grad.abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_patchify_unpatchify_round_trip(dtype):
    imgs = (torch.rand(2, 3, 16, 24) * 255).to(dtype)
    p = patchify(imgs, 8)
    assert p.shape == (2, 6, 3, 8, 8) and p.dtype == dtype
    # Row-major: patch 4 is row 1, col 1.
    assert torch.equal(p[:, 4], imgs[:, :, 8:16, 8:16])
    assert torch.equal(unpatchify(p, (2, 3)), imgs)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        patchify(torch.zeros(1, 3, 30, 32), 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reg_tokens=4), "register tokens"),
        (dict(class_token=False, global_pool="avg"), "no CLS token"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(dynamic_img_size=True), "dynamic_img_size"),
        (dict(patch_drop_rate=0.25), "PatchDropout"),
        (dict(global_pool="avg", fc_norm=True), "fc_norm"),
    ],
)
def test_unsupported_vits_are_refused(kwargs, message):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=IMG, patch_size=PATCH, **TINY, **kwargs)
    with pytest.raises(ValueError, match=message):
        check_supported_vit(model)


def test_non_vit_is_refused_and_tiny_vit_accepted():
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        check_supported_vit(torch.nn.Linear(3, 3))
    check_supported_vit(tiny_vit())  # does not raise


@pytest.mark.parametrize(
    "keep, message",
    [
        (torch.tensor([[0, 16]]), r"in \[0, 16\)"),
        (torch.tensor([[-1, 2]]), r"in \[0, 16\)"),
        (torch.tensor([[3, 3]]), "duplicates=True"),
        (torch.tensor([[0.0, 1.0]]), "integer"),
        (torch.tensor([0, 1]), r"shape \(B=1, K\)"),
    ],
)
def test_bad_keep_idx_is_refused(keep, message):
    with pytest.raises(ValueError, match=message):
        forward_visible(tiny_vit(), torch.randn(1, 3, IMG, IMG), keep)


@torch.no_grad()
def test_integer_index_dtypes_are_accepted():
    model = tiny_vit()
    imgs = torch.randn(1, 3, IMG, IMG)
    keep = torch.tensor([[1, 5, 9]])
    a = forward_visible(model, imgs, keep)[1]
    b = forward_visible(model, imgs, keep.to(torch.int16))[1]
    assert torch.equal(a, b)


@torch.no_grad()
def test_grad_checkpointing_gives_the_same_tokens():
    model = tiny_vit(6)
    imgs = torch.randn(2, 3, IMG, IMG)
    keep = random_keep(2, 5, seed=8)
    ref = forward_visible(model, imgs, keep)[1]
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(forward_visible(model, imgs, keep)[1], ref, atol=1e-6, rtol=0)
