"""A run's length and its learning-rate schedule: how many steps fit in `--time`, measured on
this machine while training, and the rate at every step.

A `--time` run cannot know its step count in advance, yet its cosine schedule needs one. So
it measures: after a few warm-up steps it times every step (loop start to loop start, which
counts data, forward, backward, optimizer and callbacks; evaluations are timed on their own
and counted once per `eval_interval`), plans the steps that fit in what remains of the
budget, and re-plans as the measurement settles. At 90 % of the budget the plan is fixed:
from then on the schedule is a pure function of the step, so it is stored in checkpoints and
a resume continues it exactly. A fixed plan may overrun its budget by `TIME_GRACE` to finish
its schedule; past that, or before the plan is fixed, the clock stops the session.

Seconds spent, one rule: everything a run does under its budget counts against it (the
planner's probe, steps, evaluations, saves, previews), over every session; the checkpoint
keeps the sum (`BudgetState.spent`), so a resume that finishes the budget gets exactly what
is left. A session always gets at least `MIN_SESSION_SECONDS`.

The clock is injectable, so tests run the whole plan on a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from charlm.config.run import DEFAULT_MAX_STEPS, TrainConfig
from charlm.storage.checkpoint import BudgetState

PLAN_AFTER_STEPS = 10  # a session's steps measured before its first plan
UNTIMED_STEPS = 3  # the first steps of a session pay for allocation and warm-up: never timed
TIME_MARGIN = 0.03  # plan to finish 3 % early: timing noise must not push past the budget
# Re-plan until 90 % of the budget is spent, then fix the step count. Late, because a machine's
# speed drifts: fixed at half, 7 of 8 4-minute runs on a 2-core EPYC ended 1-21 s early (their
# second half ran faster than the first); the last re-plans barely move a cosine schedule's end.
FIX_FRACTION = 0.9
TIME_GRACE = 0.02  # a fixed plan may overrun its budget by 2 % to finish its schedule
MIN_SESSION_SECONDS = 1.0

Clock = Callable[[], float]


@dataclass
class Tick:
    """What the clock says at the top of a step."""

    now: float
    out_of_time: bool
    replanned: bool  # the planned step count changed


class TimeBudget:
    """Plans and enforces one session's budget: what is left of `time_cap` seconds (the
    `--time` budget in force, of which `spent` seconds went before this session) and/or
    `max_steps`. It alone writes its `state`, which checkpoints keep.

    `eval_guess(sec_per_step)` estimates one evaluation's seconds until one is measured.
    """

    def __init__(self, state: BudgetState, time_cap: float | None, max_steps: int | None,
                 eval_interval: int, eval_guess: Callable[[float], float],
                 clock: Clock = time.perf_counter, spent: float | None = None) -> None:
        self.state = state
        if spent is not None:
            state.spent = spent
        # This session's seconds: what is left of the budget.
        self.time_cap = None if time_cap is None else max(MIN_SESSION_SECONDS, time_cap - state.spent)
        self.max_steps = max_steps or None
        self.eval_interval = eval_interval
        self.eval_guess = eval_guess
        self.clock = clock
        self.start = 0.0
        self._spent_before = state.spent
        # This session's seconds by what they went to (the rest of them went to training).
        self.split = {"planning": 0.0, "evaluation": 0.0, "saving": 0.0}
        self.session_steps = 0
        self.session_eval = 0.0  # evaluation seconds this session
        self._mark: tuple[float, float] | None = None  # (clock, session_eval) once timing starts

    @classmethod
    def fixed_steps(cls, steps: int, clock: Clock = time.perf_counter) -> TimeBudget:
        """Exactly `steps` steps, no clock and no evaluation (a probe, a benchmark)."""
        return cls(BudgetState(), None, steps, 10**9, lambda sec_per_step: 0.0, clock)

    @property
    def total_steps(self) -> int | None:
        return self.state.total_steps

    def begin(self) -> None:
        """Start the session's clock; a run with no budget at all gets the default length."""
        self.start = self.clock()
        if self.state.total_steps is None and self.time_cap is None:
            self.fix(self.max_steps or DEFAULT_MAX_STEPS)

    def fix(self, total_steps: int) -> None:
        self.state.total_steps, self.state.steps_fixed = total_steps, True

    def follow(self, total_steps: int | None, fixed: bool) -> None:
        """Take the plan of the process whose clock decides (rank 0 under torchrun)."""
        self.state.total_steps, self.state.steps_fixed = total_steps, fixed

    def running(self, step: int) -> bool:
        total = self.state.total_steps
        return (total is None or step < total) and not (self.max_steps and step >= self.max_steps)

    def at_end(self, step: int) -> bool:
        return self.state.total_steps is not None and step >= self.state.total_steps

    def note(self) -> None:
        """Count the seconds spent so far into the state (before a checkpoint is made of it)."""
        self.state.spent = self._spent_before + self.clock() - self.start

    def tick(self, step: int, plans: bool = True) -> Tick:
        """Measure at the top of a step, re-plan when due, and say whether time is up.
        `plans` is False on processes that follow another's clock (torchrun ranks > 0)."""
        now = self.clock()
        self.state.spent = self._spent_before + now - self.start
        if self.session_steps == UNTIMED_STEPS:
            self._mark = (now, self.session_eval)
        elif self._mark is not None:
            timed = now - self._mark[0] - (self.session_eval - self._mark[1])
            self.state.sec_per_step = timed / (self.session_steps - UNTIMED_STEPS)
        replanned = False
        cap = self.time_cap
        if plans and cap is not None and not self.state.steps_fixed and self.session_steps >= PLAN_AFTER_STEPS:
            replanned = self._replan(step)
        limit = cap * (1 + TIME_GRACE) if cap is not None and self.state.steps_fixed else cap
        return Tick(now, plans and limit is not None and now - self.start >= limit, replanned)

    def stepped(self) -> None:
        self.session_steps += 1

    def evaluated(self, seconds: float) -> None:
        """One evaluation took `seconds` (scoring, saving, previews): the plan counts it."""
        self.state.eval_seconds = seconds
        self.session_eval += seconds

    def spend(self, kind: str, seconds: float) -> None:
        """Say what `seconds` of this session went to: "planning" (the planner's probe, before
        the session's clock starts), "evaluation" or "saving"."""
        self.split[kind] += seconds

    def breakdown(self) -> dict[str, float]:
        """This session's seconds by what they went to: training (the steps and the loop around
        them), evaluation (scoring and previews), saving and planning, and their total."""
        total = self.split["planning"] + self.clock() - self.start
        return {"training": total - sum(self.split.values()), **self.split, "total": total}

    def steps_for(self, remaining: float, step: int) -> int:
        """The step count at which `remaining` seconds from `step` run out, evaluations included."""
        sps = self.state.sec_per_step
        assert sps is not None
        eval_s = self.state.eval_seconds
        if eval_s is None:
            eval_s = self.eval_guess(sps)
        per_step = sps + eval_s / self.eval_interval
        return step + max(1, int(max(0.0, remaining * (1 - TIME_MARGIN) - eval_s) / per_step))

    def _replan(self, step: int) -> bool:
        assert self.time_cap is not None
        used = self.clock() - self.start
        plan = self.steps_for(self.time_cap - used, step)
        total = min(plan, self.max_steps) if self.max_steps else plan
        changed = total != self.state.total_steps
        self.state.total_steps = total
        if used >= self.time_cap * FIX_FRACTION:
            self.state.steps_fixed = True
        return changed


def guess_eval_seconds(scored_chars: int, chars_per_batch: int) -> Callable[[float], float]:
    """An evaluation's seconds before one is measured, from the seconds per step: scoring a
    character (a forward pass) costs about a third of training on it (forward and backward)."""
    return lambda sec_per_step: scored_chars * sec_per_step / chars_per_batch / 3


def steps_in(seconds: float, sec_per_step: float, chars_per_batch: int, scored_chars: int,
             eval_interval: int) -> int:
    """The steps a budget of `seconds` plans at `sec_per_step`, evaluations included."""
    budget = TimeBudget(BudgetState(sec_per_step=sec_per_step), seconds, None, eval_interval,
                        guess_eval_seconds(scored_chars, chars_per_batch))
    return budget.steps_for(seconds, 0)


def lr_at(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run planned for `total_steps`:
    linear warmup, then down to `lr * min_lr_ratio` by `cfg.schedule` — a cosine over the
    rest of the run, or the peak held until the last `cooldown` share of the steps and a
    1-sqrt cooldown there (Hägele et al. 2024 find 1-sqrt better than a linear one).

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
    if cfg.schedule == "constant":
        into = (progress - (1.0 - cfg.cooldown)) / cfg.cooldown  # <= 0 before the cooldown, 1 at the end
        return cfg.lr if into <= 0 else min_lr + (1.0 - math.sqrt(into)) * (cfg.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
