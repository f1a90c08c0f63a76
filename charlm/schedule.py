"""Learning-rate schedule: linear warmup, then cosine decay to `lr * min_lr_ratio`."""

from __future__ import annotations

import math

from charlm.config import TrainConfig


def lr_at(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run planned for `total_steps`.

    Until the plan is known (a `--time` run still measuring its speed) the run is in
    warmup, whose rate does not depend on the total, so the schedule stays exact.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if total_steps is None:
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
