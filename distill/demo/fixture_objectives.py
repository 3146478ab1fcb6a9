"""The demo teachers' objectives: each a small version of its own method, none of them sees a label.

- ``MAE``    masked pixel reconstruction: 75 % of the tokens dropped, a narrow decoder regresses the
  per-patch normalised pixels (norm_pix_loss) of the dropped patches (He et al. 2022);
- ``MoCoV3`` a query encoder + 3-layer projector + 2-layer predictor against a momentum (EMA) key
  encoder + projector; symmetric InfoNCE between two augmented views, scaled by 2T; momentum from m to 1
  by a cosine; frozen random patch projection (Chen et al. 2021);
- ``IBOT``   an EMA teacher and a student ViT with heads on CLS and on patch tokens; the teacher's outputs
  are centred and sharpened; the student sees blockwise-masked views (a learnt mask embedding replaces
  the masked patch embeddings) and predicts the teacher's patch distribution at the masked positions
  (MIM) plus the teacher's CLS distribution of the other view (Zhou et al. 2022).

Each objective owns its networks; ``loss(x, progress)`` takes images in [0, 1] (B, 3, H, W) and the
fraction of training done; ``after_step`` runs after the optimiser step; ``backbone()`` is the ViT the
fixture is (the MAE encoder, the MoCo v3 base encoder, the iBOT EMA teacher); ``checkpoint()`` is the
object saved in the method's official file layout, read back by ``vit_layers.checkpoints.load_teacher``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from distill.demo.fixture_recipe import FixtureRecipe
from distill.demo.fixture_views import block_masks, jittered_view, random_keep, random_resized_crop
from vit_layers.forward import encode_tokens, forward_visible, patchify
from vit_layers.positions import sincos_pos_embed_2d

OBJECTIVES = {"mae": "masked_reconstruction", "mocov3": "momentum_contrastive", "ibot": "masked_self_distillation"}


def cosine_to_one(base: float, progress: float) -> float:
    """EMA momentum schedule of MoCo v3 and iBOT: base at the start, 1 at the end."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * source, parameter by parameter (buffers are not averaged, as upstream)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(m).add_(s.detach(), alpha=1.0 - m)


class Objective(nn.Module):
    kind: str

    def __init__(self, mean: list[float], std: list[float], r: FixtureRecipe, gen: torch.Generator) -> None:
        super().__init__()
        self.r, self.gen = r, gen
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def norm(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def views(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = self.r
        return tuple(jittered_view(x, r.view_crop_scale, r.contrast, r.brightness, self.gen) for _ in range(2))

    def loss(self, x: Tensor, progress: float) -> Tensor:
        raise NotImplementedError

    def before_step(self, progress: float) -> None:
        """After backward, before the optimiser step."""

    def after_step(self, progress: float) -> None:
        """After the optimiser step."""

    def backbone(self) -> VisionTransformer:
        raise NotImplementedError

    def checkpoint(self, steps: int) -> dict:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# MAE


class _PixelDecoder(nn.Module):
    """MAE's decoder: the encoder's CLS and visible tokens, mask tokens at the dropped positions, fixed sin-cos
    positions (CLS at zero), blocks, norm, a per-patch pixel prediction (the CLS output dropped)."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, patch: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(dim, grid, cls_token=True))
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, 3 * patch * patch)

    def forward(self, cls: Tensor, tokens: Tensor, keep: Tensor) -> Tensor:
        """cls (B, D), tokens (B, K, D) at grid indices keep (B, K) -> pixel predictions (B, N, 3 p p)."""
        x = self.embed(torch.cat([cls.unsqueeze(1), tokens], dim=1))  # (B, 1 + K, d)
        b, _, d = x.shape
        n = self.pos.shape[1] - 1
        grid = self.mask_token.expand(b, n, d).scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        y = self.blocks(torch.cat([x[:, :1], grid], dim=1) + self.pos)
        return self.pred(self.norm(y))[:, 1:]


class MAE(Objective):
    kind = OBJECTIVES["mae"]

    def __init__(self, model: VisionTransformer, mean, std, r: FixtureRecipe, gen: torch.Generator) -> None:
        super().__init__(mean, std, r, gen)
        self.encoder = model
        self.decoder = _PixelDecoder(model.embed_dim, r.decoder_dim, r.decoder_depth, r.decoder_heads,
                                     model.patch_embed.grid_size[0], model.patch_embed.patch_size[0])

    def loss(self, x: Tensor, progress: float) -> Tensor:
        n, p = self.encoder.patch_embed.num_patches, self.encoder.patch_embed.patch_size[0]
        x = random_resized_crop(x, self.r.mae_crop_scale, self.gen)
        keep = random_keep(len(x), n, max(1, round(n * (1 - self.r.mask_ratio))), self.gen)  # (B, K)
        cls, tokens = forward_visible(self.encoder, self.norm(x), keep)
        pred = self.decoder(cls, tokens, keep)  # (B, N, 3 p p)
        target = patchify(x, p).flatten(2)  # (B, N, 3 p p), MAE's norm_pix_loss target:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(len(x), n).scatter(1, keep, 0.0)  # 1 where dropped: only those count
        return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()

    def backbone(self) -> VisionTransformer:
        return self.encoder

    def checkpoint(self, steps: int) -> dict:
        return {"model": _plain(self.encoder.state_dict())}  # mae_pretrain_vit_*.pth: the encoder alone


# ----------------------------------------------------------------------------------------------
# MoCo v3


def mocov3_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias) - BN - ReLU ..., the last Linear followed by BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1, d2 = in_dim if i == 0 else mlp_dim, out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(Objective):
    kind = OBJECTIVES["mocov3"]

    def __init__(self, model: VisionTransformer, mean, std, r: FixtureRecipe, gen: torch.Generator) -> None:
        super().__init__(mean, std, r, gen)
        d = model.embed_dim
        self.base_encoder, self.base_head = model, mocov3_mlp(3, d, r.mocov3_mlp_dim, r.mocov3_dim)
        self.predictor = mocov3_mlp(2, r.mocov3_dim, r.mocov3_mlp_dim, r.mocov3_dim)
        if r.mocov3_stop_grad_conv1:  # MoCo v3's stability trick: a fixed random patch projection
            model.patch_embed.proj.requires_grad_(False)
        self.momentum_encoder, self.momentum_head = copy.deepcopy(model), copy.deepcopy(self.base_head)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_head.parameters()]:
            p.requires_grad_(False)

    @staticmethod
    def _project(encoder: VisionTransformer, head: nn.Module, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Both views through one encoder pass (LayerNorm only: per-sample), the head per view (its BN sees
        one view)."""
        cls = encoder.forward_features(torch.cat([x1, x2]))[:, 0]  # (2B, D)
        c1, c2 = cls.chunk(2)
        return head(c1), head(c2)

    def _contrastive(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE of queries (B, c) against keys (B, c): the positive of q_i is k_i; scaled by 2T as upstream."""
        t = self.r.mocov3_temperature
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
        return F.cross_entropy(logits, torch.arange(len(q))) * (2 * t)

    def loss(self, x: Tensor, progress: float) -> Tensor:
        x1, x2 = (self.norm(v) for v in self.views(x))
        z1, z2 = self._project(self.base_encoder, self.base_head, x1, x2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():  # upstream updates the key encoder inside forward, before the keys
            m = cosine_to_one(self.r.mocov3_momentum, progress)
            ema_(self.momentum_encoder, self.base_encoder, m)
            ema_(self.momentum_head, self.base_head, m)
            k1, k2 = self._project(self.momentum_encoder, self.momentum_head, x1, x2)
        return self._contrastive(q1, k2) + self._contrastive(q2, k1)

    def backbone(self) -> VisionTransformer:
        return self.base_encoder

    def checkpoint(self, steps: int) -> dict:
        """vit-*-300ep.pth.tar: {epoch, arch, state_dict: module.{base_encoder,momentum_encoder,predictor}.*}."""
        state: dict[str, Tensor] = {}
        for prefix, net in (("module.base_encoder.", self.base_encoder), ("module.base_encoder.head.", self.base_head),
                            ("module.momentum_encoder.", self.momentum_encoder),
                            ("module.momentum_encoder.head.", self.momentum_head),
                            ("module.predictor.", self.predictor)):
            state |= {prefix + k: v for k, v in _plain(net.state_dict()).items()}
        return {"epoch": steps, "arch": "vit_demo", "state_dict": state}


# ----------------------------------------------------------------------------------------------
# iBOT


class IBOTHead(nn.Module):
    """iBOT's head: a shared 3-layer GELU MLP to an L2-normalised bottleneck, then weight-normalised last
    layers (norm fixed at 1, upstream's norm_last_layer) for CLS (``last_layer``) and patches (``last_layer2``)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int, patch_out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # upstream: trunc_normal(std=.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)  # weight_v; weight_g == 1
        self.last_layer2 = nn.Parameter(torch.randn(patch_out_dim, bottleneck) * 0.02)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, 1 + N, D) -> CLS logits (B, out_dim), patch logits (B, N, patch_out_dim)."""
        return self.cls(tokens[:, 0]), self.patch(tokens[:, 1:])

    def cls(self, tokens: Tensor) -> Tensor:
        """(..., D) CLS tokens -> (..., out_dim)."""
        return F.normalize(self.mlp(tokens), dim=-1) @ F.normalize(self.last_layer, dim=1).T

    def patch(self, tokens: Tensor) -> Tensor:
        """(..., D) patch tokens -> (..., patch_out_dim); per token, so it may run on a subset of them."""
        return F.normalize(self.mlp(tokens), dim=-1) @ F.normalize(self.last_layer2, dim=1).T


class IBOT(Objective):
    kind = OBJECTIVES["ibot"]

    def __init__(self, model: VisionTransformer, mean, std, r: FixtureRecipe, gen: torch.Generator) -> None:
        super().__init__(mean, std, r, gen)
        d = model.embed_dim
        self.student = model
        self.student_head = IBOTHead(d, r.ibot_hidden_dim, r.ibot_bottleneck_dim, r.ibot_out_dim, r.ibot_patch_out_dim)
        self.masked_embed = nn.Parameter(torch.zeros(1, d))  # upstream's student-only mask embedding
        self.teacher, self.teacher_head = copy.deepcopy(model), copy.deepcopy(self.student_head)
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, r.ibot_out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, r.ibot_patch_out_dim))

    def _tokens(self, vit: VisionTransformer, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, 3, H, W), mask (B, N) bool or None -> all tokens after the final norm (B, 1 + N, D).
        As upstream's prepare_tokens: masked patch embeddings become masked_embed, then positions are added."""
        t = vit.patch_embed(x)  # (B, N, D)
        if mask is not None:
            t = torch.where(mask.unsqueeze(-1), self.masked_embed.to(t.dtype), t)
        return encode_tokens(vit, vit._pos_embed(t))

    def _teacher_temp(self, progress: float) -> float:
        lo, hi = self.r.ibot_teacher_temp
        return lo + (hi - lo) * min(1.0, progress / max(self.r.ibot_teacher_temp_warmup, 1e-8))

    def loss(self, x: Tensor, progress: float) -> Tensor:
        r, grid = self.r, self.student.patch_embed.grid_size[0]
        views = torch.cat([self.norm(v) for v in self.views(x)])  # (2B, 3, H, W): view 1 then view 2
        masks = block_masks(len(views), grid, r.ibot_mask_ratio, r.ibot_mask_prob, r.ibot_mask_min_patches,
                            r.ibot_mask_aspect, self.gen)  # (2B, N)
        tokens = self._tokens(self.student, views, masks)  # (2B, 1 + N, D)
        s_cls = self.student_head.cls(tokens[:, 0])
        # The patch loss reads masked positions only, and the head is per token: running it on those alone
        # gives upstream's loss at a fraction of the cost.
        s_patch = self.student_head.patch(tokens[:, 1:][masks])  # (M, Kp)
        with torch.no_grad():  # the teacher sees the unmasked views
            t_cls, t_patch = self.teacher_head(self._tokens(self.teacher, views, None))
            temp = self._teacher_temp(progress)
            p_cls = F.softmax((t_cls - self.center) / temp, dim=-1)  # (2B, K): centred, sharpened
            p_patch = F.softmax((t_patch[masks] - self.center2[0]) / temp, dim=-1)  # (M, Kp)
        b = len(x)
        swap = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])  # CLS: teacher view q vs student view v != q
        cls_loss = -(p_cls[swap] * F.log_softmax(s_cls / r.ibot_student_temp, dim=-1)).sum(-1).mean()
        mim = -(p_patch * F.log_softmax(s_patch / r.ibot_student_temp, dim=-1)).sum(-1)  # (M,): same view
        # per image: mean over its masked patches; images without a mask add 0 to the batch mean, as upstream
        owner = masks.nonzero()[:, 0]  # (M,) image of each masked patch
        per_image = torch.zeros(len(views)).index_add(0, owner, mim)
        patch_loss = (per_image / masks.sum(-1).clamp(min=1)).mean()
        with torch.no_grad():  # centres follow the teacher's batch means (EMA), after being used
            cm = r.ibot_center_momentum
            self.center.mul_(cm).add_(t_cls.mean(0, keepdim=True), alpha=1 - cm)
            self.center2.mul_(cm).add_(t_patch.mean((0, 1), keepdim=True), alpha=1 - cm)
        return r.ibot_cls_weight * cls_loss + r.ibot_patch_weight * patch_loss

    def before_step(self, progress: float) -> None:
        if progress < self.r.ibot_freeze_last_layer:  # upstream freezes the last layers early on, against collapse
            self.student_head.last_layer.grad = self.student_head.last_layer2.grad = None

    def after_step(self, progress: float) -> None:
        m = cosine_to_one(self.r.ibot_momentum, progress)
        ema_(self.teacher, self.student, m)
        ema_(self.teacher_head, self.student_head, m)

    def backbone(self) -> VisionTransformer:
        return self.teacher  # iBOT evaluates and releases the EMA teacher

    def checkpoint(self, steps: int) -> dict:
        return {"state_dict": _plain(self.teacher.state_dict())}  # checkpoint_teacher.pth: the teacher backbone


def _plain(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def build_objective(fmt: str, model: VisionTransformer, mean: list[float], std: list[float], r: FixtureRecipe,
                    gen: torch.Generator) -> Objective:
    classes = {"mae": MAE, "mocov3": MoCoV3, "ibot": IBOT}
    if fmt not in classes:
        raise ValueError(f"the demo trains fixtures for formats {sorted(classes)}, not {fmt!r}")
    return classes[fmt](model, mean, std, r, gen)
