"""--time plans the step count so the schedule ends with the budget, and always leaves best.pt."""

from __future__ import annotations

import json
import time

from charlm.config import build_config
from charlm.train import start


def _cfg(budget: str):
    return build_config(None, dict(hidden_size=32, num_layers=1, embedding_size=16, seq_len=16,
                                   batch_size=4, eval_interval=50, warmup_steps=5, time=budget,
                                   preview_length=0, keep=1))


def test_time_budget_plans_the_schedule_to_end_with_the_budget(corpus_file, tmp_path):
    t0 = time.perf_counter()
    cfg = _cfg("3s")
    result = start(cfg, [str(corpus_file)], tmp_path / "run")
    wall = time.perf_counter() - t0
    assert 2.0 < wall < 6.0  # the budget, plus set-up and the final evaluation
    assert result.finished and result.step == result.total_steps > 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The last evaluation is at the planned end, where cosine decay reaches lr * min_lr_ratio.
    assert rows[-1]["step"] == result.step
    assert abs(rows[-1]["lr"] - cfg.train.lr * cfg.train.min_lr_ratio) < 1e-5
    assert (tmp_path / "run" / "best.pt").exists()


def test_a_clock_stop_still_evaluates_and_writes_best(corpus_file, tmp_path, monkeypatch):
    import charlm.train as train

    # Make every step look much cheaper than it is: the plan overshoots and the clock stops it.
    monkeypatch.setattr(train.Trainer, "_plan", lambda self, remaining: self.step + 10**6)
    result = start(_cfg("1s"), [str(corpus_file)], tmp_path / "run")
    assert not result.finished and result.step < result.total_steps
    assert result.last_val_bpc is not None and (tmp_path / "run" / "best.pt").exists()
