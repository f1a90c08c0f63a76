"""Measuring this machine for the planner: the speed probe, and the plan made with it.

The probe times the trainer's own step for each shape the planner asks about, on this
device and precision (rank 0 under torchrun; every rank gets its plan).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from charlm.config import RunConfig
from charlm.data import split
from charlm.device import resolve_precision
from charlm.distributed import Dist
from charlm.encode import EncodedCorpus
from charlm.plan import PROBE_STEPS, Plan, Shape, apply_plan, make_plan


def step_seconds(shape: Shape, vocab_size: int, steps: int, device: Any, precision: str = "auto",
                 clock: Callable[[], float] = time.process_time, cfg: RunConfig | None = None) -> float:
    """Seconds a training step of `shape` takes: the median over `steps` steps of the trainer's
    own step (after three warm-up steps), on random characters (speed does not depend on the
    text). `cfg` gives the rest of the recipe (the weight average costs a little too)."""
    import tempfile

    import numpy as np

    from charlm.budget import BudgetState, TimeBudget
    from charlm.rundir import RunDir
    from charlm.train import Trainer
    from charlm.vocab import Vocab

    base = (cfg or RunConfig()).to_dict()
    trial = RunConfig.from_dict(apply_plan(base, {**shape.settings(), "precision": precision}))
    chars = max(4 * shape.batch_size * (shape.seq_len + 1) * (steps + 3), 10_000)
    ids = np.random.default_rng(0).integers(0, vocab_size, chars, dtype=np.int64).astype(np.uint32)
    vocab = Vocab("".join(chr(0x100 + i) for i in range(vocab_size)))
    rng, py_rng = torch.get_rng_state(), random.getstate()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(trial, vocab, ids, {}, RunDir(tmp), device)
        budget = TimeBudget(BudgetState(), None, steps + 3, 10**9, lambda sps: 0.0, clock)
        budget.begin()
        times = []
        for _ in range(steps + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock()
            trainer._step(budget, t0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - t0)
    # The trainer seeded the global RNGs: leave them as they were.
    torch.set_rng_state(rng)
    random.setstate(py_rng)
    return float(np.median(times[3:]))


def plan_run(cfg: RunConfig, explicit: set[str], corpus: EncodedCorpus, device: torch.device,
             time_cap: float | None, d: Dist | None = None, fine_tuning: bool = False) -> tuple[RunConfig, Plan]:
    """The planner's choice for this corpus, budget and machine, and the config it gives.
    Rank 0 measures and plans; every rank gets its plan."""
    d = d or Dist()
    plan = None
    if d.is_main:
        precision = resolve_precision(cfg.session.precision, device)
        vocab = len(corpus.vocab)

        def speed(shape: Shape) -> float:
            # Every process trains its own batch: the run's speed is the world's.
            seconds = step_seconds(shape, vocab, PROBE_STEPS, device, precision, clock=time.perf_counter)
            return shape.batch_size * shape.seq_len * d.world_size / seconds

        train_chars = len(split(corpus.ids, cfg.train.val_fraction).train)
        plan = make_plan(cfg, explicit, train_chars, vocab, time_cap,
                         (cfg.session.max_steps or None), speed, device.type, fine_tuning)
    plan = d.broadcast(plan)
    assert plan is not None
    return RunConfig.from_dict(apply_plan(cfg.to_dict(), plan.settings)).validate(), plan
