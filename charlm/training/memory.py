"""What a training run needs in memory, checked before anything is allocated.

Per process, for a batch of B streams x T characters (N = B x T), a model of P parameters
with L recurrent layers of H units, embedding size E and V characters, and `a` bytes per
activation value (4 in fp32; 3 under bf16 / fp16 autocast, which keeps part of them in fp32)::

    weights, gradients, AdamW's 2 moments    16 P                     fp32
    activations kept for the backward pass   N x ( L x S x H x a      per layer and character: the cell's
                                                                      gates and states (LSTM: gates 4H, c,
                                                                      tanh(c), h, output -> S = 8; GRU 9;
                                                                      RNN 3.5)
                                                 + K x H x a          the backward scratch of one layer
                                                                      (LSTM 9: oneDNN's gate gradients; 1)
                                                 + E x (4 + a)        embeddings and their autocast copy
                                                 + 16 V )             logits B x T x V in fp32, their
                                                                      log-softmax and two gradients
    saving a checkpoint                      2 x checkpoint bytes     it is serialized in memory: torch.save's
                                             (12 P + hidden + 32 KiB, buffer and the bytes copied out of it
                                             `checkpoint_bytes`)      (after the step: activations are freed)
    runtime                                  128 MiB                  allocator and kernel workspaces
    under torchrun                           + 4 P                    DDP's gradient buckets
    with --ema                               + 4 P                    the average of the weights (and
                                                                      + 4 P in the checkpoint)

The parameter count P is the model's own (`charlm.model.size`).

    need = runtime + 16 P (+ 4 P) + max(activations, checkpoint)

The coefficients were measured (peak RSS growth of real steps of charlm's Trainer on the
CPU, `benchmarks/memory_estimate.py`; the estimate is 5-40 % above the measurement for
every cell, depth and precision tried, see benchmarks/RESULTS.md) and are generous on purpose: the estimate decides
whether to refuse a run. On the CPU the need is compared with the memory the system has
available (MemAvailable, and the cgroup limit in a container; x the processes torchrun
starts on the machine, which share it), on CUDA with the free memory of the GPU. A plan
that cannot fit is refused with one line naming the settings to lower; an out-of-memory
error that still happens becomes that line too.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config.options import flag
from charlm.config.run import RunConfig
from charlm.device import resolve_precision
from charlm.errors import CharLMError
from charlm.fs import human
from charlm.model.size import parameter_count, state_values
from charlm.storage.checkpoint import checkpoint_bytes
from charlm.training.distributed import Dist

SAVED = {"lstm": 8.0, "gru": 9.0, "rnn": 3.5}  # values per hidden unit and character, per layer
SCRATCH = {"lstm": 9.0, "gru": 1.0, "rnn": 1.0}  # ... for the backward pass of one layer
LOGIT_BYTES = 16  # per character and vocabulary entry
RUNTIME = 128 << 20


@dataclass(frozen=True)
class Estimate:
    """Bytes one training process needs, by part."""

    parameters: int  # P
    weights: int  # weights, gradients and optimizer state (and DDP's buckets)
    activations: int  # one training step's activations
    checkpoint: int  # a checkpoint being serialized in memory
    runtime: int = RUNTIME

    @property
    def total(self) -> int:
        return self.runtime + self.weights + max(self.activations, self.checkpoint)


def estimate(cfg: RunConfig, vocab_size: int, precision: str, world_size: int = 1) -> Estimate:
    """What one process of a run with `cfg` needs (see the module docstring)."""
    m, t = cfg.model, cfg.train
    a = 4 if precision == "fp32" else 3
    chars = t.batch_size * t.seq_len
    per_char = (m.num_layers * SAVED[m.cell] * m.hidden_size * a + SCRATCH[m.cell] * m.hidden_size * a
                + m.embedding_size * (4 + a) + LOGIT_BYTES * vocab_size)
    p = parameter_count(m, vocab_size)
    ema = 4 if t.ema else 0
    saved = checkpoint_bytes(p, state_values(m, t.streams(world_size)), ema=bool(t.ema))
    return Estimate(parameters=p, weights=(16 + ema + (4 if world_size > 1 else 0)) * p,
                    activations=math.ceil(chars * per_char), checkpoint=2 * saved)


def available(device: torch.device) -> int | None:
    """Bytes free for this process's training on `device` (None: unknown, not checked)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None  # MPS shares memory with the system in ways it does not report
    free = _mem_available()
    limit = _cgroup_room()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages only (the page cache is not counted, so it is cautious)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Room left under a container's memory limit (cgroup v2, else v1), reclaimable cache
    counted as room; None when there is no limit."""
    for limit_file, usage_file, cache_key in (
            ("memory.max", "memory.current", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file")):
        base = Path("/sys/fs/cgroup")
        try:
            raw = (base / limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            used = int((base / usage_file).read_text())
            stat = (base / limit_file).parent / "memory.stat"
            cache = 0
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
            return max(0, int(raw) - used + cache)
        except (OSError, ValueError):
            continue
    return None


def local_processes(device: torch.device) -> int:
    """How many processes of this launch share the memory that `available` reports: the
    machine's torchrun processes on the CPU, one per GPU on CUDA."""
    if device.type == "cuda":
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def require(cfg: RunConfig, vocab_size: int, device: torch.device, d: Dist, resumed: bool) -> Estimate:
    """What one process of the run needs, checked on every rank before the model exists (a
    refusal on any rank stops them all)."""
    need = estimate(cfg, vocab_size, resolve_precision(cfg.session.precision, device), d.world_size)
    d.all_or_none(lambda: check(need, cfg, device, resumed))
    return need


def check(est: Estimate, cfg: RunConfig, device: torch.device, resumed: bool,
          free: int | None = None) -> None:
    """Refuse (one line) a run whose estimate does not fit in the memory available."""
    free = available(device) if free is None else free
    if free is None:
        return
    processes = local_processes(device)
    if est.total * processes <= free:
        return
    where = "on the GPU" if device.type == "cuda" else "in RAM"
    each = f" per process x {processes} processes" if processes > 1 else ""
    raise CharLMError(f"this run needs about {human(est.total)} of memory{each} ({describe(est, cfg)}) "
                      f"but {human(free)} is available {where}; {advice(est, cfg, resumed)}")


def describe(est: Estimate, cfg: RunConfig) -> str:
    t = cfg.train
    return (f"a batch of {t.batch_size:,} x {t.seq_len:,} characters: {human(est.activations)}; "
            f"{est.parameters:,} parameters with their gradients and optimizer state: {human(est.weights)}")


def advice(est: Estimate, cfg: RunConfig, resumed: bool) -> str:
    """Which settings to lower, the largest part first."""
    m, t = cfg.model, cfg.train
    batch = [("batch_size", t.batch_size), ("seq_len", t.seq_len), ("hidden_size", m.hidden_size)]
    model = [("hidden_size", m.hidden_size), ("num_layers", m.num_layers), ("batch_size", t.batch_size)]
    names = [f"{flag(k)} (now {v})" for k, v in (batch if est.activations >= est.weights else model)]
    if resumed:
        return (f"a run's {', '.join(names[:-1])} and {names[-1]} are fixed, so resume it where more memory "
                "is free, or start a new run with smaller settings")
    return f"lower {', '.join(names[:-1])} or {names[-1]}"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of PyTorch (CPU, CUDA, MPS) or of Python."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("not enough memory" in text or "out of memory" in text)


@contextlib.contextmanager
def out_of_memory_as_error(est: Estimate, cfg: RunConfig, device: torch.device, resumed: bool) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into the one-line refusal."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give back what the failed step held before saying so
        where = "the GPU" if device.type == "cuda" else "RAM"
        raise CharLMError(f"out of memory ({where}): this run needs about {human(est.total)} "
                          f"({describe(est, cfg)}); {advice(est, cfg, resumed)}") from None
