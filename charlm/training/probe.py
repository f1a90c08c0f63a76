"""Measuring this machine for the planner: the speed probe, its cache, and the plan made with it.

The probe times the trainer's own step for each shape the planner asks about, on this
device and precision (rank 0 under torchrun; every rank gets its plan). What it measures is
kept in `speeds.json` beside the corpus cache (or in $CHARLM_SPEEDS), keyed by everything a
step's speed depends on (`speed_key`: the CPU's model and the instruction sets that pick its
kernels, or the GPU; threads, PyTorch, precision, the shape and the vocabulary), so a second
run on the same machine measures nothing: its seconds go to training. A session that trains
long enough writes what its own steps took over the probe's few (`remember_speed`): the
probe's five steps can be off by half (measured on a 2-core EPYC: 59-73 ms a step for a
2x384 LSTM the runs then trained at ~47 ms), and the planner weighs the widths by the work
(parameters x characters) those speeds buy.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.config.run import ModelConfig, RunConfig
from charlm.data.cache import default_cache_dir
from charlm.data.records import RecordSet
from charlm.data.streams import Ids, split_data
from charlm.data.vocab import Vocab
from charlm.device import machine, resolve_precision
from charlm.fs import write_atomic
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
    rng, py_rng = torch.get_rng_state(), random.getstate()
    with tempfile.TemporaryDirectory() as tmp:
        times = time_steps(trial_trainer(trial, vocab_size, steps + UNTIMED_STEPS, device, tmp),
                           steps + UNTIMED_STEPS, clock)
    # The trainer seeded the global RNGs: leave them as they were.
    torch.set_rng_state(rng)
    random.setstate(py_rng)
    return float(np.median(times[UNTIMED_STEPS:]))


def trial_trainer(cfg: RunConfig, vocab_size: int, steps: int, device: Any, folder: str) -> Trainer:
    """A trainer of `cfg` on random characters enough for `steps` steps (speed does not depend
    on the text), writing nothing unless asked, into `folder`."""
    t = cfg.train
    chars = max(4 * t.batch_size * (t.seq_len + 1) * steps, 10_000)
    ids = np.random.default_rng(0).integers(0, vocab_size, chars, dtype=np.int64).astype(np.uint32)
    vocab = Vocab("".join(chr(0x100 + i) for i in range(vocab_size)))
    return Trainer(cfg, vocab, ids, {}, RunDir(folder), device)


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


SPEEDS_ENV = "CHARLM_SPEEDS"
SPEEDS_FORMAT = 1  # bump when the key or what is measured changes
def speeds_file() -> Path:
    """$CHARLM_SPEEDS, else speeds.json in the corpus cache folder."""
    return Path(os.environ[SPEEDS_ENV]).expanduser() if os.environ.get(SPEEDS_ENV) else \
        default_cache_dir() / "speeds.json"


def speed_key(shape: Shape, vocab_size: int, device: torch.device, precision: str,
              model: ModelConfig | None = None) -> str:
    """The cache key of one shape's step time on this machine (`speed_prefix` + the shape),
    with `model`'s weight drop and locked dropout where they are on: they train each layer
    in its own call, another speed."""
    s = shape
    regularized = f" wd{model.weight_drop:g} ld{model.locked_dropout:g}" if model and model.regularized() else ""
    return (f"{speed_prefix(device, precision)}{s.cell} {s.num_layers}x{s.hidden_size} e{s.embedding_size} "
            f"d{s.dropout:g} b{s.batch_size}x{s.seq_len} v{vocab_size}{regularized}")


def speed_prefix(device: torch.device, precision: str) -> str:
    """What every key of this machine and precision starts with."""
    return f"{machine(device)} {precision} "


class SpeedCache:
    """Seconds per step measured on this machine, by `speed_key`, and which of them a run
    measured over its own steps (the rest are the probe's). A cache: a file that cannot be
    read is no entries, one that cannot be written is not written."""

    def __init__(self, path: Path) -> None:
        self.path, self.hits = path, 0
        self.speeds: dict[str, float] = {}
        self.settled: set[str] = set()  # measured by a run, or corrected by one: never rescaled
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format") == SPEEDS_FORMAT and isinstance(data.get("speeds"), dict):
                self.speeds = {k: float(v) for k, v in data["speeds"].items()}
                self.settled = {str(k) for k in data.get("settled", [])} & self.speeds.keys()
        except (OSError, ValueError, TypeError):
            self.speeds, self.settled = {}, set()

    def get(self, key: str) -> float | None:
        seconds = self.speeds.get(key)
        self.hits += seconds is not None
        return seconds if seconds is not None and seconds > 0 else None

    def put(self, key: str, seconds: float) -> None:
        """A probe's measurement."""
        self.speeds[key] = seconds
        self._write()

    def measured_by_run(self, key: str, seconds: float, prefix: str) -> None:
        """A run's own seconds per step for `key`. Where the probe had measured that shape, its
        other measurements of the machine (keys starting with `prefix`) are corrected by the
        same ratio: the probe's few early steps are off for every width alike (slow by a third
        in one first run, 10-20 % in others), and the planner compares widths by them."""
        probed = self.speeds.get(key) if key not in self.settled else None
        if probed:
            ratio = seconds / probed
            for other in [k for k in self.speeds if k.startswith(prefix) and k not in self.settled and k != key]:
                self.speeds[other] *= ratio
                self.settled.add(other)
        self.speeds[key] = seconds
        self.settled.add(key)
        self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"format": SPEEDS_FORMAT, "speeds": self.speeds, "settled": sorted(self.settled)}
            write_atomic(self.path, json.dumps(payload, indent=1).encode())
        except OSError:
            pass  # it only saves a later run the measuring


REMEMBER_AFTER_STEPS = 200  # a session's own speed replaces the probe's once it has this many steps


def remember_speed(cfg: RunConfig, vocab_size: int, device: torch.device, sec_per_step: float | None,
                   steps: int) -> bool:
    """Keep the seconds per step a session measured over `steps` steps (evaluations left out)
    as its shape's speed on this machine, for the planner of the next run; whether it did.
    Rank 0 calls it: every process's step takes the same time."""
    if sec_per_step is None or sec_per_step <= 0 or steps < REMEMBER_AFTER_STEPS:
        return False
    precision = resolve_precision(cfg.session.precision, device)
    key = speed_key(Shape.of(cfg), vocab_size, device, precision, cfg.model)
    SpeedCache(speeds_file()).measured_by_run(key, sec_per_step, speed_prefix(device, precision))
    return True


def plan_run(cfg: RunConfig, explicit: set[str], data: Ids | RecordSet, vocab_size: int, device: torch.device,
             d: Dist | None = None, fine_tuning: bool = False) -> tuple[RunConfig, Plan]:
    """The planner's choice for this training data (as the run will split it), budget and
    machine, and the config it gives. Rank 0 measures and plans; every rank gets its plan."""
    d = d or Dist()
    plan = None
    if d.is_main:
        precision = resolve_precision(cfg.session.precision, device)
        cache = SpeedCache(speeds_file())
        # The shapes are measured with the run's weight drop and locked dropout, if any.
        regularizers = {"weight_drop": cfg.model.weight_drop, "locked_dropout": cfg.model.locked_dropout}

        def speed(shape: Shape) -> float:
            key = speed_key(shape, vocab_size, device, precision, cfg.model)
            seconds = cache.get(key)
            if seconds is None:
                seconds = step_seconds(shape, vocab_size, PROBE_TIMED_STEPS, device, precision, clock=time.perf_counter,
                                       cfg=RunConfig().updated(regularizers))
                cache.put(key, seconds)
            # Every process trains its own batch: the run's speed is the world's.
            return shape.chars_per_batch * d.world_size / seconds

        held = split_data(data, cfg.train.val_fraction)
        plan = make_plan(cfg, explicit, len(held.train), len(held.val), vocab_size, speed, device.type, fine_tuning,
                         choose_layout=not isinstance(data, RecordSet))
        if cache.hits:
            plan.why.append(f"the speeds of {cache.hits} shape{'s' if cache.hits > 1 else ''} on this machine from "
                            f"{cache.path} (delete it to measure again)")
    plan = d.broadcast(plan)
    assert plan is not None
    return cfg.updated(plan.settings).validate(), plan
