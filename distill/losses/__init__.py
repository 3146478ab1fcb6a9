"""Dual-level KL distillation losses (README, "How the teachers are fused"): one loss per module."""
from distill.losses.map_kl import MapKLLoss
from distill.losses.token_kl import TokenKLLoss

__all__ = ["MapKLLoss", "TokenKLLoss"]
