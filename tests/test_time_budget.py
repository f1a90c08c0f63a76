"""--time plans the step count so the schedule ends with the budget, and always leaves best.pt."""

from __future__ import annotations

import json
import types

import pytest

import charlm.train as train
from charlm.config import build_config
from charlm.train import start


def _cfg(budget: str):
    return build_config(None, dict(hidden_size=32, num_layers=1, embedding_size=16, seq_len=16,
                                   batch_size=4, eval_interval=50, warmup_steps=5, time=budget,
                                   preview_length=0, keep=1))


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for the trainer: every reading advances 1 ms, so a step, an evaluation
    and the whole plan take the same 'time' on every machine, however loaded."""
    state = {"t": 0.0}

    def perf_counter() -> float:
        state["t"] += 0.001
        return state["t"]

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=perf_counter))
    return state


def test_time_budget_plans_the_schedule_to_end_with_the_budget(corpus_file, tmp_path, clock):
    cfg = _cfg("3s")
    result = start(cfg, [str(corpus_file)], tmp_path / "run")
    assert 3.0 * 0.9 < clock["t"] < 3.0 * 1.05  # ends with the budget, evaluation included
    assert result.finished and result.step == result.total_steps > 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The last evaluation is at the planned end, where cosine decay reaches lr * min_lr_ratio.
    assert rows[-1]["step"] == result.step
    assert abs(rows[-1]["lr"] - cfg.train.lr * cfg.train.min_lr_ratio) < 1e-5
    assert (tmp_path / "run" / "best.pt").exists()


def test_a_clock_stop_still_evaluates_and_writes_best(corpus_file, tmp_path, monkeypatch, clock):
    # Make every step look much cheaper than it is: the plan overshoots and the clock stops it.
    monkeypatch.setattr(train.Trainer, "_plan", lambda self, remaining: self.step + 10**6)
    result = start(_cfg("1s"), [str(corpus_file)], tmp_path / "run")
    assert not result.finished and result.step < result.total_steps
    assert result.last_val_bpc is not None and (tmp_path / "run" / "best.pt").exists()
