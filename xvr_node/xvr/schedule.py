"""Learning-rate schedule for pose-regressor training: linear warm-up, then cosine decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Multiplier of the base learning rate at optimiser step ``step``.

    A class rather than a closure so ``LambdaLR.state_dict`` records its parameters and a
    restarted run continues on exactly the same curve.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        # (step + 1): the first optimiser step already moves the weights.
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A scheduler to step once per optimiser step (not per accumulated batch)."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
