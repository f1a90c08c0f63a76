"""Measuring this machine for the planner: the speed probe, and the plan made with it.

The probe times the trainer's own step for each shape the planner asks about, on this
device and precision (rank 0 under torchrun; every rank gets its plan).
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from charlm.config.run import RunConfig
from charlm.data.records import RecordSet
from charlm.data.streams import Ids, split_data
from charlm.data.vocab import Vocab
from charlm.device import resolve_precision
from charlm.storage.rundir import RunDir
from charlm.training.budget import UNTIMED_STEPS, TimeBudget
from charlm.training.distributed import Dist
from charlm.training.planner import PROBE_TIMED_STEPS, Plan, Shape, make_plan
from charlm.training.trainer import Trainer


def step_seconds(shape: Shape, vocab_size: int, steps: int, device: Any, precision: str = "auto",
                 clock: Callable[[], float] = time.process_time, cfg: RunConfig | None = None) -> float:
    """Seconds a training step of `shape` takes: the median over `steps` steps of the trainer's
    own step (after the untimed warm-up steps), on random characters (speed does not depend on
    the text). `cfg` gives the rest of the recipe (the weight average costs a little too)."""
    trial = (cfg or RunConfig()).updated({**shape.settings(), "precision": precision})
    chars = max(4 * shape.batch_size * (shape.seq_len + 1) * (steps + UNTIMED_STEPS), 10_000)
    ids = np.random.default_rng(0).integers(0, vocab_size, chars, dtype=np.int64).astype(np.uint32)
    vocab = Vocab("".join(chr(0x100 + i) for i in range(vocab_size)))
    rng, py_rng = torch.get_rng_state(), random.getstate()
    with tempfile.TemporaryDirectory() as tmp:
        times = time_steps(Trainer(trial, vocab, ids, {}, RunDir(tmp), device), steps + UNTIMED_STEPS, clock)
    # The trainer seeded the global RNGs: leave them as they were.
    torch.set_rng_state(rng)
    random.setstate(py_rng)
    return float(np.median(times[UNTIMED_STEPS:]))


def time_steps(trainer: Trainer, steps: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Train `steps` steps outside any session (no evaluation, no save) and return the
    seconds each took on `clock` (the speed probe, benchmarks)."""
    budget = TimeBudget.fixed_steps(steps, clock)
    budget.begin()
    times = []
    for _ in range(steps):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        t0 = clock()
        trainer.step(budget, t0)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        times.append(clock() - t0)
    return times


def plan_run(cfg: RunConfig, explicit: set[str], data: Ids | RecordSet, vocab_size: int, device: torch.device,
             d: Dist | None = None, fine_tuning: bool = False) -> tuple[RunConfig, Plan]:
    """The planner's choice for this training data (as the run will split it), budget and
    machine, and the config it gives. Rank 0 measures and plans; every rank gets its plan."""
    d = d or Dist()
    plan = None
    if d.is_main:
        precision = resolve_precision(cfg.session.precision, device)

        def speed(shape: Shape) -> float:
            # Every process trains its own batch: the run's speed is the world's.
            seconds = step_seconds(shape, vocab_size, PROBE_TIMED_STEPS, device, precision, clock=time.perf_counter)
            return shape.chars_per_batch * d.world_size / seconds

        held = split_data(data, cfg.train.val_fraction)
        plan = make_plan(cfg, explicit, len(held.train), len(held.val), vocab_size, speed, device.type, fine_tuning)
    plan = d.broadcast(plan)
    assert plan is not None
    return cfg.updated(plan.settings).validate(), plan
