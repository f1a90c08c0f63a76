"""The planner: its rule on known speeds (no timing), what it keeps, and the CLI around it.

The rule is tested through its properties (more compute buys a wider model, more passes buy
more dropout, a GPU gets big batches, a setting the user chose is kept) on a fake speed
function, so these tests hold whatever constants the quality panel fits.
"""

from __future__ import annotations

import json
import tomllib

import pytest
from conftest import TINY, tiny_flags

from charlm import checkpoint
from charlm.cli import app
from charlm.config import RunConfig, build_config
from charlm.plan import CPU_WIDTHS, WIDTHS, Shape, apply_plan, dropout_for, make_plan

VOCAB = 90


def flops_speed(scale: float = 1.0):
    """A machine whose speed falls with the model's size, as a CPU's does."""

    def speed(shape: Shape) -> float:
        return scale * 2e11 / (shape.params(VOCAB) * 6)

    return speed


def plan(train_chars: int, seconds: float | None = None, steps: int | None = None, explicit: set[str] = frozenset(),
         device: str = "cpu", cfg: RunConfig | None = None, scale: float = 1.0):
    return make_plan(cfg or RunConfig(), set(explicit), train_chars, VOCAB, seconds, steps, flops_speed(scale), device)


def test_more_compute_buys_a_wider_model():
    widths = [plan(10_000_000, seconds).shape.hidden_size for seconds in (15, 60, 240, 1800, 14400)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert set(widths) <= set(WIDTHS)
    # The same budget on a machine 10x as fast plans at least as wide a model.
    assert plan(10_000_000, 240, scale=10).shape.hidden_size >= plan(10_000_000, 240).shape.hidden_size


def test_a_cpu_gets_no_wider_model_than_the_panel_measured():
    # Hours on a CPU: steps enough for any width; a GPU may go wider, a CPU stops at 512.
    assert max(CPU_WIDTHS) == 512
    assert plan(10_000_000, 36_000).shape.hidden_size == 512
    assert plan(10_000_000, 36_000, device="cuda").shape.hidden_size > 512


def test_more_text_for_the_same_budget_buys_a_narrower_model():
    widths = [plan(chars, 240).shape.hidden_size for chars in (10**5, 10**6, 10**7, 10**8, 10**9)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_the_width_is_the_wider_of_the_steps_and_the_passes_rules():
    from charlm.budget import steps_in
    from charlm.plan import FEWEST_STEPS, MAX_PASSES, MIN_STEPS

    def run(width: int, train_chars: int, seconds: float) -> tuple[float, float]:
        """(steps, passes) as the budget plans them: the fake machine's speed, evaluations included."""
        cps = flops_speed()(Shape(hidden_size=width))
        scored = min(int(train_chars * 0.05 / 0.95), 250_000)
        steps = steps_in(seconds, 1024 / cps, 1024, scored, 200)
        return steps, steps * 1024 / train_chars

    for train_chars, seconds in ((10**9, 240), (50_000, 240), (2_000_000, 1800), (300_000, 60)):
        runs = {w: run(w, train_chars, seconds) for w in CPU_WIDTHS}
        trainable = [w for w in CPU_WIDTHS if runs[w][0] >= FEWEST_STEPS]
        by_steps = max([w for w in trainable if runs[w][0] >= MIN_STEPS], default=CPU_WIDTHS[0])
        by_passes = min([w for w in trainable if runs[w][1] <= MAX_PASSES], default=max(trainable))
        assert plan(train_chars, seconds).shape.hidden_size == max(by_steps, by_passes), (train_chars, seconds)


def test_more_passes_buy_more_dropout():
    small, big = plan(100_000, 240), plan(100_000_000, 240)
    assert small.passes > big.passes and small.settings["dropout"] > big.settings["dropout"] == 0.0
    values = [dropout_for(p) for p in (0.5, 1, 3, 10, 30, 100, 1000)]
    assert values == sorted(values) and values[0] == 0.0 and max(values) <= 0.5


def test_a_step_budget_needs_no_speed():
    def no_speed(shape: Shape) -> float:
        raise AssertionError("a step budget must not measure speed")

    p = make_plan(RunConfig(), set(), 2_000_000, VOCAB, None, 5000, no_speed, "cpu")
    assert p.chars == 5000 * p.shape.batch_size * p.shape.seq_len and p.probe_seconds == {}
    assert p.shape.hidden_size == RunConfig().model.hidden_size  # steps fix the chars, not the time


def test_what_the_user_chose_is_kept():
    cfg = build_config(None, {"hidden_size": 96, "dropout": 0.05, "lr": 0.001})
    p = plan(100_000, 240, explicit={"hidden_size", "dropout", "lr"}, cfg=cfg)
    assert p.shape.hidden_size == 96 and p.shape.dropout == 0.05
    assert not {"hidden_size", "dropout", "lr"} & set(p.settings)


def test_a_gpu_plan_uses_big_batches_unless_the_user_set_them():
    assert (plan(10**8, 240, device="cuda").shape.batch_size, plan(10**8, 240, device="cuda").shape.seq_len) \
        == (128, 128)
    kept = plan(10**8, 240, device="cuda", explicit={"batch_size"}, cfg=build_config(None, {"batch_size": 16}))
    assert kept.shape.batch_size == 16 and "batch_size" not in kept.settings


def test_apply_plan_puts_each_setting_in_its_section():
    out = apply_plan(RunConfig().to_dict(), {"hidden_size": 384, "lr": 0.005, "dropout": 0.1})
    cfg = RunConfig.from_dict(out)
    assert (cfg.model.hidden_size, cfg.model.dropout, cfg.train.lr) == (384, 0.1, 0.005)


# --- through the command line ---------------------------------------------------------------

PLAN_FLAGS = tiny_flags()  # a tiny model the user chose; the planner fills dropout and lr


@pytest.mark.parametrize("flag", ["--plan", "--dry-run"])
def test_plan_prints_the_plan_and_trains_nothing(runner, corpus_file, tmp_path, flag):
    res = runner.invoke(app, ["train", str(corpus_file), flag, "--max-steps", "300", "--out",
                              str(tmp_path / "run"), *PLAN_FLAGS])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("plan: 1x32 LSTM") and "passes" in lines[0]
    assert any(line.strip().startswith("--dropout ") for line in lines)
    assert any(line.strip().startswith("--lr ") for line in lines)
    assert not any(line.strip().startswith("--hidden-size") for line in lines)  # the user set it
    assert not (tmp_path / "run").exists()


def test_a_planned_run_keeps_its_plan_and_resumes_exactly(runner, corpus_file, tmp_path):
    out, again = tmp_path / "run", tmp_path / "again"
    args = [str(corpus_file), *PLAN_FLAGS, "--max-steps", "40", "--no-preview", "--quiet"]
    assert runner.invoke(app, ["train", *args, "--out", str(out)]).exit_code == 0
    ck = checkpoint.load(out / "latest.pt")
    assert ck.planner is not None and ck.planner["summary"].startswith("plan: 1x32 LSTM")
    chosen = ck.planner["settings"]
    assert ck.config.model.dropout == chosen["dropout"] and ck.config.train.lr == chosen["lr"]
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["train"]["lr"] == chosen["lr"]
    assert (out / "config.toml").read_text().count("# plan: ") == 1
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)
    assert info["plan"] == ck.planner["summary"]
    # Stop at step 20 and resume: the same weights as the run that went through.
    assert runner.invoke(app, ["train", *args, "--out", str(again)]).exit_code == 0
    stopped = tmp_path / "stopped"
    assert runner.invoke(app, ["train", *[a if a != "40" else "20" for a in args], "--out", str(stopped)]
                         ).exit_code == 0
    assert runner.invoke(app, ["resume", str(stopped / "latest.pt"), "--max-steps", "40", "--quiet"]).exit_code == 0
    a, b = checkpoint.load(again / "latest.pt"), checkpoint.load(out / "latest.pt")
    assert all(a.model[k].equal(b.model[k]) for k in a.model)  # planning is deterministic
    s = checkpoint.load(stopped / "latest.pt")
    assert s.config.train.lr == b.config.train.lr and s.progress.step == 40


def test_no_planner_keeps_the_built_in_defaults(runner, corpus_file, tmp_path):
    res = runner.invoke(app, ["train", str(corpus_file), *TINY, "--max-steps", "5", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0
    ck = checkpoint.load(tmp_path / "r" / "latest.pt")
    assert ck.planner is None and ck.config.train.lr == RunConfig().train.lr
    res = runner.invoke(app, ["train", str(corpus_file), "--plan", "--no-planner"])
    assert res.exit_code == 2 and "--plan" in res.stderr


@pytest.mark.parametrize("budget", [["--time", "2s"]])
def test_a_timed_plan_measures_this_machine(runner, corpus_file, budget):
    res = runner.invoke(app, ["train", str(corpus_file), "--plan", *budget, *tiny_flags(hidden_size=16)])
    assert res.exit_code == 0, res.output
    first = res.stdout.splitlines()[0]
    speed = float(first.split(" chars/s")[0].rsplit("; ", 1)[1].replace(",", ""))
    assert speed > 0


def test_each_shape_is_measured_once_so_the_plan_uses_the_speed_it_chose_by():
    # A noisy machine measures a shape differently each time: the chosen width's steps must
    # be those it was chosen for (a second probe once planned 3,753 steps for "the widest
    # with 4,000"), and every probe's time is charged to the budget.
    measured: list[tuple[tuple[int, float], float]] = []
    noise = iter([1.0, 0.5] * 50)

    def speed(shape: Shape) -> float:
        cps = flops_speed()(shape) * next(noise)
        measured.append(((shape.hidden_size, shape.dropout), cps))
        return cps

    p = make_plan(RunConfig(), set(), 2_000_000, VOCAB, 240, None, speed, "cpu")
    shapes = [shape for shape, _ in measured]
    assert len(shapes) == len(set(shapes)) == len(p.probe_seconds)
    assert p.chars_per_s == dict(measured)[(p.shape.hidden_size, p.shape.dropout)]
