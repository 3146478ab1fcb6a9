"""Three small teacher ViTs for the offline demo, trained on the digits with different objectives.

Real ViT-B checkpoints cannot be downloaded offline, so the demo trains stand-ins that carry
*different* knowledge, as MAE, MoCo v3 and iBOT do:

- format ``mae``    -> masked reconstruction (MAE): 75 % of the tokens dropped, a narrow decoder
  regresses the per-patch normalised pixels of the dropped patches; fixed sin-cos positions (MAE layout);
- format ``mocov3`` -> contrastive (SimCLR-style InfoNCE between two augmented views through a
  projection MLP; in-batch negatives); fixed sin-cos positions in MoCo v3's own layout;
- format ``ibot``   -> supervised cross-entropy on the labels (learnable positions, as iBOT).

All three start from the same initial weights (one seed), so the differences between them come from
the objectives. Teachers see the train split only. Each backbone is saved with
``extract.teachers.save_in_official_format`` in its format and read back by ``load_teacher`` strictly.
Results are cached under ``$COMAD_DEMO_CACHE`` (default ``~/.cache/comad-demo``) in a directory named
by a hash of the recipe, the teacher configs and the library versions, so a rerun skips training.
The recipe's numbers are demo-fixture settings, not the method's (those live in the config).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from distill.demo.digits_data import digits_images, stratified_split
from distill.heads import sincos_pos_embed_2d
from extract.teachers import build_vit, save_in_official_format, state_dict_sha256
from extract.vit_forward import forward_visible, patchify
from store_schema.config import PipelineConfig, TeacherConfig

FIXTURE_CODE_VERSION = 1  # bump when the training code changes what a recipe produces
OBJECTIVES = {"mae": "masked_reconstruction", "mocov3": "contrastive", "ibot": "supervised"}  # by format


@dataclass(frozen=True)
class FixtureRecipe:
    # Measured with demo.toml's teachers: test kNN@20 (best of CLS / mean patch) 0.73 / 0.84 / 0.86 in
    # ~60 + 40 + 70 s on 2 cores. MAE at lr 3e-3 fell below a random backbone; supervised needs 3e-3.
    mae_steps: int = 600
    contrastive_steps: int = 150
    supervised_steps: int = 300
    mae_lr: float = 1e-3
    contrastive_lr: float = 1e-3
    supervised_lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    test_fraction: float = 0.2  # the digits split the demo evaluates on; teachers never see its test part
    split_seed: int = 0
    crop_scale: tuple[float, float] = (0.6, 1.0)  # mild crops for MAE and supervised training
    contrastive_crop_scale: tuple[float, float] = (0.3, 1.0)  # contrastive learning needs strong views
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    temperature: float = 0.2  # InfoNCE
    projection_dim: int = 64
    label_smoothing: float = 0.1


# ----------------------------------------------------------------------------------------------
# Positions, augmentation, features


def mocov3_sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """MoCo v3's ``build_2d_sincos_position_embedding``: (1, 1 + grid², dim), [sin a, cos a, sin b, cos b]."""
    if dim % 4 != 0:
        raise ValueError(f"MoCo v3 sin-cos positions need an embedding dim divisible by 4, got {dim}")
    a, b = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    oa, ob = a.reshape(-1, 1) * omega, b.reshape(-1, 1) * omega
    emb = torch.cat([oa.sin(), oa.cos(), ob.sin(), ob.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0).unsqueeze(0)


def random_resized_crop(x: Tensor, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
    """Batched RandomResizedCrop (ratio 3/4..4/3) by an affine resampling: (B, C, H, W) -> same shape."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen).exp()
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # box centre stays inside the image
    theta[:, 1, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_input(images: np.ndarray | Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 (B, H, W, 3) or float [0, 1] (B, 3, H, W) -> normalised float (B, 3, H, W)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def teacher_features(model: VisionTransformer, images: np.ndarray, mean: list[float], std: list[float],
                     batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Frozen features of uint8 images (B, H, W, 3): CLS (B, D) and mean patch token (B, D), final norm applied."""
    model.eval()
    cls, patch = [], []
    for i in range(0, len(images), batch_size):
        tokens = model.forward_features(to_input(images[i:i + batch_size], mean, std))  # (b, 1 + N, D)
        cls.append(tokens[:, 0])
        patch.append(tokens[:, 1:].mean(1))
    return torch.cat(cls), torch.cat(patch)


def knn_accuracy(train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int = 10) -> float:
    """DINO's weighted kNN on L2-normalised features (cosine similarity, weights exp(sim / T))."""
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # (n_test, n_train)
    top, idx = sim.topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between feature matrices (n, d1) and (n, d2) of the same n inputs; 1 = same up to rotation/scale."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


# ----------------------------------------------------------------------------------------------
# Objectives: each returns the trainable heads and a loss(images in [0, 1] (B, 3, H, W), labels (B,))


class _PixelDecoder(nn.Module):
    """MAE's decoder: visible tokens + mask tokens on the grid, fixed positions, blocks, per-patch pixels."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, patch: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(dim, grid, cls_token=False))
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, 3 * patch * patch)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """tokens (B, K, D) at grid indices keep (B, K) -> pixel predictions (B, N, 3 p p)."""
        x = self.embed(tokens)
        b, _, d = x.shape
        grid = self.mask_token.expand(b, self.pos.shape[1], d).scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x)
        return self.pred(self.norm(self.blocks(grid + self.pos)))


def _objective(kind: str, model: VisionTransformer, tcfg: TeacherConfig, r: FixtureRecipe,
               gen: torch.Generator) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    d, p = model.embed_dim, model.patch_embed.patch_size[0]
    n, grid = model.patch_embed.num_patches, model.patch_embed.grid_size[0]

    def inp(x: Tensor) -> Tensor:
        return to_input(x, tcfg.mean, tcfg.std)

    if kind == "masked_reconstruction":
        heads = _PixelDecoder(d, r.decoder_dim, r.decoder_depth, r.decoder_heads, grid, p)
        n_keep = max(1, round(n * (1 - r.mask_ratio)))

        def loss(x: Tensor, y: Tensor) -> Tensor:
            x = random_resized_crop(x, r.crop_scale, gen)
            keep = torch.rand(len(x), n, generator=gen).argsort(1)[:, :n_keep]  # (B, K) uniform random subset
            _, tokens = forward_visible(model, inp(x), keep)
            pred = heads(tokens, keep)  # (B, N, 3 p p)
            target = patchify(x, p).flatten(2)  # (B, N, 3 p p), MAE's norm_pix_loss target:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
            masked = torch.ones(len(x), n).scatter(1, keep, 0.0)  # 1 where dropped
            return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()
    elif kind == "contrastive":
        heads = nn.Sequential(nn.Linear(d, 2 * d), nn.BatchNorm1d(2 * d), nn.ReLU(), nn.Linear(2 * d, r.projection_dim))

        def loss(x: Tensor, y: Tensor) -> Tensor:
            views = []
            for _ in range(2):
                v = random_resized_crop(x, r.contrastive_crop_scale, gen)
                contrast = torch.empty(len(x), 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
                brightness = torch.empty(len(x), 1, 1, 1).uniform_(-0.2, 0.2, generator=gen)
                views.append((v - 0.5) * contrast + 0.5 + brightness)  # grey digits: intensity is the colour jitter
            z = F.normalize(heads(model.forward_features(inp(torch.cat(views)))[:, 0]), dim=1)  # (2B, c)
            logits = (z @ z.T / r.temperature).fill_diagonal_(float("-inf"))  # a view is not its own negative
            b = len(x)
            positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])  # view 1 of i <-> view 2 of i
            return F.cross_entropy(logits, positive)
    elif kind == "supervised":
        heads = nn.Linear(d, 10)

        def loss(x: Tensor, y: Tensor) -> Tensor:
            logits = heads(model.forward_features(inp(random_resized_crop(x, r.crop_scale, gen)))[:, 0])
            return F.cross_entropy(logits, y, label_smoothing=r.label_smoothing)
    else:
        raise ValueError(f"unknown fixture objective {kind!r}; choose one of {sorted(set(OBJECTIVES.values()))}")
    return heads, loss


def _schedule(kind: str, r: FixtureRecipe) -> tuple[int, float]:
    """(steps, peak lr) of an objective."""
    return {"masked_reconstruction": (r.mae_steps, r.mae_lr), "contrastive": (r.contrastive_steps, r.contrastive_lr),
            "supervised": (r.supervised_steps, r.supervised_lr)}[kind]


def train_teacher(tcfg: TeacherConfig, image_size: int, patch_size: int, images: np.ndarray, labels: np.ndarray,
                  recipe: FixtureRecipe, steps: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """Train one teacher backbone with the objective of its format on uint8 images (B, H, W, 3), labels (B,).

    Returns the backbone state dict (plain timm keys, no head) and a log {objective, steps, seconds,
    loss_first, loss_last} (mean loss of the first / last 10 steps).
    """
    if tcfg.format not in OBJECTIVES:
        raise ValueError(f"teacher {tcfg.name!r}: the demo trains fixtures for formats {sorted(OBJECTIVES)}, "
                         f"not {tcfg.format!r}")
    kind = OBJECTIVES[tcfg.format]
    default_steps, peak_lr = _schedule(kind, recipe)
    steps = default_steps if steps is None else steps
    gen = torch.Generator().manual_seed(recipe.seed + 1)  # batches, crops, masks
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without moving the caller's global RNG
        torch.manual_seed(recipe.seed)  # the same initial backbone for every objective
        model = build_vit(tcfg.arch, tcfg.arch_kwargs, image_size, patch_size)
        heads, loss_fn = _objective(kind, model, tcfg, recipe, gen)
    grid = model.patch_embed.grid_size[0]
    if tcfg.format in ("mae", "mocov3"):  # both train with fixed sin-cos positions, each in its own layout
        pos = sincos_pos_embed_2d(model.embed_dim, grid, True) if tcfg.format == "mae" else \
            mocov3_sincos_pos_embed(model.embed_dim, grid)
        model.pos_embed.data.copy_(pos)
        model.pos_embed.requires_grad_(False)
    model.train()
    heads.train()
    params = [p for p in list(model.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
    y_all = torch.from_numpy(labels).long()
    warmup = max(1, int(recipe.warmup_fraction * steps))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        lr = peak_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(x_all), (min(recipe.batch_size, len(x_all)),), generator=gen)
        loss = loss_fn(x_all[idx], y_all[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher {tcfg.name!r} ({kind}): non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
    log = {"objective": kind, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
           "loss_first": float(np.mean(losses[:10])) if losses else None,
           "loss_last": float(np.mean(losses[-10:])) if losses else None}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, log


# ----------------------------------------------------------------------------------------------
# The cache


def cache_root() -> Path:
    """$COMAD_DEMO_CACHE, else $XDG_CACHE_HOME/comad-demo, else ~/.cache/comad-demo."""
    if os.environ.get("COMAD_DEMO_CACHE"):
        return Path(os.environ["COMAD_DEMO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comad-demo"


def fixture_key(cfg: PipelineConfig, recipe: FixtureRecipe) -> str:
    """Hash of everything that decides the fixtures: recipe, teacher configs, sizes, code and library versions."""
    import sklearn
    import timm

    spec = {"code": FIXTURE_CODE_VERSION, "recipe": dataclasses.asdict(recipe),
            "image_size": cfg.data.image_size, "patch_size": cfg.data.patch_size,
            "teachers": {n: [t.arch, t.arch_kwargs, t.format, t.mean, t.std] for n, t in sorted(cfg.teachers.items())},
            "versions": [torch.__version__, timm.__version__, sklearn.__version__, np.__version__]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_name(name: str, fmt: str) -> str:
    return {"mae": f"{name}-mae_pretrain.pth", "mocov3": f"{name}-vit-300ep.pth.tar",
            "ibot": f"{name}-checkpoint_teacher.pth"}[fmt]


def _read_cache(entry: Path, cfg: PipelineConfig) -> tuple[dict[str, str], dict] | None:
    """({name: path}, manifest) of a complete cache entry for cfg's teachers, else None."""
    if not (entry / "manifest.json").is_file():
        return None
    manifest = json.loads((entry / "manifest.json").read_text())
    paths = {n: str(entry / t["file"]) for n, t in manifest["teachers"].items()}
    if set(paths) != set(cfg.teachers) or not all(Path(p).is_file() for p in paths.values()):
        return None
    return paths, manifest


def _train_all(cfg: PipelineConfig, recipe: FixtureRecipe, into: Path, log: Callable[[str], None]) -> dict:
    """Train, save and measure every teacher of cfg into the directory `into`; returns the manifest."""
    images, labels = digits_images(cfg.data.image_size)
    train, test = stratified_split(labels, recipe.test_fraction, recipe.split_seed)
    y = torch.from_numpy(labels)
    manifest: dict = {"recipe": dataclasses.asdict(recipe), "teachers": {}, "cka": {}}
    test_feats: dict[str, tuple[Tensor, Tensor]] = {}
    for name, tcfg in cfg.teachers.items():
        log(f"teachers: training {name!r} ({OBJECTIVES.get(tcfg.format, '?')}) on {len(train)} digits ...")
        sd, info = train_teacher(tcfg, cfg.data.image_size, cfg.data.patch_size, images[train], labels[train], recipe)
        file = checkpoint_name(name, tcfg.format)
        save_in_official_format(sd, str(into / file), tcfg.format)
        model = build_vit(tcfg.arch, tcfg.arch_kwargs, cfg.data.image_size, cfg.data.patch_size)
        model.load_state_dict(sd, strict=True)
        feats = teacher_features(model, images, tcfg.mean, tcfg.std)
        info |= {"format": tcfg.format, "file": file, "sha256": state_dict_sha256(sd)}
        for feat_name, f in zip(("cls", "mean_patch"), feats):
            info[f"knn_{feat_name}"] = knn_accuracy(f[train], y[train], f[test], y[test])
        log(f"teachers: {name!r} done in {info['seconds']:.0f}s, loss {info['loss_first']:.3f} -> "
            f"{info['loss_last']:.3f}, kNN cls {info['knn_cls']:.3f} mean-patch {info['knn_mean_patch']:.3f}")
        manifest["teachers"][name] = info
        test_feats[name] = (feats[0][test], feats[1][test])
    names = list(test_feats)
    for i, a in enumerate(names):  # how different the objectives made them: 1 = same up to rotation/scale
        for b in names[i + 1:]:
            manifest["cka"][f"{a}~{b}"] = {f: linear_cka(test_feats[a][j], test_feats[b][j])
                                           for j, f in enumerate(("cls", "mean_patch"))}
    return manifest


def ensure_teachers(cfg: PipelineConfig, recipe: FixtureRecipe = FixtureRecipe(), root: Path | None = None,
                    log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """Trained teacher checkpoints for cfg's teachers: ({name: path}, manifest), training them if not cached.

    The manifest (also ``manifest.json`` in the cache entry) records per teacher the objective, file,
    weights sha256, training time and loss, and kNN accuracy (k=20) of CLS and mean-patch features
    on the digits test split; and the linear CKA of every teacher pair's test features. An entry is
    filled under a temporary name and renamed, so it is complete or absent; when two runs race, the
    first complete entry wins.
    """
    entry = (root or cache_root()) / fixture_key(cfg, recipe)
    cached = _read_cache(entry, cfg)
    if cached is not None:
        log(f"teachers: cached in {entry}")
        return cached
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        manifest = {"key": entry.name, **_train_all(cfg, recipe, tmp, log)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if entry.exists() and _read_cache(entry, cfg) is None:  # an unusable entry (files deleted by hand)
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:  # a concurrent run completed this entry first (a directory is not replaced)
            if _read_cache(entry, cfg) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result = _read_cache(entry, cfg)  # what a cached run returns (JSON lists, not tuples)
    if result is None:
        raise RuntimeError(f"teacher cache entry {entry} is incomplete right after writing it")
    return result
