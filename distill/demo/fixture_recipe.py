"""The demo teacher fixtures' numbers (demo-fixture settings, not the method's: those live in the config).

Each fixture is a small version of its own method; the values follow the official recipes where a
digit-sized model can use them, and say so where they do not (short schedules need a faster EMA).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FixtureRecipe:
    # Schedules: measured 83 + 135 + 132 s (MAE, MoCo v3, iBOT; one thread each, a loaded 2-core machine), test
    # kNN@20 (best of CLS / mean patch) 0.89 / 0.71 / 0.47. iBOT needs far more steps than this budget: its
    # teacher's outputs drift to uniform (entropy -> ln K) within ~50 steps, so its EMA teacher stays near its
    # init (0.44 / 0.48) at every lr / momentum / temperature tried (lr 3e-4..2e-3, m 0.9..0.996, T_t 0.02..0.07).
    mae_steps: int = 600
    mocov3_steps: int = 200
    ibot_steps: int = 200
    mae_lr: float = 1e-3
    mocov3_lr: float = 1e-3
    ibot_lr: float = 5e-4  # 1e-3 and 2e-3 collapsed towards uniform outputs within 100 steps
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0  # the initial backbone (the same for every fixture); seed + 1 drives batches, views, masks
    # Reproducibility: intra-op threads during fixture training and measurement (restored afterwards).
    # CPU kernels reduce in an order that depends on the thread count, so it is fixed, not left to the machine.
    num_threads: int = 1
    # Data: the digits split the demo evaluates on; teachers never see its test part, nor any label.
    test_fraction: float = 0.2
    split_seed: int = 0
    # Views (all methods): RandomResizedCrop scale, then an intensity jitter (grey digits: no colour to jitter).
    mae_crop_scale: tuple[float, float] = (0.6, 1.0)  # MAE trains on mild crops
    view_crop_scale: tuple[float, float] = (0.3, 1.0)  # MoCo v3 / iBOT need strong, different views
    contrast: tuple[float, float] = (0.6, 1.4)
    brightness: float = 0.2  # shift uniform in [-b, b]
    # MAE: mask ratio, narrow decoder, normalised-pixel targets.
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    # MoCo v3: 3-layer projector and 2-layer predictor (Linear-BN-ReLU, last BN without affine), InfoNCE
    # at temperature T scaled by 2T, momentum m -> 1 by a cosine, frozen random patch projection.
    mocov3_temperature: float = 0.2
    mocov3_dim: int = 64  # official 256
    mocov3_mlp_dim: int = 256  # official 4096
    # Official 0.99 (cosine to 1) over 300 epochs; in 200 steps a 0.99 key encoder stays near its random init
    # (measured: CLS kNN 0.64 after 150 steps at 0.99, 0.69 at 0.9), so the short schedule uses 0.9.
    mocov3_momentum: float = 0.9
    mocov3_stop_grad_conv1: bool = True
    # iBOT: heads on CLS and patch tokens (shared MLP, weight-normalised last layers), centering and
    # sharpening, blockwise masks on the student's view, EMA teacher. Official out dims 8192; momentum 0.996
    # over 100+ epochs; a few hundred steps need a faster teacher (0.99).
    ibot_out_dim: int = 256
    ibot_patch_out_dim: int = 256
    ibot_hidden_dim: int = 128
    ibot_bottleneck_dim: int = 64
    ibot_momentum: float = 0.99  # cosine to 1
    ibot_student_temp: float = 0.1
    ibot_teacher_temp: tuple[float, float] = (0.04, 0.07)  # linear warm-up from the first to the second
    ibot_teacher_temp_warmup: float = 0.3  # fraction of the steps
    ibot_center_momentum: float = 0.9
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # official pred_ratio 0.3 +- 0.2
    ibot_mask_prob: float = 0.5  # official: half of the images masked (pred_ratio "0 0.3")
    ibot_mask_min_patches: int = 2  # BEiT's blockwise masking: smallest block (4 of 196 tokens there)
    ibot_mask_aspect: float = 0.3  # block aspect ratio in [a, 1/a]
    ibot_freeze_last_layer: float = 0.1  # fraction of the steps (upstream: the first epoch)
    ibot_cls_weight: float = 1.0  # lambda1
    ibot_patch_weight: float = 1.0  # lambda2
