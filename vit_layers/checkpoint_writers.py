"""Writing checkpoint files laid out like the official MAE / MoCo v3 / iBOT releases: the inverse of
`vit_layers.checkpoints.convert_checkpoint`, for tests, the offline demo and the benchmarks (no official
file can be downloaded here). Not used by extraction or training.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping

import safetensors.torch
import torch
from torch import Tensor

from vit_layers.checkpoints import FORMATS

__all__ = ["save_in_official_format"]



def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mlp_with_bn(prefix: str, dim: int, seed: int) -> dict[str, Tensor]:
    """Keys of MoCo v3's Linear-BN-ReLU-Linear-BN projection/prediction MLPs (hidden 2*dim)."""
    hid = 2 * dim
    out = {f"{prefix}.0.weight": _randn(hid, dim, seed=seed), f"{prefix}.3.weight": _randn(dim, hid, seed=seed + 1)}
    for i, n in ((1, hid), (4, dim)):
        out.update({f"{prefix}.{i}.weight": torch.ones(n), f"{prefix}.{i}.bias": torch.zeros(n),
                    f"{prefix}.{i}.running_mean": torch.zeros(n), f"{prefix}.{i}.running_var": torch.ones(n),
                    f"{prefix}.{i}.num_batches_tracked": torch.tensor(7)})
    return out


def _ibot_head(prefix: str, dim: int, seed: int) -> dict[str, Tensor]:
    """Keys of iBOT's head: an MLP and weight-normalised last layers for CLS and patch tokens."""
    out = {f"{prefix}.mlp.0.weight": _randn(2 * dim, dim, seed=seed), f"{prefix}.mlp.0.bias": torch.zeros(2 * dim)}
    for ll in ("last_layer", "last_layer2"):
        out.update({f"{prefix}.{ll}.weight_g": torch.ones(32, 1),
                    f"{prefix}.{ll}.weight_v": _randn(32, 2 * dim, seed=seed)})
    return out


def save_in_official_format(sd: Mapping[str, Tensor], path: str, fmt: str, *, full: bool = False) -> None:
    """Write a plain timm ViT backbone state dict laid out like the official ``fmt`` checkpoint file.

    mae -> ``{"model": sd}`` (+ MAE decoder and mask_token with ``full``); mocov3 -> the
    ``vit-b-300ep.pth.tar`` layout; ibot -> ``checkpoint_teacher.pth`` or, with ``full``, the
    ``checkpoint.pth`` layout; state_dict -> ``sd`` itself (safetensors when ``path`` ends in
    ``.safetensors``). Extra tensors are random; only the backbone matters.
    """
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    d = sd["cls_token"].shape[-1]
    n_pos = sd["pos_embed"].shape[1]
    p = sd["patch_embed.proj.weight"].shape[-1]
    if fmt == "mae":
        model = dict(sd)
        if full:
            dd = 16  # decoder width
            model.update({"mask_token": torch.zeros(1, 1, dd), "decoder_pos_embed": torch.zeros(1, n_pos, dd),
                          "decoder_embed.weight": _randn(dd, d, seed=1), "decoder_embed.bias": torch.zeros(dd),
                          "decoder_blocks.0.norm1.weight": torch.ones(dd), "decoder_blocks.0.attn.qkv.weight":
                          _randn(3 * dd, dd, seed=2), "decoder_norm.weight": torch.ones(dd),
                          "decoder_norm.bias": torch.zeros(dd), "decoder_pred.weight": _randn(p * p * 3, dd, seed=3),
                          "decoder_pred.bias": torch.zeros(p * p * 3)})
        obj: dict = {"model": model}
    elif fmt == "mocov3":
        state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
        state.update(_mlp_with_bn("module.base_encoder.head", d, seed=4))
        state.update({f"module.momentum_encoder.{k}": v.clone() for k, v in sd.items()})
        state.update(_mlp_with_bn("module.momentum_encoder.head", d, seed=4))
        state.update(_mlp_with_bn("module.predictor", d, seed=5))
        obj = {"epoch": 300, "arch": "vit_base", "state_dict": state,
               "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                             "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0]}]}}
    elif fmt == "ibot" and not full:
        obj = {"state_dict": sd}
    elif fmt == "ibot":
        teacher = {f"backbone.{k}": v for k, v in sd.items()} | _ibot_head("head", d, seed=6)
        student = {f"module.backbone.{k}": v + 0.01 for k, v in sd.items()}
        student |= {"module.backbone.masked_embed": torch.zeros(1, d)} | _ibot_head("module.head", d, seed=7)
        # Official iBOT checkpoints also pickle the argparse Namespace of the run.
        obj = {"teacher": teacher, "student": student, "epoch": 3,
               "args": argparse.Namespace(arch="vit_base", patch_size=p, out_dim=8192)}
    elif fmt == "state_dict":
        if path.endswith(".safetensors"):
            safetensors.torch.save_file(sd, path)
            return
        obj = sd
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    torch.save(obj, path)
