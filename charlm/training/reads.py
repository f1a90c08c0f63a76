"""When the host reads a training step's loss: every step on a CPU, every few on a GPU.

On a GPU, every read of a step's loss on the host (`.item()`) waits for the step to finish
and leaves the GPU idle while the host launches the next one (on an H100 a 2x1024 step took
~18 ms whatever the width, several times what cuDNN's kernels take). There the losses and
divergence verdicts wait on the device (`Unread`) and are read every `SYNC_STEPS` steps and
before anything is saved, while a diverged step is skipped on the device by the fused
optimizer, so it still never reaches the weights (`charlm.training.divergence`).
"""

from __future__ import annotations

import torch

from charlm.training.events import StepStats

SYNC_STEPS = 16


def sync_interval(device_type: str, distributed: bool, loss_scaled: bool) -> int:
    """Steps between the host's reads of the training losses: SYNC_STEPS on a GPU, and 1
    (every step, before its optimizer step) on a CPU, where a step has finished by the time
    the host reads it, under torchrun (the ranks agree on each step's verdict) and with
    fp16's loss scaler (its own skip reads the host). The switch the CPU tests turn to cover
    the GPU's path (`Trainer.sync_every`)."""
    return SYNC_STEPS if device_type == "cuda" and not distributed and not loss_scaled else 1


class Unread:
    """Steps whose loss (bits per character) and divergence verdict are still on the device."""

    def __init__(self) -> None:
        self._steps: list[tuple[StepStats, torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, stats: StepStats, bits: torch.Tensor, code: torch.Tensor) -> None:
        """A step's stats (its bpc still to come) with its 0-d loss and verdict tensors."""
        self._steps.append((stats, bits, code))

    def read(self) -> list[tuple[StepStats, float, int]]:
        """Every unread step, in order, with its loss and verdict: one wait for the device."""
        if not self._steps:
            return []
        steps, self._steps = self._steps, []
        values = torch.stack([torch.stack([bits, code.to(bits.dtype)]) for _, bits, code in steps]).tolist()
        return [(stats, bits, int(code)) for (stats, _, _), (bits, code) in zip(steps, values, strict=True)]
