"""--schedule: cosine (the default, and what older checkpoints ran) or a constant rate with a
1-sqrt cooldown over the last --cooldown of the planned steps."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from conftest import TINY, one_line_error

from charlm.cli import app
from charlm.config.run import TrainConfig
from charlm.storage import checkpoint
from charlm.training.budget import lr_at


def _constant(**kw: float) -> TrainConfig:
    return TrainConfig(schedule="constant", lr=0.01, min_lr_ratio=0.1, warmup_steps=10, **kw)  # type: ignore[arg-type]


def test_constant_holds_the_peak_then_cools_down_by_one_minus_sqrt():
    cfg, total = _constant(cooldown=0.2), 1010  # 1000 steps after warmup, the last 200 cool down
    rates = [lr_at(s, total, cfg) for s in range(total)]
    cosine = TrainConfig(lr=0.01, min_lr_ratio=0.1, warmup_steps=10)
    assert rates[:10] == [lr_at(s, total, cosine) for s in range(10)]  # the same warmup
    assert all(r == 0.01 for r in rates[10:810])  # held at the peak until the cooldown
    assert rates[910] == pytest.approx(0.001 + (1 - math.sqrt(0.5)) * 0.009)  # halfway into it
    assert lr_at(total, total, cfg) == pytest.approx(0.001)  # ends at lr x min_lr_ratio, like cosine
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))  # never rises
    # Unknown length (a --time run still measuring): warmup, then the peak, as for cosine.
    assert lr_at(500, None, cfg) == lr_at(500, None, cosine) == 0.01


def test_cooldown_share_moves_where_it_starts():
    assert lr_at(10 + 499, 1010, _constant(cooldown=0.5)) == 0.01
    assert lr_at(10 + 501, 1010, _constant(cooldown=0.5)) < 0.01
    assert lr_at(10 + 1, 1010, _constant(cooldown=1.0)) < 0.01  # the whole run cools down


def test_a_constant_run_ends_at_the_floor_and_is_saved_with_its_schedule(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), *TINY, "--max-steps", "40",
                              "--eval-interval", "10", "--warmup-steps", "0", "--schedule", "constant",
                              "--cooldown", "0.5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows}
    ck = checkpoint.load(run / "latest.pt")
    assert (ck.config.train.schedule, ck.config.train.cooldown) == ("constant", 0.5)
    peak = ck.config.train.lr
    assert lrs[10] == pytest.approx(peak) and lrs[20] == pytest.approx(peak)  # before the cooldown
    assert peak > lrs[30] > lrs[40] > peak * ck.config.train.min_lr_ratio  # in it, going down
    # Each row's rate is the schedule's at the step just taken (the last is one step short of the floor).
    assert all(lr == pytest.approx(lr_at(step - 1, 40, ck.config.train)) for step, lr in lrs.items())
    assert 'schedule = "constant"' in (run / "config.toml").read_text()


@pytest.mark.parametrize(("flags", "needle"), [(["--schedule", "linear"], "--schedule"),
                                               (["--cooldown", "0"], "--cooldown"),
                                               (["--cooldown", "1.5"], "--cooldown")])
def test_a_bad_schedule_is_one_line(runner, corpus_file, tmp_path, flags, needle):
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "run"), *TINY, *flags])
    one_line_error(res, needle)
    assert not (tmp_path / "run").exists()
