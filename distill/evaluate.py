"""Frozen-feature evaluation: DINO's weighted kNN and a linear probe, on CLS or mean-patch features.

Features come from a labelled WebDataset (`cls` member = integer label) through a full forward (every
token kept). The eval transform is DINO's: resize the shorter side to R = floor(S / c) (bicubic,
antialiased — PIL's resampling always is) and centre-crop S x S, with S = data.image_size and
c = eval.crop_fraction (DINO: 0.875, 224 -> 256 -> 224; c = 1 resizes straight to S). It is built by
timm's own eval transform (`create_transform(is_training=False, crop_pct=c)`), so a timm user of the
export who sets crop_pct = c gets the same pixels. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.checkpoint import read_meta
from distill.export import load_export, load_student_from_checkpoint, resolve_checkpoint_dir, run_dir_of
from distill.student import build_student
from distill.tracking import log_eval
from store_schema.choices import FEATURES  # eval.features' choices, defined once
from store_schema.config import PipelineConfig, load_config
from store_schema.shards import Skipped, expand_urls, iter_tar
from vit_layers.checkpoints import load_teacher
from vit_layers.forward import forward_visible
from vit_layers.pixels import normalize_pixels

MAX_EXAMPLES = 20  # skipped samples listed by name in a report; the counts are always complete
INTERPOLATION = "bicubic"  # DINO's eval resize (torchvision interpolation=3)


# ----------------------------------------------------------------------------------------------
# Features


def resize_size(size: int, crop_fraction: float) -> int:
    """Shorter side before the centre crop: floor(size / crop_fraction), as timm computes it (224, 0.875 -> 256)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return math.floor(size / crop_fraction)


def build_eval_transform(size: int, crop_fraction: float) -> Callable[[Image.Image], Tensor]:
    """DINO's eval transform as timm builds it: RGB PIL image -> uint8 (3, size, size).

    Shorter side to resize_size(size, crop_fraction) (bicubic, antialiased), centre crop size x size;
    no normalisation (use_prefetcher: the model's mean/std are applied on its device by _encode).
    """
    resize_size(size, crop_fraction)  # validates crop_fraction before timm silently replaces a 0 by 0.875
    return create_transform(size, is_training=False, crop_pct=crop_fraction, crop_mode="center",
                            interpolation=INTERPOLATION, use_prefetcher=True)


def eval_transform(image: Image.Image, size: int, crop_fraction: float = 1.0) -> Tensor:
    """One image through build_eval_transform: RGB PIL image -> uint8 (3, size, size)."""
    return build_eval_transform(size, crop_fraction)(image).contiguous()


def protocol_transform(size: int, crop_fraction: float, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The eval transform as recorded in a result JSON."""
    return {"method": "DINO eval transform (timm create_transform, is_training=False, crop_mode=center)",
            "crop_fraction": crop_fraction, "resize_shorter_side": resize_size(size, crop_fraction),
            "crop": size, "interpolation": INTERPOLATION, "antialias": True,
            "mean": list(mean), "std": list(std), "tokens": "all kept"}


class _LabelledImages(IterableDataset):
    """(kind, uint8 image or None, label, reason) per sample group of the tars; kind: ok|unlabelled|skipped.

    Worker w of W reads tars w, w + W, ...; the DataLoader interleaves workers in a fixed order.
    """

    def __init__(self, urls: list[str], image_size: int, crop_fraction: float, max_image_pixels: int,
                 storage_options: dict | None = None) -> None:
        self.urls, self.max_image_pixels, self.storage_options = urls, max_image_pixels, storage_options
        self.transform = build_eval_transform(image_size, crop_fraction)

    def __iter__(self) -> Iterator[tuple[str, Tensor | None, int, str | None]]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        for url in urls:
            for item in iter_tar(url, self.max_image_pixels, self.storage_options, "eval.storage_options"):
                if isinstance(item, Skipped):
                    yield "skipped", None, -1, f"{url}#{item.index} ({item.key}): {item.reason}"
                elif item.label is None or item.label < 0:
                    why = (item.note or "no cls member") if item.label is None else f"negative label {item.label}"
                    yield "unlabelled", None, -1, f"{url}#{item.index} ({item.key}): {why}"
                else:
                    yield "ok", self.transform(item.image).contiguous(), item.label, None


@torch.no_grad()
def _encode(model: nn.Module, images: Tensor, mean: Tensor, std: Tensor, features: Sequence[str]) -> dict[str, Tensor]:
    """uint8 (B, 3, S, S) -> {feature: (B, D) float32 on the CPU} from a full forward."""
    device = mean.device
    x = normalize_pixels(images.to(device), mean, std)
    n = model.patch_embed.num_patches
    keep = torch.arange(n, device=device).expand(x.shape[0], n)
    cls, patches = forward_visible(model, x, keep)
    out = {"cls": cls, "mean_patch": patches.mean(dim=1)}
    return {f: out[f].float().cpu() for f in features}


def _encode_labelled(model: nn.Module, loader: DataLoader, mean: Tensor, std: Tensor, features: Sequence[str],
                     batch_size: int) -> tuple[dict[str, list[Tensor]], list[int], dict[str, Any]]:
    """_LabelledImages' samples, encoded `batch_size` at a time in eval mode -> ({feature: [(b, D)]}, labels, stats)."""
    stats: dict[str, Any] = {"n": 0, "skipped_unlabelled": 0, "skipped_undecodable": 0, "examples": []}
    feats: dict[str, list[Tensor]] = {f: [] for f in features}
    labels: list[int] = []
    batch: list[Tensor] = []

    def flush() -> None:
        for f, v in _encode(model, torch.stack(batch), mean, std, features).items():
            feats[f].append(v)
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        for kind, image, label, reason in loader:
            if kind != "ok":
                stats["skipped_unlabelled" if kind == "unlabelled" else "skipped_undecodable"] += 1
                if len(stats["examples"]) < MAX_EXAMPLES:
                    stats["examples"].append(reason)
                continue
            batch.append(image)
            labels.append(int(label))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    stats["n"] = len(labels)
    return feats, labels, stats


def extract_eval_features(model: nn.Module, urls: Sequence[str], cfg: PipelineConfig, mean: Sequence[float],
                          std: Sequence[float], features: Sequence[str] = FEATURES,
                          report: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Raw (not normalised) features of every labelled sample of `urls`, in reading order.

    Returns ({feature: (N, D) float32}, labels (N,) int64), on the CPU. Samples without a usable label
    (no `cls`, not an integer, negative) and samples that could not be decoded are left out and
    counted; pass `report={}` to receive {"n", "skipped_unlabelled", "skipped_undecodable",
    "examples"}. Runs the model on its own device, in eval mode, under no_grad.
    """
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; choose from {FEATURES}")
    size = cfg.data.image_size
    model_size = tuple(model.patch_embed.img_size)
    if model_size != (size, size):
        raise ValueError(f"the model expects {model_size[0]}x{model_size[1]} images but data.image_size = {size}; "
                         f"evaluate with the image size the model was built for")
    urls = expand_urls(list(urls), cfg.eval.storage_options)
    if not urls:
        raise ValueError("no evaluation tars: set eval.train_urls and eval.test_urls")
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    loader = DataLoader(_LabelledImages(urls, size, cfg.eval.crop_fraction, cfg.data.max_image_pixels,
                                        cfg.eval.storage_options), batch_size=None,
                        num_workers=min(cfg.data.num_workers, len(urls)),
                        generator=torch.Generator())  # its worker seed would otherwise come from the global RNG
    feats, labels, stats = _encode_labelled(model, loader, mean_t, std_t, features, cfg.eval.batch_size)
    if report is not None:
        report.update(stats)
    if not labels:
        raise ValueError(f"no labelled samples in {urls[:3]}{'...' if len(urls) > 3 else ''} "
                         f"({stats['skipped_unlabelled']} unlabelled, {stats['skipped_undecodable']} undecodable; "
                         f"e.g. {stats['examples'][:3]}); evaluation needs an integer `cls` member per sample")
    return {f: torch.cat(v) for f, v in feats.items()}, torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Protocols


@torch.no_grad()
def knn_classify(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, ks: Sequence[int],
                 temperature: float, num_classes: int, chunk_size: int = 256) -> dict[int, float]:
    """DINO's weighted kNN: cosine similarity of L2-normalised features, top-k neighbours vote with
    weight exp(sim / temperature), the class with the largest summed weight wins (ties: lowest class).

    train_f (Ntr, D), train_y (Ntr,), test_f (Nte, D), test_y (Nte,); labels in [0, num_classes).
    Returns {k: accuracy in [0, 1]}. The test set is processed `chunk_size` rows at a time, so memory
    is O(chunk_size * Ntr).
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must list positive integers, got {list(ks)}")
    if max(ks) > train_f.shape[0]:
        raise ValueError(f"k = {max(ks)} exceeds the {train_f.shape[0]} training samples; lower eval.knn_k")
    for name, y in (("train_y", train_y), ("test_y", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    train = F.normalize(train_f.float(), dim=1)
    train_y = train_y.to(train.device)
    kmax = max(ks)
    correct = dict.fromkeys(ks, 0)
    for start in range(0, test_f.shape[0], chunk_size):
        test = F.normalize(test_f[start:start + chunk_size].float().to(train.device), dim=1)
        y = test_y[start:start + chunk_size].to(train.device)
        sims, idx = (test @ train.T).topk(kmax, dim=1)  # sorted: the first k columns are the top k
        neighbour_y = train_y[idx]  # (c, kmax)
        weights = (sims / temperature).exp()
        for k in ks:
            votes = torch.zeros(test.shape[0], num_classes, device=train.device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_y[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(dim=1) == y).sum())
    return {k: correct[k] / max(test_f.shape[0], 1) for k in ks}


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, epochs: int, lr: float,
                 weight_decay: float, batch_size: int, seed: int, num_classes: int | None = None) -> float:
    """Test accuracy in [0, 1] of a linear classifier trained on frozen features.

    Features are standardised with the training mean/std; the layer (init N(0, 0.01), bias 0, as in
    DINO) is trained by SGD (momentum 0.9) with a per-step cosine lr from `lr` to 0 and cross-entropy.
    train_f (Ntr, D), test_f (Nte, D); runs on train_f's device; deterministic given `seed` on the CPU.
    """
    device = train_f.device
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean = train_f.float().mean(dim=0)
    std = train_f.float().std(dim=0, unbiased=False).clamp_min(1e-6)  # a constant feature stays 0
    x = (train_f.float() - mean) / std
    x_test = (test_f.float().to(device) - mean) / std
    y = train_y.to(device)
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.utils.skip_init(nn.Linear, x.shape[1], num_classes, device=device)  # no global-RNG draw
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for start in range(0, x.shape[0], batch_size):
            for group in opt.param_groups:  # closed form: torch's CosineAnnealingLR steps it recursively
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(layer(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = layer(x_test).argmax(dim=1)
    return float((pred == test_y.to(device)).float().mean())


# ----------------------------------------------------------------------------------------------
# Models and the whole evaluation


def evaluate_model(model: nn.Module, cfg: PipelineConfig, mean: Sequence[float], std: Sequence[float]) -> dict:
    """kNN and linear-probe accuracies for each of cfg.eval.features on cfg.eval.train_urls / test_urls.

    Returns {feature: {"knn@k": acc, ..., "linear": acc}, "protocol": {...}, "n_train", "n_test",
    "skipped_unlabelled", "skipped_undecodable", "skipped": {"train": report, "test": report}}.
    """
    e = cfg.eval
    features = list(dict.fromkeys(e.features))
    reports: dict[str, dict] = {"train": {}, "test": {}}
    train_f, train_y = extract_eval_features(model, e.train_urls, cfg, mean, std, features, reports["train"])
    test_f, test_y = extract_eval_features(model, e.test_urls, cfg, mean, std, features, reports["test"])
    # Dense class ids (sorted, so kNN ties still go to the lowest label): the votes and the probe need one
    # column per class present, not per integer up to the largest label (2^31 - 1 would ask for terabytes).
    classes, dense = torch.unique(torch.cat([train_y, test_y]), sorted=True, return_inverse=True)
    train_y, test_y, num_classes = dense[:train_y.numel()], dense[train_y.numel():], int(classes.numel())
    device = next(model.parameters()).device  # kNN and the probe run where the model does
    result: dict[str, Any] = {}
    for f in features:
        tr, te = train_f[f].to(device), test_f[f].to(device)
        accs = knn_classify(tr, train_y, te, test_y, e.knn_k, e.knn_temperature, num_classes)
        result[f] = {f"knn@{k}": acc for k, acc in accs.items()}
        result[f]["linear"] = linear_probe(tr, train_y, te, test_y, e.probe_epochs, e.probe_lr,
                                           e.probe_weight_decay, e.probe_batch_size, cfg.seed, num_classes)
    result["protocol"] = {
        "features": {"cls": "CLS token after the final norm",
                     "mean_patch": "mean of all patch tokens after the final norm"},
        "transform": protocol_transform(cfg.data.image_size, e.crop_fraction, mean, std),
        "knn": {"method": "DINO weighted kNN: L2-normalised features, cosine, weights exp(sim/T)",
                "k": list(e.knn_k), "temperature": e.knn_temperature},
        "linear": {"method": "linear layer on standardised frozen features, SGD momentum 0.9, cosine lr, "
                             "cross-entropy", "epochs": e.probe_epochs, "lr": e.probe_lr,
                   "weight_decay": e.probe_weight_decay, "batch_size": e.probe_batch_size, "seed": cfg.seed},
        "num_classes": num_classes, "train_urls": list(e.train_urls), "test_urls": list(e.test_urls),
    }
    result["n_train"], result["n_test"] = int(train_y.numel()), int(test_y.numel())
    result["skipped_unlabelled"] = reports["train"]["skipped_unlabelled"] + reports["test"]["skipped_unlabelled"]
    result["skipped_undecodable"] = reports["train"]["skipped_undecodable"] + reports["test"]["skipped_undecodable"]
    result["skipped"] = reports
    return result


def load_eval_model(cfg: PipelineConfig, *, checkpoint: str | Path | None = None, export: str | Path | None = None,
                    teacher: str | None = None, random_init_seed: int | None = None
                    ) -> tuple[nn.Module, list[float], list[float], str]:
    """Exactly one source -> (model on the CPU in eval mode, mean, std, short description)."""
    given = [n for n, v in (("checkpoint", checkpoint), ("export", export), ("teacher", teacher),
                            ("random_init_seed", random_init_seed)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --checkpoint, --export, --teacher, --random-init "
                         f"(got {given or 'none'})")
    if checkpoint is not None:
        ckpt = resolve_checkpoint_dir(checkpoint)
        model = load_student_from_checkpoint(cfg, ckpt)
        return model, list(cfg.student.mean), list(cfg.student.std), ckpt.name
    if export is not None:
        model, config = load_export(export)
        return model, config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"], f"export_{Path(export).name}"
    if teacher is not None:
        if teacher not in cfg.teachers:
            raise ValueError(f"unknown teacher {teacher!r}; configured teachers: {', '.join(cfg.teachers)}")
        tc = cfg.teachers[teacher]
        model, _ = load_teacher(tc, cfg.data.image_size, cfg.data.patch_size)
        return model.eval(), list(tc.mean), list(tc.std), f"teacher_{teacher}"
    with torch.random.fork_rng(devices=[]):  # a baseline must not shift the caller's random stream
        torch.manual_seed(int(random_init_seed))
        model = build_student(cfg.student, cfg.data.image_size, cfg.data.patch_size)
    return model.eval(), list(cfg.student.mean), list(cfg.student.std), f"random_init_{random_init_seed}"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_checkpoint(cfg: PipelineConfig, checkpoint_dir: str | Path) -> dict:
    """evaluate_model on the student of a trainer checkpoint (or a run dir's latest complete one); the
    accuracies also go to the run's TensorBoard."""
    model, mean, std, desc = load_eval_model(cfg, checkpoint=checkpoint_dir)
    result = {"model": desc, **evaluate_model(model.to(_device()), cfg, mean, std)}
    _log_to_run(cfg, checkpoint_dir, result)
    return result


def _log_to_run(cfg: PipelineConfig, checkpoint: str | Path, result: dict) -> None:
    """A checkpoint's accuracies into its run's TensorBoard, at the checkpoint's step (distill/tracking.py)."""
    ckpt = resolve_checkpoint_dir(checkpoint)
    log_eval(cfg, run_dir_of(ckpt), int(read_meta(ckpt).get("step", 0)), result["model"], result)


def format_table(result: dict) -> str:
    """Accuracies in percent, one row per feature."""
    rows = [f for f in FEATURES if f in result]
    cols = list(result[rows[0]]) if rows else []
    lines = [f"{'feature':<12}" + "".join(f"{c:>10}" for c in cols)]
    lines += [f"{r:<12}" + "".join(f"{100 * result[r][c]:>9.2f}%" for c in cols) for r in rows]
    lines.append(f"n_train={result['n_train']} n_test={result['n_test']} "
                 f"skipped: {result['skipped_unlabelled']} unlabelled, {result['skipped_undecodable']} undecodable")
    return "\n".join(lines)


def _export_run_config(export: Path) -> Path | None:
    """The config.toml of the run an export came from (config.json records its checkpoint), if still there."""
    try:
        source = json.loads((export / "config.json").read_text(encoding="utf-8"))["comad"]["source_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a comad export, or none at all: load_export names the problem
    saved = run_dir_of(Path(source)) / "config.toml"
    return saved if saved.is_file() else None


def main_eval(args: Any) -> dict:
    """CLI: `comad-distill eval --config X [--set ..] (--checkpoint DIR | --export DIR | --teacher NAME |
    --random-init SEED) [--out FILE.json]`. Without --config, the run's config.toml is used (of the checkpoint,
    or of the checkpoint an export was written from)."""
    config = args.config
    if config is None and args.checkpoint is not None:
        config = run_dir_of(resolve_checkpoint_dir(args.checkpoint)) / "config.toml"
    if config is None and args.export is not None:
        config = _export_run_config(Path(args.export))
    if config is None:
        raise ValueError("--config is required with --teacher / --random-init, and with an --export whose source run "
                         "has no config.toml; pass --config pipeline.toml (its [eval] section sets the data)")
    cfg = load_config(config, list(args.set or []))
    model, mean, std, desc = load_eval_model(cfg, checkpoint=args.checkpoint, export=args.export,
                                             teacher=args.teacher, random_init_seed=args.random_init)
    result = {"model": desc, **evaluate_model(model.to(_device()), cfg, mean, std)}
    if args.checkpoint is not None:
        _log_to_run(cfg, args.checkpoint, result)
    if args.out is not None:
        out = Path(args.out)
    elif args.checkpoint is not None:
        out = run_dir_of(resolve_checkpoint_dir(args.checkpoint)) / f"eval_{desc}.json"
    else:
        out = Path(cfg.train.run_dir) / f"eval_{desc}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{desc}:\n{format_table(result)}\nsaved {out}")
    return result
