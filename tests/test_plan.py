"""The planner: its rule on known speeds (no timing), what it keeps, and the CLI around it.

The rule is tested through its properties (more compute buys a wider model, more passes buy
more dropout, a GPU gets big batches, a setting the user chose is kept) on a fake speed
function, so these tests hold whatever constants the quality panel fits.
"""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from conftest import TINY, TINY_SETTINGS, tiny_config, tiny_flags

from charlm.cli import app
from charlm.config.run import ModelConfig, RunConfig, build_config
from charlm.storage import checkpoint
from charlm.training import probe, session
from charlm.training.planner import CPU_WIDTHS, PATIENCE, WIDTHS, Shape, dropout_for, ema_for, lr_for, make_plan

VOCAB = 90


def flops_speed(scale: float = 1.0):
    """A machine whose speed falls with the model's size, as a CPU's does."""

    def speed(shape: Shape) -> float:
        return scale * 2e11 / (shape.params(VOCAB) * 6)

    return speed


def plan(train_chars: int, seconds: float | None = None, steps: int | None = None, explicit: set[str] = frozenset(),
         device: str = "cpu", cfg: RunConfig | None = None, scale: float = 1.0):
    return make_plan(budgeted(seconds, steps, cfg), set(explicit), train_chars, held_out(train_chars), VOCAB,
                     flops_speed(scale), device)


def budgeted(seconds: float | None = None, steps: int | None = None, cfg: RunConfig | None = None) -> RunConfig:
    """`cfg` (the defaults) with a budget of `seconds` of --time or `steps` of --max-steps."""
    return (cfg or RunConfig()).updated({"time": f"{seconds}s" if seconds else "", "max_steps": steps or 0})


def held_out(train_chars: int) -> int:
    """The held-out characters of a corpus whose training part is `train_chars` (5 %)."""
    return train_chars // 19


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


def steps_speed(steps: dict[int, float], seconds: float = 240, slow: float = 1.0):
    """A machine on which each width's `seconds` run takes `steps[width]` steps (32 x 32
    batches, a held-out text too small to cost anything)."""
    from charlm.training.budget import TIME_MARGIN

    def speed(shape: Shape) -> float:
        return (steps[shape.hidden_size] * slow + 0.5) * 1024 / (seconds * (1 - TIME_MARGIN))

    return speed


def test_the_width_is_the_wider_of_the_work_and_the_passes_rules():
    """Known answers, on a machine where each width's run takes a set number of steps in 1,000
    seconds: 2x384 does the most work (1.92 M parameters x 3.07 M characters, 1.6 characters
    per parameter); 2x512 less, on 0.46."""
    steps = {128: 9000, 192: 6000, 256: 4500, 384: 3000, 512: 1500}

    def chosen(train_chars: int, slow: float = 1.0) -> int:
        return make_plan(budgeted(1000), set(), train_chars, 2, VOCAB, steps_speed(steps, 1000, slow),
                         "cpu").shape.hidden_size

    # A billion characters: every width reads them under 5 times, so the work decides.
    assert chosen(10**9) == 384
    # 250,000 characters: 384 units read them 12 times (2.5x the 5), 512 units 6 times but on
    # 0.46 characters per parameter (3.3x short of 1.5): the narrower is nearer its limits.
    assert chosen(250_000) == 384
    # 150,000 characters: 384 units read them 20 times (4.1x), past 512's 3.3x: the wider.
    assert chosen(150_000) == 512
    # A machine so slow that no width takes 1,000 steps: the narrowest.
    assert chosen(10**9, slow=0.1) == 128


# Hand sweeps of `charlm train --time 4m` on State of the Union (steps of each width's run,
# 32 x 32) and the width that scored best there (benchmarks/RESULTS.md). Widths a sweep did
# not run are given the steps of a width slower by its parameters (the work of the next
# measured one), so they are no one's best.
SWEEPS = {
    # 2 threads, bf16: 2x256 1.6240, 2x384 1.5774, 2x512 (1.55 characters per parameter) 1.6446.
    "zen5-bf16": ({128: 62_000, 192: 30_000, 256: 17_619, 384: 9_858, 512: 5_063}, 384),
    # The same Zen 5 in fp32 on one thread: 2x128 1.7642, 2x192 1.6946, 2x256 1.7148, 2x384 (3,006
    # steps, 1.6 characters per parameter) 1.6714; the old rule's 2x256 scored 1.6999.
    "zen5-fp32-1-thread": ({128: 19_721, 192: 9_272, 256: 5_395, 384: 3_006, 512: 1_700}, 384),
    # A Zen 4, 2 threads, bf16: 2x256 1.6714, 2x384 1.6377, 2x512 (0.7 characters per parameter) 1.7390.
    "zen4-bf16": ({128: 26_000, 192: 13_000, 256: 7_466, 384: 4_269, 512: 2_316}, 384),
}


@pytest.mark.parametrize("machine", sorted(SWEEPS))
def test_the_width_that_does_the_most_work_is_the_hand_sweeps_best(machine):
    """On each machine the width whose run did the most work scored best, at 3,006 steps on
    one and 9,858 on another: no step count picks both, and the old rule ("the widest with
    4,000 steps") missed the fp32 one by 0.0285 bpc."""
    steps, best = SWEEPS[machine]
    p = make_plan(budgeted(240), set(), 10**9, 2, VOCAB, steps_speed(steps), "cpu")
    assert p.shape.hidden_size == best
    assert any(line.startswith(f"{best} units: the most work on 1.5 characters per parameter") for line in p.why)


def test_the_learning_rate_falls_with_the_square_root_of_the_width_and_fine_tuning_takes_a_tenth():
    assert (lr_for(64), lr_for(256), lr_for(1024)) == (0.02, 0.01, 0.005)
    scratch = plan(10**8, steps=5000, explicit={"hidden_size"})
    tuned = make_plan(budgeted(steps=5000), {"hidden_size"}, 10**8, held_out(10**8), VOCAB, flops_speed(), "cpu",
                      fine_tuning=True)
    assert scratch.settings["lr"] == 0.01 and tuned.settings["lr"] == 0.001
    assert "lr" not in plan(10**8, steps=5000, explicit={"lr"}).settings


def test_the_average_spans_a_share_of_the_run_that_grows_with_the_passes():
    assert ema_for(10_000, 1) == 0.995  # 2 % of the run: a 200-step window
    assert ema_for(10_000, 5) == 0.999  # 10 %: 1,000 steps
    assert ema_for(10_000, 50) == 0.9996  # at most a quarter: 2,500 steps
    assert ema_for(100, 1) == 0.9  # never a window under 10 steps
    # 5,000 steps over 256,000 training characters: 20 passes.
    p = plan(256_000, steps=5000)
    assert p.passes == pytest.approx(20) and p.settings["ema"] == 0.9992  # a quarter of the run: 1,250 steps
    assert "ema" not in plan(256_000, steps=5000, explicit={"ema"}).settings


def test_patience_only_where_the_text_is_read_more_often_than_it_pays_or_when_fine_tuning():
    assert "patience" not in plan(10**8, steps=5000).settings  # 0.05 passes
    assert plan(100_000, steps=5000).settings["patience"] == PATIENCE  # 51 passes
    tuned = make_plan(budgeted(steps=5000), set(), 10**8, held_out(10**8), VOCAB, flops_speed(), "cpu",
                      fine_tuning=True)
    assert tuned.settings["patience"] == PATIENCE
    assert "patience" not in plan(100_000, steps=5000, explicit={"patience"}).settings


def test_more_passes_buy_more_dropout():
    small, big = plan(100_000, 240), plan(100_000_000, 240)
    assert small.passes > big.passes and small.settings["dropout"] > big.settings["dropout"] == 0.0
    values = [dropout_for(p) for p in (0.5, 1, 3, 10, 30, 100, 1000)]
    assert values == sorted(values) and values[0] == 0.0 and max(values) <= 0.5


def test_a_step_budget_needs_no_speed():
    def no_speed(shape: Shape) -> float:
        raise AssertionError("a step budget must not measure speed")

    p = make_plan(budgeted(steps=5000), set(), 2_000_000, held_out(2_000_000), VOCAB, no_speed, "cpu")
    assert p.chars == 5000 * p.shape.batch_size * p.shape.seq_len and p.probe_seconds == {}
    assert p.shape.hidden_size == RunConfig().model.hidden_size  # steps fix the chars, not the time


def test_what_the_user_chose_is_kept():
    cfg = build_config(None, {"hidden_size": 96, "dropout": 0.05, "lr": 0.001})
    p = plan(100_000, 240, explicit={"hidden_size", "dropout", "lr"}, cfg=cfg)
    assert p.shape.hidden_size == 96 and p.shape.dropout == 0.05
    assert not {"hidden_size", "dropout", "lr"} & set(p.settings)
    # The plan's line shows the rate the run trains at, the user's (it printed "lr -").
    assert ", lr 0.001; " in p.summary() and ", lr 0.00816; " in plan(10**8, 240, scale=2).summary()


def test_a_gpu_plan_uses_big_batches_unless_the_user_set_them():
    assert (plan(10**8, 240, device="cuda").shape.batch_size, plan(10**8, 240, device="cuda").shape.seq_len) \
        == (128, 128)
    kept = plan(10**8, 240, device="cuda", explicit={"batch_size"}, cfg=build_config(None, {"batch_size": 16}))
    assert kept.shape.batch_size == 16 and "batch_size" not in kept.settings


def sequential_speed(per_time_step: float, per_char: float = 0.0):
    """A device whose step waits on its sequential time steps (`per_time_step` seconds each,
    whatever the batch), plus `per_char` seconds per character: a GPU at a latency floor."""

    def speed(shape: Shape) -> float:
        return shape.chars_per_batch / (shape.seq_len * per_time_step + shape.chars_per_batch * per_char)

    return speed


def test_a_gpu_waiting_on_its_time_steps_trains_more_streams_of_shorter_windows():
    # ~18 ms a step for 128 time steps whatever the width (the H100's measurement): 512 x 32
    # does the same 16,384 characters a step in a quarter of the time.
    p = make_plan(budgeted(240), set(), 10**8, 10**5, VOCAB, sequential_speed(18e-3 / 128), "cuda")
    assert (p.shape.batch_size, p.shape.seq_len) == (512, 32)
    assert (p.settings["batch_size"], p.settings["seq_len"]) == (512, 32)
    assert p.chars_per_s == pytest.approx(16_384 / (32 * 18e-3 / 128))
    assert any(line.startswith("batch 512x32: 4.00x the characters a second of 128x128") for line in p.why)
    # Where arithmetic costs most of a step, a few per cent faster is noise: the default layout.
    p = make_plan(budgeted(240), set(), 10**8, 10**5, VOCAB, sequential_speed(1e-6, 1e-6), "cuda")
    assert (p.shape.batch_size, p.shape.seq_len) == (128, 128)
    assert any(line.startswith("batch 128x128: no layout of its characters a step trains 1.1x as fast")
               for line in p.why)


def test_a_cpu_keeps_32_by_32_and_measures_no_other_layout():
    # Shorter windows would be faster on this fake CPU, but their quality is unmeasured there.
    asked: set[tuple[int, int]] = set()

    def speed(shape: Shape) -> float:
        asked.add((shape.batch_size, shape.seq_len))
        return sequential_speed(1e-3, 1e-5)(shape)

    p = make_plan(budgeted(240), set(), 10**7, 10**5, VOCAB, speed, "cpu")
    assert asked == {(32, 32)} and (p.shape.batch_size, p.shape.seq_len) == (32, 32)
    assert "batch_size" not in p.settings


@pytest.mark.parametrize("explicit", [{"batch_size"}, {"seq_len"}])
def test_a_layout_the_user_set_is_neither_measured_nor_changed(explicit):
    cfg = build_config(None, {"batch_size": 8, "seq_len": 16})
    asked: list[tuple[int, int]] = []

    def speed(shape: Shape) -> float:
        asked.append((shape.batch_size, shape.seq_len))
        return sequential_speed(1e-3)(shape)

    p = make_plan(budgeted(240, cfg=cfg), explicit, 10**7, 10**5, VOCAB, speed, "cuda")
    assert set(asked) == {(8, 16)} and (p.shape.batch_size, p.shape.seq_len) == (8, 16)
    assert "batch_size" not in p.settings and "seq_len" not in p.settings


def test_a_step_budget_or_a_records_model_keeps_the_device_s_first_layout():
    fast_short = sequential_speed(1e-3)
    for p in (make_plan(budgeted(steps=100), set(), 10**7, 10**5, VOCAB, fast_short, "cuda"),
              make_plan(budgeted(240), set(), 10**7, 10**5, VOCAB, fast_short, "cuda", choose_layout=False)):
        assert (p.shape.batch_size, p.shape.seq_len) == (128, 128)


def test_a_plan_s_settings_go_to_their_sections():
    before = RunConfig()
    cfg = before.updated({"hidden_size": 384, "lr": 0.005, "dropout": 0.1, "patience": 5})
    assert (cfg.model.hidden_size, cfg.model.dropout, cfg.train.lr, cfg.session.patience) == (384, 0.1, 0.005, 5)
    assert before == RunConfig()  # a copy: the config it came from is unchanged
    assert cfg.changed() == {"hidden_size", "lr", "dropout", "patience"}


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


def test_a_timed_plan_measures_this_machine_and_buys_with_what_it_measured(runner, corpus_file):
    for seconds in (2, 20):
        res = runner.invoke(app, ["train", str(corpus_file), "--plan", "--time", f"{seconds}s",
                                  *tiny_flags(hidden_size=16)])
        assert res.exit_code == 0, res.output
        first = res.stdout.splitlines()[0]
        speed = float(first.split(" chars/s")[0].rsplit("; ", 1)[1].replace(",", ""))
        chars = float(first.split(" chars, ")[0].rsplit("-> ", 1)[1].replace(",", ""))
        # The characters bought are the measured speed times the budget's training seconds
        # (all of it, less the 3 % margin and the evaluations).
        assert 0.8 * seconds < chars / speed <= 0.97 * seconds, first


def test_each_shape_is_measured_once_so_the_plan_uses_the_speed_it_chose_by():
    # A noisy machine measures a shape differently each time: the chosen width's steps must
    # be those it was chosen for (a second probe once planned 3,753 steps for "the widest
    # with 4,000"), and every probe's time is charged to the budget.
    measured: list[tuple[tuple[int, float], float]] = []
    noise = iter([1.0, 0.5] * 50)

    def speed(shape: Shape) -> float:
        cps = flops_speed()(shape) * next(noise)
        measured.append(((shape.hidden_size, shape.dropout, shape.batch_size), cps))
        return cps

    p = make_plan(budgeted(240), set(), 2_000_000, held_out(2_000_000), VOCAB, speed, "cpu")
    shapes = [shape for shape, _ in measured]
    assert len(shapes) == len(set(shapes)) == len(p.probe_seconds)
    assert p.chars_per_s == dict(measured)[(p.shape.hidden_size, p.shape.dropout, p.shape.batch_size)]


@pytest.mark.parametrize("records", ["", "lines"])
def test_the_planner_plans_on_the_parts_the_trainer_trains_on_and_holds_out(records, corpus_file, tmp_path,
                                                                          monkeypatch):
    """Which text is held out is decided once (`split_data`): the planner's training and
    held-out sizes are the trainer's, whole records for a records model."""
    import torch

    from charlm.data.cache import encode_corpus
    from charlm.data.streams import model_vocab, training_data
    from charlm.storage.rundir import RunDir
    from charlm.training import probe
    from charlm.training.trainer import Trainer

    seen = {}

    def spy(cfg, explicit, train_chars, val_chars, *args, **kwargs):
        seen.update(train=train_chars, val=val_chars, layout=kwargs["choose_layout"])
        return make_plan(cfg, explicit, train_chars, val_chars, *args, **kwargs)

    monkeypatch.setattr(probe, "make_plan", spy)
    cfg = tiny_config(records=records, max_steps=10, val_fraction=0.2)
    corpus = encode_corpus([str(corpus_file)])
    vocab = model_vocab(corpus.vocab.chars, records)
    data = training_data(corpus, vocab, records)
    probe.plan_run(cfg, set(TINY_SETTINGS), data, len(vocab), torch.device("cpu"))
    trainer = Trainer(cfg, vocab, data, corpus.desc, RunDir(tmp_path), torch.device("cpu"))
    assert (seen["train"], seen["val"]) == (len(trainer.split.train), len(trainer.split.val))
    assert seen["layout"] is (records == "")  # a records row's fill is not what random text measures


def test_evaluations_take_a_small_share_of_a_timed_budget():
    from charlm.training.planner import EVAL_SHARE, MIN_EVALS, eval_interval_for

    # 26 ms steps, 0.88 s evaluations: every 1,128 steps keeps them at 3 % of 4 minutes ...
    assert eval_interval_for(240, 0.026, 0.88, 200) == 1100
    # ... but a 1-minute run still evaluates 5 times (every 461 steps), and a cheap evaluation
    # never comes more often than the configured interval.
    assert eval_interval_for(60, 0.026, 0.88, 200) == 460
    assert eval_interval_for(240, 0.026, 0.01, 200) == 200
    assert (EVAL_SHARE, MIN_EVALS) == (0.03, 5)
    # The plan sets it for --time runs, and keeps the user's.
    assert plan(10_000_000, 240).settings["eval_interval"] > 200
    assert "eval_interval" not in plan(10_000_000, 240, explicit={"eval_interval"}).settings
    assert "eval_interval" not in plan(10_000_000, steps=5000).settings


def test_a_second_plan_on_the_same_machine_measures_nothing(corpus_file, tmp_path, monkeypatch):
    """The probe's speeds are kept per machine and shape (speeds.json): a second plan reads
    them, and a change of anything a step's speed depends on measures again."""
    import json

    import torch

    from charlm.data.cache import encode_corpus
    from charlm.data.streams import model_vocab, training_data
    from charlm.training import probe

    calls = []
    real = probe.step_seconds

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "step_seconds", counted)
    corpus = encode_corpus([str(corpus_file)])
    vocab = model_vocab(corpus.vocab.chars)
    data = training_data(corpus, vocab)
    explicit = set(TINY_SETTINGS) - {"hidden_size"}  # the width is searched: several shapes

    def planned(**settings):
        cfg = tiny_config(time="60s", precision="fp32", **settings)
        return probe.plan_run(cfg, explicit, data, len(vocab), torch.device("cpu"))[1]

    first = planned()
    measured = len(calls)
    assert measured >= 2 and not any("from" in line and "speeds.json" in line for line in first.why)
    second = planned()
    assert len(calls) == measured  # nothing measured again
    assert second.shape == first.shape and second.chars_per_s == first.chars_per_s
    assert any(f"the speeds of {measured} shapes on this machine from" in line for line in second.why)
    # Another thread count: measured anew.
    torch.set_num_threads(torch.get_num_threads() + 1)
    try:
        planned()
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    assert len(calls) > measured
    # A damaged or foreign file is no entries (and is replaced).
    path = probe.speeds_file()
    path.write_text("{not json", encoding="utf-8")
    before = len(calls)
    planned()
    assert len(calls) > before and json.loads(path.read_text())["format"] == probe.SPEEDS_FORMAT
    assert all(probe.speed_key(Shape(hidden_size=h), 90, torch.device("cpu"), "fp32") !=
               probe.speed_key(Shape(hidden_size=h), 91, torch.device("cpu"), "fp32") for h in (64, 128))


def test_a_run_s_own_speed_replaces_the_probe_s_and_corrects_its_other_widths(tmp_path):
    """The probe's few early steps are slow for every width alike: a run's measured seconds
    per step settle its own shape and scale the probe's other entries of the machine by the
    same ratio, once; another machine's entries are left alone."""
    cache = probe.SpeedCache(tmp_path / "speeds.json")
    here, there = "cpu X [avx2] threads=2 torch=2 bf16 ", "cpu Y [avx2] threads=2 torch=2 bf16 "
    for key, seconds in ((here + "2x256", 0.04), (here + "2x384", 0.08), (there + "2x256", 0.04)):
        cache.put(key, seconds)
    cache.measured_by_run(here + "2x256", 0.02, here)  # the run was twice as fast as probed
    again = probe.SpeedCache(tmp_path / "speeds.json")  # what the next run reads
    assert again.speeds == {here + "2x256": 0.02, here + "2x384": pytest.approx(0.04), there + "2x256": 0.04}
    # A second run's measurement settles its shape, and rescales nothing twice.
    again.measured_by_run(here + "2x256", 0.03, here)
    third = probe.SpeedCache(tmp_path / "speeds.json")
    assert third.speeds[here + "2x256"] == 0.03 and third.speeds[here + "2x384"] == pytest.approx(0.04)
    assert third.settled == {here + "2x256", here + "2x384"}


def test_a_session_that_trained_long_enough_keeps_its_speed_for_the_next_plan(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "REMEMBER_AFTER_STEPS", 20)
    cfg = tiny_config(max_steps=25, precision="fp32")
    session.fit(cfg, [str(corpus_file)], tmp_path / "run")
    ck = checkpoint.load(tmp_path / "run" / "latest.pt")
    key = probe.speed_key(Shape.of(ck.config), len(ck.vocab), torch.device("cpu"), "fp32")
    kept = probe.SpeedCache(probe.speeds_file())
    assert key in kept.settled and 0 < kept.speeds[key] < 1
    # Control: a session shorter than that keeps nothing.
    probe.speeds_file().unlink()
    session.fit(tiny_config(max_steps=10, precision="fp32"), [str(corpus_file)], tmp_path / "short")
    assert not probe.speeds_file().exists()


def test_weight_drop_is_its_own_speed_and_off_keeps_the_old_keys():
    cpu, shape = torch.device("cpu"), Shape(hidden_size=64)
    plain = probe.speed_key(shape, 90, cpu, "fp32")
    assert probe.speed_key(shape, 90, cpu, "fp32", ModelConfig()) == plain  # keys written before it exist
    dropped = probe.speed_key(shape, 90, cpu, "fp32", ModelConfig(weight_drop=0.3))
    assert dropped != plain and dropped.endswith(" wd0.3 ld0")
    assert probe.speed_key(shape, 90, cpu, "fp32", ModelConfig(locked_dropout=0.1)) not in (plain, dropped)


def test_a_width_needs_characters_for_its_parameters_as_well_as_work():
    """A width whose run trains on fewer than MIN_CHARS_PER_PARAM characters per parameter is
    not the work rule's choice, however much work it does (here 2x512, on 1.38, does more
    than 2x384): on a Zen 4, 2x512 on 0.7 did 95 % of 2x384's work and lost by 0.10 bpc."""
    from charlm.training.planner import MIN_CHARS_PER_PARAM

    steps = {128: 30_000, 192: 20_000, 256: 14_000, 384: 7_000, 512: 4_500}
    assert steps[512] * 1024 < MIN_CHARS_PER_PARAM * Shape(hidden_size=512).params(VOCAB)
    assert steps[512] * Shape(hidden_size=512).params(VOCAB) > steps[384] * Shape(hidden_size=384).params(VOCAB)
    assert make_plan(budgeted(240), set(), 10**9, 2, VOCAB, steps_speed(steps), "cpu").shape.hidden_size == 384


def test_where_the_two_width_rules_disagree_the_width_nearer_its_limits_is_chosen():
    """The Zen 5's second 4-minute run on State of the Union: with the first run's speeds,
    2x384 would read the 1,970,135 training characters 5.5 times (over MAX_PASSES) and 2x512
    would do 84 % of its work; the passes rule alone took 2x512, which scored 0.062 bpc
    worse. 2x384 is 1.10x past its limit, 2x512 1.19x: 2x384 stays."""
    steps = {128: 58_000, 192: 25_000, 256: 17_000, 384: 10_600, 512: 5_100}
    train_chars = 1_970_135
    p = make_plan(budgeted(240), set(), train_chars, 2, VOCAB, steps_speed(steps), "cpu")
    assert steps[384] * 1024 / train_chars > 5  # the passes rule alone would go wider
    assert p.shape.hidden_size == 384
    assert any(line.startswith("384 units: the nearer its limits of 384 (5.5 passes") and "1.10x" in line
               and "512 (2.7 passes, 1.6 characters per parameter, 84% of the most work: 1.19x)" in line
               for line in p.why), p.why
    # A little more text makes the same budget 4.9 passes for 384 units: no disagreement.
    wider_text = make_plan(budgeted(240), set(), 2_250_000, 2, VOCAB, steps_speed(steps), "cpu")
    assert wider_text.shape.hidden_size == 384 and not any("nearer" in line for line in wider_text.why)
