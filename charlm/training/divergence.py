"""When a training step has diverged, and what the user is told.

The rule, checked after the backward pass and before the optimizer step, so a diverged step
never reaches the weights: on the host on a CPU; on a GPU on the device, where the fused
optimizer skips a diverged step and the host reads the verdicts every few steps, before
anything is saved (`charlm.training.reads`). A step diverges when

- its loss is not a finite number (NaN or infinite), or
- its gradient norm is not finite (in fp32 and bf16; under fp16 the loss scaler skips such
  steps by design and lowers its scale), or
- its loss, in bits per character, exceeds the larger of
  `log2(V) + MARGIN_BITS` (2 bits per character worse than guessing uniformly among the
  V characters of the vocabulary) and `RATIO x` the run's last validation bpc (before the
  first evaluation `RATIO x log2(V)`: about where an untrained model starts).

A run that learns never comes near that limit (a model worse than a uniform guess over a
whole batch has lost what it learned), while a run whose learning rate is far too high
crosses it within a few steps, long before its loss turns into NaN. The limit depends only
on what a checkpoint holds (the last validation bpc), so an exact resume checks the same.

charlm then stops; it does not roll back to the last checkpoint and go on with a lower
learning rate: a run is defined by its settings (`TrainConfig`) and resumes bit for bit, and
a rollback would silently make it a different run, with a schedule nobody asked for. The
message says which checkpoint is the last good one and to train again with a lower `--lr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from charlm.errors import Diverged
from charlm.training.distributed import Dist

MARGIN_BITS = 2.0
RATIO = 3.0

# Why a step diverged, as an integer that torchrun ranks agree on (the highest wins).
FINE, EXPLODED, GRAD_NOT_FINITE, LOSS_NOT_FINITE = 0, 1, 2, 3


def loss_limit(vocab_size: int, last_val_bpc: float | None) -> float:
    """The largest loss (bits per character) a step may have (see the module docstring)."""
    uniform = math.log2(max(1, vocab_size))
    reference = uniform if last_val_bpc is None or not math.isfinite(last_val_bpc) else last_val_bpc
    return max(uniform + MARGIN_BITS, RATIO * reference)


def verdict(loss_bits: float | torch.Tensor, grad_norm: float | torch.Tensor | None, limit: float) -> torch.Tensor:
    """FINE, or why the step diverged, as a 0-d integer tensor on the loss's device (computed
    there, so no host read is needed; `grad_norm` None: not checked)."""
    loss = torch.as_tensor(loss_bits, dtype=torch.float32)
    code = torch.where(loss > limit, EXPLODED, FINE)
    if grad_norm is not None:
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device)
        code = torch.where(torch.isfinite(norm), code, GRAD_NOT_FINITE)
    return torch.where(torch.isfinite(loss), code, LOSS_NOT_FINITE)


def agreed(d: Dist, code: int, loss_bits: float) -> tuple[int, float]:
    """The verdict every rank of a torchrun launch agrees on (each rank's loss differs): the
    worst one, with the largest finite loss when this rank's is not finite."""
    if not d.enabled:
        return code, loss_bits
    code, milli = d.all_max([code, int(min(loss_bits, 1e12) * 1000) if math.isfinite(loss_bits) else 0])
    return code, loss_bits if math.isfinite(loss_bits) else milli / 1000


def describe(code: int, loss_bits: float, limit: float) -> str:
    """What went wrong, for the message."""
    if code == LOSS_NOT_FINITE:
        return "the loss is not a number (NaN or infinite)"
    if code == GRAD_NOT_FINITE:
        return "the gradient is not finite (NaN or infinite)"
    return (f"the loss jumped to {loss_bits:,.1f} bits per character, above the limit of {limit:.1f} "
            "(see `charlm.training.divergence`)")


def check_weights(models: Sequence[torch.nn.Module], step: int, lr: float, last_good: str | None) -> None:
    """Raise `Diverged` if any weight of `models` is not finite: never saved."""
    if not all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters()):
        raise Diverged(message(step, "the weights are not finite", lr, last_good), step)


def message(step: int, what: str, lr: float, last_good: str | None) -> str:
    """The one line the CLI prints (exit code 3); `last_good` names the last good checkpoint
    (None: the run saved none)."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint of this run was saved"
    again = "; resuming it would meet the same batch and diverge again" if last_good else ""
    return (f"training diverged at step {step}: {what}; that step was not applied and nothing was saved "
            f"from it; {kept}. Train again with a lower --lr (this run's peak: {lr:g}), in another --out or "
            f"with --force{again}")
