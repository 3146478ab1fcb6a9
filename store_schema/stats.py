"""Running feature statistics (count, mean, covariance) in float64, mergeable across units/processes.

Each unit stores its own (count, mean, M2) so that a redone unit replaces, never double-counts, its
contribution; the store-level statistics are a merge of the complete units (Chan et al.'s pairwise
update, exact up to float64 rounding whatever the merge order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RunningStats:
    dim: int
    count: int = 0
    mean: np.ndarray | None = None  # (D,) float64
    m2: np.ndarray | None = None  # (D, D) float64: sum of outer products of centred samples

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.m2 is None:
            self.m2 = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add samples x (M, D)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        if len(x) == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        self.merge(RunningStats(self.dim, len(x), mean, centred.T @ centred))

    def merge(self, other: "RunningStats") -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D); zeros when fewer than two samples."""
        if self.count < 2:
            return np.zeros_like(self.m2)
        return self.m2 / (self.count - 1)
