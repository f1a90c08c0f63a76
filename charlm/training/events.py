"""What training reports while it runs, and what it returns.

The library never prints: a training session calls the methods of a `Callbacks` object with
the small records below, and whoever called it (the CLI's reporter, a notebook, a test)
decides what to show. Every method is optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.config.run import RunConfig
from charlm.storage.rundir import RunDir


@dataclass(frozen=True)
class StartInfo:
    """A session is about to train."""

    resumed: bool
    out_dir: Path
    device: str
    precision: str
    params: int
    vocab_size: int
    train_chars: int
    val_chars: int
    world_size: int
    step: int
    total_steps: int | None
    config: RunConfig
    corpus: dict[str, Any]


@dataclass(frozen=True)
class StepStats:
    """One optimizer step is done."""

    step: int
    total: int | None
    bpc: float  # this batch's training loss
    lr: float
    chars_per_s: float
    elapsed: float  # seconds since the session started
    time_cap: float | None
    chars_seen: int


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: also one line of `metrics.jsonl`."""

    step: int
    chars: int
    train_bpc: float  # mean over the batches since the last evaluation
    val_bpc: float
    lr: float
    elapsed: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EvalRecord:
        """A line of `metrics.jsonl` (keys this version does not know are left out)."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass
class TrainResult:
    """What a training session ended with."""

    out_dir: Path
    step: int
    total_steps: int | None
    chars_seen: int
    elapsed: float
    best_val_bpc: float | None
    last_val_bpc: float | None
    finished: bool  # False when a --time cap paused the run before its planned end
    checkpoints: list[Path] = field(default_factory=list)
    plot: Path | None = None  # loss.png, when the CLI drew one
    stopped_early: bool = False  # --patience ended it: held-out bpc had stopped improving
    # This session's seconds: training, evaluation, saving, planning and their total.
    seconds: dict[str, float] = field(default_factory=dict)
    # Every evaluation of the run so far (earlier sessions' too), as `metrics.jsonl` holds them.
    metrics: list[EvalRecord] = field(default_factory=list)
    report: Path | None = None  # report.html, when the caller made the run's report
    card: Path | None = None  # README.md beside it (None: not written, e.g. a README that is not charlm's)

    @property
    def latest(self) -> Path:
        """The checkpoint to resume from."""
        return RunDir(self.out_dir).latest

    @property
    def best(self) -> Path:
        """The checkpoint with the lowest held-out bpc (to sample from), else the latest."""
        return RunDir(self.out_dir).to_sample


class Callbacks:
    """Progress hooks; override any of them."""

    def on_start(self, info: StartInfo) -> None: ...

    def on_plan(self, total_steps: int) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_eval(self, record: EvalRecord, previews: list[tuple[float, str]]) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Reading the corpus: `stage` is "hashing" or "encoding"; bytes done of `total`
        (0 when the total is not known in advance)."""


class Fanout(Callbacks):
    """Several callbacks as one, called in order."""

    def __init__(self, *targets: Callbacks) -> None:
        self.targets = targets

    def on_start(self, info: StartInfo) -> None:
        for t in self.targets:
            t.on_start(info)

    def on_plan(self, total_steps: int) -> None:
        for t in self.targets:
            t.on_plan(total_steps)

    def on_step(self, stats: StepStats) -> None:
        for t in self.targets:
            t.on_step(stats)

    def on_eval(self, record: EvalRecord, previews: list[tuple[float, str]]) -> None:
        for t in self.targets:
            t.on_eval(record, previews)

    def on_message(self, text: str) -> None:
        for t in self.targets:
            t.on_message(text)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        for t in self.targets:
            t.on_progress(stage, done, total)
