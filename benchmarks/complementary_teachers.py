"""Teachers that each carry a different part of the data, complementary by construction (issue 10, item 6).

Why not teachers trained on partitions of the labels. The first construction tried here trained teacher
A on c mod 5, B on c // 2, C on a third pairing (any two identify every class). It does not give
complementary teachers in fact: digits are so easy that a backbone trained on 5 groups keeps most of
the identity of the classes inside its groups (10-class kNN@20 0.90 for the c mod 5 teacher, measured),
and a within-group confusion adversary did not remove it either (kNN 0.79, linear probe 0.93, measured).
A smooth network cannot be made exactly blind to what its input shows; a probe always finds the rest.

Construction. Make what each teacher can see differ, exactly, in the *data*: every 8 x 8 digit is written
as an RGB image whose channel k holds the digit's horizontal band k only (the other rows zeroed on the
source grid, then upsampled bicubic to the benchmark's size as the demo does): R the top rows, G the
middle, B the bottom (``bands`` in benchmarks/fusion.toml, rows of the source grid: [0, 3), [3, 5),
[5, 8)). The band is cut before upsampling, so no channel holds a blur of its neighbours' rows (cutting
after upsampling gave the middle-band teacher 0.91 kNN, measured). The three channels together are the
whole digit; the student and the evaluation see all three.

Teacher k is a small ViT (the demo teachers' architecture) whose patch embedding reads **only channel
k**: it is trained with the other channels set to 0 after normalisation, and its patch-embedding weights
on the other channels are then set to exactly 0, which changes nothing on those inputs and makes its
features an exact function of band k (`assert_channel_blind` checks it on random inputs before the
teacher is saved). It is trained supervised, 10-way cross-entropy on the digit class from its CLS token
**and from every patch token** (one shared head on the patch tokens; CoMAD distils patch tokens, so they
must carry the teacher's part), under random token dropping (extraction's forward is token-dropped).

Why it guarantees complementarity. Whatever teacher k learns is a function of band k, so no single
teacher (and no student of a single teacher, whose targets are that function) can exceed what one band
says about the class; the three bands together are the digit. Measured on the raw 8 x 8 pixels (this
split, kNN k = 20 / logistic regression): top band 0.81 / 0.74, middle 0.80 / 0.75, bottom 0.74 / 0.74,
whole digit 0.97 / 0.96. So a student that fuses the three teachers' patch tokens has, in its targets,
information about the class that no single teacher has, by construction rather than by luck of fixture
objectives. Labels are used to train the teachers (a constructed benchmark); evaluation is on the
held-out test split, which the teachers never see.

All teachers start from the same initial weights (one seed), so their differences come from their
bands only. Training is deterministic: seeded generators for batches, crops and token subsets, and a
fixed torch thread count (``threads`` in the recipe). Teachers are saved as plain state dicts
(``format = "state_dict"``, the loader's strict path) and cached under ``$COMAD_DEMO_CACHE`` (default
``~/.cache/comad-demo``) in ``fusion-<hash>``, the hash of the recipe, the bands, the teacher configs, the
code version and the library versions, so a rerun skips training.
"""
from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from distill.demo.digits_data import stratified_split, write_tar
from distill.demo.fixture_views import random_resized_crop
from distill.demo.teacher_fixtures import knn_accuracy, teacher_features, to_input
from store_schema.config import PipelineConfig, TeacherConfig
from vit_layers.checkpoint_writers import save_in_official_format
from vit_layers.checkpoints import build_vit, state_dict_sha256
from vit_layers.forward import forward_visible

CODE_VERSION = 4  # bump when the code changes what a recipe produces
NUM_CLASSES = 10
SOURCE_GRID = 8  # the digits are 8 x 8
# ----------------------------------------------------------------------------------------------
# Small helpers (kept here, not imported from the demo fixtures: this benchmark must not move when they do)


def cache_root() -> Path:
    """$COMAD_DEMO_CACHE, else $XDG_CACHE_HOME/comad-demo, else ~/.cache/comad-demo (the demo's cache)."""
    if os.environ.get("COMAD_DEMO_CACHE"):
        return Path(os.environ["COMAD_DEMO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comad-demo"


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between (n, d1) and (n, d2) features of the same inputs; 1 = same up to rotation/scale."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


# ----------------------------------------------------------------------------------------------
# The data: one band of the digit per channel


def check_bands(bands: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """3 bands of source rows [a, b) that cover rows 0..7 of the 8 x 8 grid in order -> [(a, b)] as ints.

    Raises ValueError otherwise (one band per RGB channel, no gap, no overlap, none empty).
    """
    if len(bands) != 3:
        raise ValueError(f"need 3 bands (one per RGB channel), got {len(bands)}")
    out = [(int(b[0]), int(b[1])) for b in bands]
    if out[0][0] != 0 or out[-1][1] != SOURCE_GRID or any(out[i][1] != out[i + 1][0] for i in range(2)) \
            or any(a >= b for a, b in out):
        raise ValueError(f"bands {bands} must cover source rows 0..{SOURCE_GRID} in order, each non-empty")
    return out


def band_images(source: np.ndarray, bands: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """8 x 8 digits, uint8 (N, 8, 8) in 0..255 -> RGB uint8 (N, size, size, 3) where channel k is band k alone.

    The band is cut on the *source* grid, then upsampled (PIL bicubic, as distill.demo.digits_data does for
    the whole digit): channel k is a function of the source rows of band k only (upsampling a whole image
    first would blur neighbouring rows into every band).
    """
    out = np.zeros((len(source), size, size, 3), np.uint8)
    for k, (a, b) in enumerate(check_bands(bands)):
        for i, img in enumerate(source):
            part = np.zeros_like(img)
            part[a:b] = img[a:b]
            out[i, :, :, k] = np.asarray(Image.fromarray(part, "L").resize((size, size), Image.Resampling.BICUBIC))
    return out


def digits_source() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 8, 8) in 0..255 (as distill.demo.digits_data scales them) and labels (N,)."""
    from sklearn.datasets import load_digits  # here: scikit-learn is optional (the `extras`)

    d = load_digits()
    return np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class BandShards:
    train_urls: list[str]
    test_urls: list[str]
    train_index: np.ndarray
    test_index: np.ndarray


def write_band_shards(out_dir: str | Path, *, size: int, bands: Sequence[Sequence[int]], test_fraction: float,
                      seed: int, train_shards: int, test_shards: int) -> BandShards:
    """The digits with one band per channel as WebDataset shards `bands-{train,test}-NNNNNN.tar`.

    The same stratified, seeded split as the demo's digits shards; keys `digit-<sklearn index>`;
    reproducible bytes (distill.demo.digits_data.write_tar); a shard already there with the same bytes is
    left untouched, so a store extracted from it stays valid. Stale shards of either split are removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source, labels = digits_source()
    images = band_images(source, bands, size)
    train, test = stratified_split(labels, test_fraction, seed)
    urls: dict[str, list[str]] = {}
    for split, index, n in (("train", train, train_shards), ("test", test, test_shards)):
        names = [f"bands-{split}-{s:06d}.tar" for s in range(n)]
        for stale in out.glob(f"bands-{split}-*.tar"):
            if stale.name not in names:
                stale.unlink()
        urls[split] = []
        for name, part in zip(names, np.array_split(index, n)):
            path, tmp = out / name, out / f".{name}.new"
            write_tar(tmp, [(f"digit-{i:04d}", _png(images[i]), int(labels[i])) for i in part])
            if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
                tmp.unlink()  # the same bytes: keep the file (and its mtime; extraction checks it)
            else:
                tmp.replace(path)
            urls[split].append(str(path))
    return BandShards(urls["train"], urls["test"], train, test)


# ----------------------------------------------------------------------------------------------
# Teachers


@dataclass(frozen=True)
class TeacherRecipe:
    """Teacher-fixture settings (benchmarks/fusion.toml [bench.teacher_recipe]); not the method's numbers."""
    steps: int
    lr: float
    batch_size: int
    weight_decay: float
    warmup_fraction: float
    grad_clip: float
    seed: int
    threads: int  # torch threads while training: fixed, so the floats (and the cache entry) are reproducible
    crop_scale: tuple[float, float]
    keep_fraction: tuple[float, float]  # each batch keeps a uniform fraction of the tokens in this range
    cls_weight: float  # loss = cls_weight * CE(CLS head) + patch_weight * mean over kept patches CE(patch head)
    patch_weight: float
    label_smoothing: float
    test_fraction: float  # the digits split (the same as the shards'); teachers see the train part only
    split_seed: int

    @classmethod
    def from_dict(cls, d: Mapping) -> "TeacherRecipe":
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"teacher_recipe keys: missing {sorted(names - set(d))}, unknown {sorted(set(d) - names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def blind_to_other_channels(model: nn.Module, channel: int) -> None:
    """Zero the patch-embedding weights of every input channel but `channel`: the features no longer see them."""
    with torch.no_grad():
        w = model.patch_embed.proj.weight  # (D, 3, p, p)
        keep = torch.zeros(w.shape[1], dtype=torch.bool)
        keep[channel] = True
        w[:, ~keep] = 0.0


@torch.no_grad()
def assert_channel_blind(model: nn.Module, channel: int, image_size: int, seed: int = 0) -> float:
    """Max |feature change| when every channel but `channel` is replaced by noise; raises unless ~0."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, image_size, image_size, generator=g)
    y = x.clone()
    others = [c for c in range(3) if c != channel]
    y[:, others] = torch.randn(4, len(others), image_size, image_size, generator=g) * 3
    diff = float((model.forward_features(x) - model.forward_features(y)).abs().max())
    if diff > 1e-5:
        raise AssertionError(f"teacher of channel {channel} sees other channels: features change by {diff}")
    return diff


def _batch_losses(model: nn.Module, heads: nn.ModuleDict, x_all: Tensor, y_all: Tensor, only: Tensor,
                  tcfg: TeacherConfig, r: TeacherRecipe, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random batch, cropped and token-dropped -> (CE of the CLS head, CE of the patch head on every kept token)."""
    n = model.patch_embed.num_patches
    idx = torch.randint(len(x_all), (min(r.batch_size, len(x_all)),), generator=gen)
    x = to_input(random_resized_crop(x_all[idx], r.crop_scale, gen), tcfg.mean, tcfg.std) * only
    frac = float(torch.empty(()).uniform_(r.keep_fraction[0], r.keep_fraction[1], generator=gen))
    k = max(1, min(n, round(frac * n)))
    keep = torch.rand(len(x), n, generator=gen).argsort(1)[:, :k].sort(1).values  # (B, k)
    cls, tokens = forward_visible(model, x, keep)  # (B, D), (B, k, D)
    y = y_all[idx]
    loss_cls = F.cross_entropy(heads["cls"](cls), y, label_smoothing=r.label_smoothing)
    loss_patch = F.cross_entropy(heads["patch"](tokens).flatten(0, 1), y.repeat_interleave(k),
                                 label_smoothing=r.label_smoothing)
    return loss_cls, loss_patch


def _fit(model: nn.Module, heads: nn.ModuleDict, channel: int, images: np.ndarray, labels: np.ndarray,
         tcfg: TeacherConfig, r: TeacherRecipe, gen: torch.Generator,
         log: Callable[[str], None] | None) -> tuple[list[tuple[float, float]], float]:
    """AdamW, linear warm-up then cosine, on channel `channel` only -> ([(loss cls, loss patch)] per step, seconds)."""
    model.train()
    heads.train()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, betas=(0.9, 0.95), weight_decay=r.weight_decay)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y_all = torch.from_numpy(labels).long()
    only = torch.zeros(1, 3, 1, 1)
    only[0, channel] = 1.0
    warmup = max(1, int(r.warmup_fraction * r.steps))
    losses, t0 = [], time.perf_counter()
    for step in range(r.steps):
        lr = r.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / r.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss_cls, loss_patch = _batch_losses(model, heads, x_all, y_all, only, tcfg, r, gen)
        loss = r.cls_weight * loss_cls + r.patch_weight * loss_patch
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher {tcfg.name!r}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        opt.step()
        losses.append((loss_cls.item(), loss_patch.item()))
        if log is not None and (step + 1) % 100 == 0:
            last = np.mean(losses[-100:], 0)
            log(f"  step {step + 1}/{r.steps}: loss cls {last[0]:.3f} patch {last[1]:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return losses, time.perf_counter() - t0


def train_band_teacher(tcfg: TeacherConfig, channel: int, image_size: int, patch_size: int, images: np.ndarray,
                       labels: np.ndarray, r: TeacherRecipe, log: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, Tensor], dict]:
    """Train one backbone on channel `channel` of the band images only (10-way CE on CLS and every patch token).

    images: uint8 (B, H, W, 3) band images of the train split; labels: (B,) classes 0..9.
    Returns the backbone state dict (plain timm keys, no heads), blind to the other channels, and a log.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(r.threads)
    try:
        gen = torch.Generator().manual_seed(r.seed + 1)  # batches, crops, token subsets
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without moving the caller's RNG
            torch.manual_seed(r.seed)  # the same initial backbone for every teacher
            model = build_vit(tcfg.arch, tcfg.arch_kwargs, image_size, patch_size)
            heads = nn.ModuleDict({"cls": nn.Linear(model.embed_dim, NUM_CLASSES),
                                   "patch": nn.Linear(model.embed_dim, NUM_CLASSES)})
        blind_to_other_channels(model, channel)
        losses, seconds = _fit(model, heads, channel, images, labels, tcfg, r, gen, log)
        blind_to_other_channels(model, channel)  # already 0 (their inputs were 0: no gradient); made explicit
        blind = assert_channel_blind(model, channel, image_size)
    finally:
        torch.set_num_threads(threads)
    first, last = np.mean(losses[:10], 0), np.mean(losses[-10:], 0)
    info = {"objective": f"supervised, 10 classes, CLS + every patch token, channel {channel} only",
            "channel": channel, "steps": r.steps, "seconds": round(seconds, 1),
            "loss_cls_first": float(first[0]), "loss_cls_last": float(last[0]),
            "loss_patch_first": float(first[1]), "loss_patch_last": float(last[1]),
            "other_channels_max_feature_change": blind}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


# ----------------------------------------------------------------------------------------------
# The cache


def teachers_key(cfg: PipelineConfig, channels: Mapping[str, int], bands: Sequence[Sequence[int]],
                 r: TeacherRecipe) -> str:
    import sklearn  # optional, as in digits_source

    spec = {"code": CODE_VERSION, "recipe": dataclasses.asdict(r), "channels": dict(sorted(channels.items())),
            "bands": [list(map(int, b)) for b in bands], "image_size": cfg.data.image_size,
            "patch_size": cfg.data.patch_size,
            "teachers": {n: [t.arch, t.arch_kwargs, t.mean, t.std] for n, t in sorted(cfg.teachers.items())},
            "versions": [torch.__version__, timm.__version__, sklearn.__version__, np.__version__]}
    return "fusion-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(entry: Path, names: set[str]) -> tuple[dict[str, str], dict] | None:
    if not (entry / "manifest.json").is_file():
        return None
    manifest = json.loads((entry / "manifest.json").read_text())
    paths = {n: str(entry / t["file"]) for n, t in manifest["teachers"].items()}
    if set(paths) != names or not all(Path(p).is_file() for p in paths.values()):
        return None
    return paths, manifest


def _train_all(cfg: PipelineConfig, channels: Mapping[str, int], bands: Sequence[Sequence[int]], r: TeacherRecipe,
               into: Path, log: Callable[[str], None]) -> dict:
    source, labels = digits_source()
    images = band_images(source, bands, cfg.data.image_size)
    train, test = stratified_split(labels, r.test_fraction, r.split_seed)
    y = torch.from_numpy(labels)
    manifest: dict = {"recipe": dataclasses.asdict(r), "channels": dict(channels),
                      "bands": [list(map(int, b)) for b in bands], "teachers": {}, "cka": {}}
    test_feats: dict[str, tuple[Tensor, Tensor]] = {}
    for name, tcfg in cfg.teachers.items():
        ch = channels[name]
        log(f"teachers: training {name!r} on channel {ch} (band {bands[ch]}) of {len(train)} digits, "
            f"{r.steps} steps ...")
        sd, info = train_band_teacher(tcfg, ch, cfg.data.image_size, cfg.data.patch_size, images[train],
                                      labels[train], r, log=log)
        file = f"{name}-state_dict.pth"
        save_in_official_format(sd, str(into / file), "state_dict")
        model = build_vit(tcfg.arch, tcfg.arch_kwargs, cfg.data.image_size, cfg.data.patch_size)
        model.load_state_dict(sd, strict=True)
        feats = teacher_features(model, images, tcfg.mean, tcfg.std)  # full band images: it reads its channel
        info |= {"format": "state_dict", "file": file, "sha256": state_dict_sha256(sd)}
        for feat_name, f in zip(("cls", "mean_patch"), feats):
            info[f"knn_{feat_name}"] = knn_accuracy(f[train], y[train], f[test], y[test])
        log(f"teachers: {name!r} done in {info['seconds']:.0f}s, loss cls {info['loss_cls_first']:.3f} -> "
            f"{info['loss_cls_last']:.3f}, patch {info['loss_patch_first']:.3f} -> {info['loss_patch_last']:.3f}; "
            f"kNN@20 (full image, test) cls {info['knn_cls']:.3f} mean-patch {info['knn_mean_patch']:.3f}")
        manifest["teachers"][name] = info
        test_feats[name] = (feats[0][test], feats[1][test])
    names = list(test_feats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            manifest["cka"][f"{a}~{b}"] = {f: linear_cka(test_feats[a][j], test_feats[b][j])
                                           for j, f in enumerate(("cls", "mean_patch"))}
    return manifest


def ensure_band_teachers(cfg: PipelineConfig, channels: Mapping[str, int], bands: Sequence[Sequence[int]],
                         recipe: TeacherRecipe, root: Path | None = None,
                         log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """({teacher: checkpoint path}, manifest) for cfg's teachers, training them when not cached.

    channels: {teacher: RGB channel (= band) it reads}. An entry is filled under a temporary name and
    renamed, so it is complete or absent.
    """
    if set(channels) != set(cfg.teachers) or sorted(channels.values()) != [0, 1, 2]:
        raise ValueError(f"channels {channels} must give each of the teachers {sorted(cfg.teachers)} "
                         f"one of the channels 0, 1, 2")
    check_bands(bands)
    entry = (root or cache_root()) / teachers_key(cfg, channels, bands, recipe)
    cached = _read_cache(entry, set(cfg.teachers))
    if cached is not None:
        log(f"teachers: cached in {entry}")
        return cached
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        manifest = {"key": entry.name, **_train_all(cfg, channels, bands, recipe, tmp, log)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if entry.exists() and _read_cache(entry, set(cfg.teachers)) is None:
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:  # a concurrent run completed this entry first
            if _read_cache(entry, set(cfg.teachers)) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result = _read_cache(entry, set(cfg.teachers))
    if result is None:
        raise RuntimeError(f"teacher cache entry {entry} is incomplete right after writing it")
    return result
