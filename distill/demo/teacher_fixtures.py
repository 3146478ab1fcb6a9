"""Three small teacher ViTs for the offline demo, each trained on the digits by a small version of its method.

Real ViT-B checkpoints cannot be downloaded offline, so the demo trains stand-ins that learn as MAE,
MoCo v3 and iBOT do (``fixture_objectives``: masked pixel reconstruction; momentum contrast with a
predictor; masked self-distillation on CLS and patch tokens). No objective sees a label: labels are
used only to measure the fixtures (kNN). MAE and MoCo v3 train with fixed sin-cos positions in their
own layouts, iBOT with learnable ones. All three start from the same initial backbone (one seed), so
the differences between them come from the objectives. Teachers see the train split only.

Reproducible: every random draw comes from one seeded generator (none from the global RNG), and the
training runs with recipe.num_threads intra-op threads and torch's deterministic algorithms (both
restored afterwards), so two trainings on one machine give bit-identical weights. Other CPUs may
differ: BLAS / oneDNN pick kernels by instruction set, which changes rounding.

Each fixture is saved in its method's official checkpoint layout and read back by ``load_teacher``
strictly. Results are cached under ``$COMAD_DEMO_CACHE`` (default ``~/.cache/comad-demo``) in a
directory named by a hash of the recipe, the teacher configs, the code and the library versions, so a
rerun skips training. The recipe's numbers are demo-fixture settings, not the method's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from distill.demo.digits_data import digits_images, stratified_split
from distill.demo.fixture_objectives import OBJECTIVES, build_objective
from distill.demo.fixture_recipe import FixtureRecipe
from store_schema.config import PipelineConfig, TeacherConfig
from vit_layers.checkpoints import build_vit, state_dict_sha256
from vit_layers.positions import sincos_pos_embed_2d

__all__ = ["OBJECTIVES", "FixtureRecipe", "TrainedFixture", "ensure_teachers", "fixture_key", "train_teacher"]

# Bump when the training code changes what a recipe produces. 2: MoCo v3 with momentum encoder and
# predictor, iBOT masked self-distillation (was: SimCLR-style contrast, supervised), fixed threads.
FIXTURE_CODE_VERSION = 2


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
# Training


@contextlib.contextmanager
def reproducible(num_threads: int) -> Iterator[None]:
    """Fixed intra-op threads and deterministic algorithms inside; the caller's settings restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@dataclass
class TrainedFixture:
    backbone: dict[str, Tensor]  # plain timm keys, no head: the weights the pipeline loads
    checkpoint: dict  # the object to torch.save in the method's official layout
    state: dict[str, Tensor]  # everything the objective trained (heads, EMA copies, centres), for hashing
    log: dict  # objective, steps, seconds, loss_first, loss_last


def _schedule(fmt: str, r: FixtureRecipe) -> tuple[int, float]:
    """(steps, peak lr) of a format's objective."""
    return {"mae": (r.mae_steps, r.mae_lr), "mocov3": (r.mocov3_steps, r.mocov3_lr),
            "ibot": (r.ibot_steps, r.ibot_lr)}[fmt]


def train_teacher(tcfg: TeacherConfig, image_size: int, patch_size: int, images: np.ndarray,
                  recipe: FixtureRecipe, steps: int | None = None) -> TrainedFixture:
    """Train one teacher with its format's objective on unlabelled uint8 images (B, H, W, 3).

    AdamW with linear warm-up and cosine decay, gradient clipping. Reproducible (see the module
    docstring): the result depends on the arguments only, not on the global RNG or the machine's
    thread count. log holds the mean loss of the first / last 10 steps.
    """
    if tcfg.format not in OBJECTIVES:
        raise ValueError(f"teacher {tcfg.name!r}: the demo trains fixtures for formats {sorted(OBJECTIVES)}, "
                         f"not {tcfg.format!r}")
    default_steps, peak_lr = _schedule(tcfg.format, recipe)
    steps = default_steps if steps is None else steps
    gen = torch.Generator().manual_seed(recipe.seed + 1)  # batches, views, masks
    with reproducible(recipe.num_threads):
        with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: seed it, then restore
            torch.manual_seed(recipe.seed)  # the same initial backbone for every objective
            model = build_vit(tcfg.arch, tcfg.arch_kwargs, image_size, patch_size)
            grid = model.patch_embed.grid_size[0]
            if tcfg.format in ("mae", "mocov3"):  # both train with fixed sin-cos positions, each in its own layout
                pos = sincos_pos_embed_2d(model.embed_dim, grid, True) if tcfg.format == "mae" else \
                    mocov3_sincos_pos_embed(model.embed_dim, grid)
                model.pos_embed.data.copy_(pos)
                model.pos_embed.requires_grad_(False)
            obj = build_objective(tcfg.format, model, tcfg.mean, tcfg.std, recipe, gen)
        obj.train()
        params = [p for p in obj.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=peak_lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
        x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        warmup = max(1, int(recipe.warmup_fraction * steps))
        losses, t0 = [], time.perf_counter()
        for step in range(steps):
            progress = step / steps
            for g in opt.param_groups:
                g["lr"] = peak_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
            idx = torch.randint(len(x_all), (min(recipe.batch_size, len(x_all)),), generator=gen)
            loss = obj.loss(x_all[idx], progress)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher {tcfg.name!r} ({obj.kind}): non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            obj.before_step(progress)
            opt.step()
            obj.after_step(progress)
            losses.append(loss.item())
        log = {"objective": obj.kind, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
               "loss_first": float(np.mean(losses[:10])) if losses else None,
               "loss_last": float(np.mean(losses[-10:])) if losses else None}
        obj.eval()
        backbone = {k: v.detach().clone() for k, v in obj.backbone().state_dict().items()}
        state = {k: v.detach().clone() for k, v in obj.state_dict().items()}
        return TrainedFixture(backbone, obj.checkpoint(steps), state, log)

# ----------------------------------------------------------------------------------------------
# The cache


def cache_root() -> Path:
    """$COMAD_DEMO_CACHE, else $XDG_CACHE_HOME/comad-demo, else ~/.cache/comad-demo."""
    if os.environ.get("COMAD_DEMO_CACHE"):
        return Path(os.environ["COMAD_DEMO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comad-demo"


def fixture_key(cfg: PipelineConfig, recipe: FixtureRecipe) -> str:
    """Hash of everything that decides the fixtures: recipe, teacher configs, sizes, code and library versions."""
    import sklearn  # here: an optional dependency (the `extras`), needed only when fixtures are (re)built

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


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_all(cfg: PipelineConfig, recipe: FixtureRecipe, into: Path, log: Callable[[str], None]) -> dict:
    """Train, save and measure every teacher of cfg into the directory `into`; returns the manifest.

    Labels are used here only, to measure the trained fixtures; the training sees unlabelled images.
    """
    images, labels = digits_images(cfg.data.image_size)
    train, test = stratified_split(labels, recipe.test_fraction, recipe.split_seed)
    y = torch.from_numpy(labels)
    manifest: dict = {"recipe": dataclasses.asdict(recipe), "teachers": {}, "cka": {},
                      "threads": recipe.num_threads, "cpu": _cpu_name()}
    test_feats: dict[str, tuple[Tensor, Tensor]] = {}
    for name, tcfg in cfg.teachers.items():
        log(f"teachers: training {name!r} ({OBJECTIVES.get(tcfg.format, '?')}) on {len(train)} unlabelled digits ...")
        fx = train_teacher(tcfg, cfg.data.image_size, cfg.data.patch_size, images[train], recipe)
        file = checkpoint_name(name, tcfg.format)
        torch.save(fx.checkpoint, into / file)
        model = build_vit(tcfg.arch, tcfg.arch_kwargs, cfg.data.image_size, cfg.data.patch_size)
        model.load_state_dict(fx.backbone, strict=True)
        with reproducible(recipe.num_threads):  # the manifest's numbers are as reproducible as the weights
            feats = teacher_features(model, images, tcfg.mean, tcfg.std)
        info = fx.log | {"format": tcfg.format, "file": file, "sha256": state_dict_sha256(fx.backbone),
                         "state_sha256": state_dict_sha256(fx.state), "file_sha256": _file_sha256(into / file)}
        for feat_name, f in zip(("cls", "mean_patch"), feats):
            info[f"knn_{feat_name}"] = knn_accuracy(f[train], y[train], f[test], y[test])
        log(f"teachers: {name!r} done in {info['seconds']:.0f}s, loss {info['loss_first']:.3f} -> "
            f"{info['loss_last']:.3f}, kNN cls {info['knn_cls']:.3f} mean-patch {info['knn_mean_patch']:.3f}, "
            f"weights sha256 {info['sha256'][:12]}")
        manifest["teachers"][name] = info
        test_feats[name] = (feats[0][test], feats[1][test])
    names = list(test_feats)
    for i, a in enumerate(names):  # how different the objectives made them: 1 = same up to rotation/scale
        for b in names[i + 1:]:
            manifest["cka"][f"{a}~{b}"] = {f: linear_cka(test_feats[a][j], test_feats[b][j])
                                           for j, f in enumerate(("cls", "mean_patch"))}
    return manifest


def _cpu_name() -> str:
    """The CPU model (what bit-reproducibility across machines depends on), best effort."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ensure_teachers(cfg: PipelineConfig, recipe: FixtureRecipe = FixtureRecipe(), root: Path | None = None,
                    log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """Trained teacher checkpoints for cfg's teachers: ({name: path}, manifest), training them if not cached.

    The manifest (also ``manifest.json`` in the cache entry) records per teacher the objective, file,
    sha256 of the backbone weights (``sha256``, what load_teacher reports), of everything the objective
    trained (``state_sha256``) and of the file, training time and loss, and kNN accuracy (k=20) of CLS and
    mean-patch features on the digits test split; and the linear CKA of every teacher pair's test features.
    An entry is filled under a temporary name and renamed, so it is complete or absent; when two runs race,
    the first complete entry wins.
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
