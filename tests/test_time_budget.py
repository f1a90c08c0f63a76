"""--time plans the step count so the schedule ends with the budget, and always leaves best.pt.

The budget runs on a fake clock: every reading advances 1 ms, so a step, an evaluation and
the whole plan take the same 'time' on every machine, however loaded.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from charlm.budget import BudgetState, TimeBudget
from charlm.session import fit


@pytest.fixture
def clock():
    state = {"t": 0.0}

    def perf_counter() -> float:
        state["t"] += 0.001
        return state["t"]

    perf_counter.state = state  # type: ignore[attr-defined]
    return perf_counter


def _cfg(budget: str):
    return tiny_config(eval_interval=50, warmup_steps=5, time=budget, keep=1)


def test_time_budget_plans_the_schedule_to_end_with_the_budget(corpus_file, tmp_path, clock):
    cfg = _cfg("3s")
    result = fit(cfg, [str(corpus_file)], tmp_path / "run", clock=clock)
    assert 3.0 * 0.9 < clock.state["t"] < 3.0 * 1.05  # ends with the budget, evaluation included
    assert result.finished and result.step == result.total_steps > 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The last evaluation is at the planned end, where cosine decay reaches lr * min_lr_ratio.
    assert rows[-1]["step"] == result.step
    assert abs(rows[-1]["lr"] - cfg.train.lr * cfg.train.min_lr_ratio) < 1e-5
    assert (tmp_path / "run" / "best.pt").exists()


def test_a_clock_stop_still_evaluates_and_writes_best(corpus_file, tmp_path, monkeypatch, clock):
    # Make every step look much cheaper than it is: the plan overshoots and the clock stops it.
    monkeypatch.setattr(TimeBudget, "steps_for", lambda self, remaining, step: step + 10**6)
    result = fit(_cfg("1s"), [str(corpus_file)], tmp_path / "run", clock=clock)
    assert not result.finished and result.step < result.total_steps
    assert result.last_val_bpc is not None and (tmp_path / "run" / "best.pt").exists()


def _run(budget: TimeBudget, step_seconds, t: dict) -> tuple[int, bool]:
    """Drive a budget as the training loop does: while it runs, tick, then take a step that
    lasts `step_seconds(step)`. Returns the steps taken and whether the clock stopped it."""
    budget.begin()
    step = 0
    while budget.running(step):
        if budget.tick(step).out_of_time:
            return step, True
        t["now"] += step_seconds(step)
        budget.stepped()
        step += 1
    return step, False


def _budget(t: dict, state: BudgetState) -> TimeBudget:
    return TimeBudget(state, time_cap=10.0, max_steps=None, eval_interval=1000, eval_guess=lambda sps: 0.0,
                      clock=lambda: t["now"])


def test_budget_measures_plans_and_fixes_the_step_count_on_its_clock():
    t, state = {"now": 0.0}, BudgetState()
    steps, stopped = _run(_budget(t, state), lambda step: 0.01, t)
    assert state.sec_per_step == pytest.approx(0.01)
    # Fixed at half the budget (step 500): the 5 s left, less the 3 % margin, at 0.01 s a step.
    assert state.steps_fixed and state.total_steps == 500 + 485
    assert steps == state.total_steps and not stopped and t["now"] == pytest.approx(9.85)


def test_budget_clock_stops_a_fixed_plan_after_its_grace():
    t, state = {"now": 0.0}, BudgetState()
    # The steps slow down once the plan is fixed: the clock stops the run at 102 % of the budget.
    steps, stopped = _run(_budget(t, state), lambda step: 0.01 if step < 600 else 0.02, t)
    assert stopped and steps < state.total_steps
    assert 10.2 <= t["now"] < 10.2 + 0.02


def test_budget_without_a_clock_takes_max_steps_or_the_default():
    assert TimeBudget(BudgetState(), None, 123, 10, lambda s: 0.0).total_steps is None
    b = TimeBudget(BudgetState(), None, 123, 10, lambda s: 0.0)
    b.begin()
    assert b.total_steps == 123 and b.state.steps_fixed
    b = TimeBudget(BudgetState(), None, None, 10, lambda s: 0.0)
    b.begin()
    assert b.total_steps == 2000
    assert b.running(1999) and not b.running(2000)


def test_patience_stops_a_run_whose_held_out_bpc_stopped_improving(corpus_file, tmp_path):
    # A learning rate this high makes held-out bpc worse from one evaluation to the next (not
    # so high that the run diverges: lr 3 would be stopped at step 2, see charlm.divergence).
    cfg = tiny_config(max_steps=400, eval_interval=5, lr=0.3, warmup_steps=0, patience=3)
    result = fit(cfg, [str(corpus_file)], tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(range(len(rows)), key=lambda i: rows[i]["val_bpc"])
    assert result.stopped_early and result.step < 400
    assert len(rows) - 1 - best == 3  # stopped at the third evaluation without a new best
    control = fit(tiny_config(max_steps=60, eval_interval=5, lr=0.3, warmup_steps=0), [str(corpus_file)],
                  tmp_path / "control")
    assert not control.stopped_early and control.step == 60
