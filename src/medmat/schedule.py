"""What the trainer steps through, as pure functions of the step: the order of the training records and
the learning rate. A run resumed from a checkpoint needs no sampler or scheduler state beyond the step
to replay exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
from typing import Callable


class TrainOrder:
    """Training order as a pure function of (seed, epoch, micro-batch): resuming needs no sampler state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        import torch

        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = n // self.bs  # drop the ragged tail: every micro-batch has the same size
        self._torch = torch
        self._epoch, self._perm = -1, None

    def batch(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            g = self._torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = self._torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[j * self.bs : (j + 1) * self.bs]


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f
