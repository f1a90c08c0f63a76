"""--time plans the step count so the schedule ends with the budget, and always leaves best.pt.

The budget runs on a fake clock: every reading advances 1 ms, so a step, an evaluation and
the whole plan take the same 'time' on every machine, however loaded.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from charlm.storage.checkpoint import BudgetState
from charlm.training.budget import TimeBudget
from charlm.training.session import fit


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
    # Fixed at 90 % of the budget (step 900): the 1 s left, less the 3 % margin, at 0.01 s a step.
    assert state.steps_fixed and state.total_steps == 900 + 97
    assert steps == state.total_steps and not stopped and t["now"] == pytest.approx(9.97)


def test_budget_whose_steps_speed_up_still_ends_with_its_budget():
    # The first half's steps are 1.5x as slow as the second's (a machine whose load drifts):
    # the plan follows the measurement until late, so the run does not end seconds early.
    t, state = {"now": 0.0}, BudgetState()
    steps, stopped = _run(_budget(t, state), lambda step: 0.012 if t["now"] < 5.0 else 0.008, t)
    assert state.steps_fixed and not stopped and steps == state.total_steps
    assert 9.7 < t["now"] <= 10.0


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
    # so high that the run diverges: lr 3 would be stopped at step 2, see charlm.training.divergence).
    cfg = tiny_config(max_steps=400, eval_interval=5, lr=0.3, warmup_steps=0, patience=3)
    result = fit(cfg, [str(corpus_file)], tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(range(len(rows)), key=lambda i: rows[i]["val_bpc"])
    assert result.stopped_early and result.step < 400
    assert len(rows) - 1 - best == 3  # stopped at the third evaluation without a new best
    control = fit(tiny_config(max_steps=60, eval_interval=5, lr=0.3, warmup_steps=0), [str(corpus_file)],
                  tmp_path / "control")
    assert not control.stopped_early and control.step == 60


# --- seconds spent: one rule for a new run and for a resume -------------------------------------


def test_a_budget_counts_what_went_before_and_everything_it_spends():
    t, state = {"now": 100.0}, BudgetState()
    budget = TimeBudget(state, time_cap=10.0, max_steps=None, eval_interval=1000, eval_guess=lambda sps: 0.0,
                        clock=lambda: t["now"], spent=4.0)  # e.g. the planner's probe
    assert budget.time_cap == 6.0  # this session's share of the budget
    budget.begin()
    t["now"] += 1.5  # steps
    budget.evaluated(2.0)
    t["now"] += 2.0  # ... and the evaluation they paid for
    budget.note()
    assert state.spent == pytest.approx(4.0 + 1.5 + 2.0)
    # A budget that is all spent still gives a session its minimum.
    assert TimeBudget(BudgetState(), 10.0, None, 1000, lambda sps: 0.0, spent=12.0).time_cap == 1.0


class _FakeTime:
    """The session clock: a step costs 0.1 s, an evaluation 5 s, the planner's probe of a shape 7 s."""

    def __init__(self, stop_after: float | None = None) -> None:
        self.now, self.stop_after, self.caps = 0.0, stop_after, []

    def clock(self) -> float:
        return self.now

    def pending(self) -> int:
        import signal

        return signal.SIGINT if self.stop_after is not None and self.now > self.stop_after else 0

    def callbacks(self):
        from charlm.training.events import Callbacks

        fake = self

        class Timed(Callbacks):
            def on_step(self, stats):
                fake.caps.append(stats.time_cap)
                fake.now += 0.1

            def on_eval(self, record, previews):
                fake.now += 5.0

        return Timed()


def test_resume_subtracts_every_second_a_planned_time_run_spent(corpus_file, tmp_path, monkeypatch):
    """A --time run spends its budget on the planner's probe, steps and evaluations; stopped
    before its plan is fixed and resumed, it gets exactly what is left, not the probe's and
    the evaluations' seconds back."""
    from charlm.errors import TrainingInterrupted
    from charlm.storage import checkpoint
    from charlm.training import probe, session

    fake = _FakeTime(stop_after=20.0)
    probes = []

    def timed_probe(*args, **kwargs):
        fake.now += 7.0
        probes.append(1)
        return 0.01  # seconds a step of the shape takes

    monkeypatch.setattr(probe, "step_seconds", timed_probe)
    cfg = tiny_config(time="100s", eval_interval=5, warmup_steps=0, keep=1)
    explicit = {"hidden_size", "num_layers", "embedding_size", "batch_size", "seq_len", "dropout", "ema"}
    with pytest.raises(TrainingInterrupted):
        session.fit(cfg, [str(corpus_file)], tmp_path / "run", clock=fake.clock, pending_signal=fake.pending,
                    callbacks=fake.callbacks(), explicit=explicit)
    probe_s = 7.0 * len(probes)
    assert probes and fake.caps[0] == pytest.approx(100.0 - probe_s)
    ck = checkpoint.load(tmp_path / "run" / "latest.pt")
    assert not ck.budget.steps_fixed and ck.budget.spent == pytest.approx(fake.now)
    assert ck.budget.spent > ck.progress.elapsed + probe_s + 10  # evaluations counted, not only steps
    later = _FakeTime()
    session.resume(tmp_path / "run" / "latest.pt", clock=later.clock, callbacks=later.callbacks())
    assert later.caps[0] == pytest.approx(100.0 - ck.budget.spent)
    # A new --time on resume is a new budget: nothing of it is spent yet.
    again = _FakeTime()
    out = tmp_path / "again"
    out.mkdir()
    (out / "latest.pt").write_bytes((tmp_path / "run" / "latest.pt").read_bytes())
    session.resume(out / "latest.pt", {"time": "30s"}, clock=again.clock, callbacks=again.callbacks())
    assert again.caps[0] == pytest.approx(30.0)


def test_a_session_says_where_its_seconds_went(corpus_file, tmp_path, monkeypatch):
    from charlm.training import probe, session

    fake = _FakeTime()

    def timed_probe(*args, **kwargs):
        fake.now += 7.0
        return 0.01

    monkeypatch.setattr(probe, "step_seconds", timed_probe)
    cfg = tiny_config(time="100s", eval_interval=5, warmup_steps=0, keep=1)
    # --eval-interval given, so the planner does not space the evaluations by their share.
    explicit = {"hidden_size", "num_layers", "embedding_size", "batch_size", "seq_len", "dropout", "ema",
                "eval_interval"}
    result = session.fit(cfg, [str(corpus_file)], tmp_path / "run", clock=fake.clock, callbacks=fake.callbacks(),
                         explicit=explicit)
    split = result.seconds
    assert split["planning"] >= 7.0 and split["planning"] % 7.0 == pytest.approx(0.0, abs=1e-9)
    assert split["evaluation"] >= 5.0 * (result.step // 5)  # every evaluation's 5 s
    assert split["total"] == pytest.approx(sum(v for k, v in split.items() if k != "total")) == pytest.approx(fake.now)
    assert 0 < split["training"] < 0.2 * split["total"]  # 0.1 s steps against 5 s evaluations
