"""The planner: corpus size x measured speed x budget -> the model and the recipe.

Before a run, charlm knows how much text it has and how long it may train. A short probe on
this machine and device tells how many characters per second each candidate shape trains;
from these the planner predicts how many characters the budget buys and how many passes over
the text that is (E = characters / training characters), and chooses by a rule fitted to
the quality panel (benchmarks/quality.py; the table is in benchmarks/RESULTS.md):

- width (a 2-layer LSTM), the wider of two: the one whose run does the most work, parameters
  x characters trained (the widest within `WORK_SHARE` of the most), among the widths that
  train on `MIN_CHARS_PER_PARAM` characters per parameter, and the narrowest whose run sees
  its text at most `MAX_PASSES` times (a narrow network that reads a short text over and
  over learns less from it than a wider one that reads it fewer times), as long as that one
  still takes `FEWEST_STEPS`. Work is what differs between machines: a wider width is
  slower by a ratio that depends on the CPU and its precision, and in every 4-minute hand
  sweep on State of the Union (a Zen 5 in bf16 and in fp32 on one thread, a Zen 4, a Zen 1)
  the width that did the most work scored best, at 3,000 steps on one machine and 9,900 on
  another. On a big corpus the first decides (the budget is the limit), on a small one the
  second (the text is). Where they disagree, the wider wins unless it is further from its
  limits than the narrower is over its passes (`_Run.strain`; on a Zen 5, 2x384 at 5.5 passes
  beat 2x512 at 84 % of 2x384's work by 0.062 bpc). On a CPU no wider than 512 (`CPU_WIDTHS`);
- dropout: none up to `MAX_PASSES`; beyond it (the widest network still sees the text many
  more times) it grows with the logarithm of the excess (`dropout_for`);
- an average of the weights (`--ema`) over a share of the run that grows with the passes
  (`ema_for`): it scores better than the live weights in every panel cell;
- learning rate: the defaults' rate at width 256, scaled by (256 / width) ** 0.5;
- fine-tuning (`--init-from`): the shape is the base model's, the learning rate a tenth;
- `--patience`: a run that will read its text more than `MAX_PASSES` times (or fine-tunes)
  stops once held-out bpc has not improved for `PATIENCE` evaluations;
- the batch layout: 32 streams x 32 characters a step on a CPU, where small batches train as
  fast per character as big ones and give more updates; on a GPU, which needs big batches to
  be fast, 16,384 characters, as 128 x 128, 256 x 64 or 512 x 32 (`LAYOUTS`): the measured
  fastest for the chosen width, if it trains `LAYOUT_GAIN` times as many characters a second
  as the first. The same characters a step keep the steps per character and the learning
  rate; the sequential time steps of a call are what a GPU's step waits on (an H100 took
  ~18 ms for 128 of them at every width from 256 to 1024);
- evaluations under `--time`: spaced so that they (scoring, saving, previews) take at most
  `EVAL_SHARE` of the budget, as long as the run still evaluates `MIN_EVALS` times
  (`eval_interval_for`): every 200 steps they took a sixth of a 4-minute run.

A step budget (`--max-steps`, or none: the default step count) fixes the characters but not
the time, so it keeps the configured width and plans the rest. Whatever the user set (a flag
or --config) is kept; the planner fills in the rest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from charlm.config.run import DEFAULT_MAX_STEPS, ModelConfig, RunConfig
from charlm.model.size import parameter_count
from charlm.training.budget import guess_eval_seconds, steps_in

WIDTHS = (128, 192, 256, 384, 512, 768, 1024)  # the widths a GPU may get
# On a CPU, at most 512: the widest the panel measured. A 2x1024 LSTM the planner chose for a
# 30-minute run (lr 0.005, bf16) stalled at 2.2 bpc after 2,800 steps, where 2x384 reaches 1.6.
CPU_WIDTHS = WIDTHS[:WIDTHS.index(512) + 1]
# A width is worth its size when its run does the most work (parameters x characters; the
# widest within this share of the most: measured speeds are noisy by more than 5 %) ...
WORK_SHARE = 0.95
# ... among those training on this many characters per parameter (a Zen 5's 2x512 on 1.55
# lost 0.067 bpc to 2x384, 0.89 of the work; the fp32 Zen 5's 2x384 on 1.6, 1.2x the work of
# any narrower width, scored best) ...
MIN_CHARS_PER_PARAM = 1.5
MAX_PASSES = 5.0  # ... or when a narrower one would read the text more than this many times,
FEWEST_STEPS = 1000  # ... as long as it still takes this many
DROPOUT_PER_LOG_PASS = 0.1  # dropout = this x ln(passes / MAX_PASSES) beyond it ...
MIN_DROPOUT, MAX_DROPOUT = 0.05, 0.4  # ... from this (less is not worth what it costs) up to this
BASE_LR, BASE_WIDTH = 1e-2, 256
FINETUNE_LR_SCALE = 0.1  # fine-tuning: a tenth of the from-scratch rate (benchmarks/finetune.py)
PATIENCE = 5  # evaluations without a better held-out bpc before a run that overfits stops
EMA_SHARE_PER_PASS, EMA_MIN_SHARE, EMA_MAX_SHARE = 0.02, 0.02, 0.25  # the average's window, of the run
# Batch layouts (streams, characters) a step may take, the first the default: each has the same
# characters a step. Another is taken only where it trains this many times the characters a
# second (the probe's few steps are noisy by more than 5 %).
# A CPU keeps 32 x 32: more streams of shorter windows (64 x 16) trained 0.95-0.99x its characters
# a second at 2 x 512 on a Zen 4 (benchmarks/RESULTS.md), so there is nothing to choose there.
LAYOUTS = {"cpu": ((32, 32),), "cuda": ((128, 128), (256, 64), (512, 32))}
LAYOUT_GAIN = 1.1
PROBE_TIMED_STEPS = 5  # steps of each shape the probe times (after the untimed warm-up steps)
# Evaluations (scoring, saving, previews) take at most this share of a --time budget ...
EVAL_SHARE = 0.03
MIN_EVALS = 5  # ... as long as a run still evaluates this many times


@dataclass(frozen=True)
class Shape:
    """What the speed of a training step depends on."""

    hidden_size: int = 256
    num_layers: int = 2
    embedding_size: int = 64
    batch_size: int = 32
    seq_len: int = 32
    dropout: float = 0.0
    cell: str = "lstm"

    @classmethod
    def of(cls, cfg: RunConfig) -> Shape:
        m, t = cfg.model, cfg.train
        return cls(m.hidden_size, m.num_layers, m.embedding_size, t.batch_size, t.seq_len, m.dropout, m.cell)

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def chars_per_batch(self) -> int:
        """Characters a process trains on per step."""
        return self.batch_size * self.seq_len

    def params(self, vocab_size: int) -> int:
        """Parameters of the CharRNN of this shape."""
        model = ModelConfig(self.cell, self.num_layers, self.hidden_size, self.embedding_size, self.dropout)
        return parameter_count(model, vocab_size)


@dataclass
class Plan:
    """The planner's choice and why."""

    settings: dict[str, Any]  # config fields the planner filled (never one the user set)
    shape: Shape
    chars_per_s: float  # of the chosen shape, measured or predicted from the probes
    chars: float  # characters the budget buys
    passes: float
    params: int
    lr: float  # the run's peak learning rate, the planner's or the user's
    why: list[str] = field(default_factory=list)
    probe_seconds: dict[str, float] = field(default_factory=dict)  # shape -> time its probe took

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan (plain values)."""
        return {"summary": self.summary(), "why": list(self.why), "settings": dict(self.settings),
                "chars_per_s": self.chars_per_s, "chars": self.chars, "passes": self.passes,
                "params": self.params, "probe_seconds": round(sum(self.probe_seconds.values()), 3)}

    def toml_comment(self) -> str:
        """The plan as comments for the run's config.toml."""
        return "".join(f"# {line}\n" for line in [self.summary(), *self.why])

    def summary(self) -> str:
        s = self.shape
        return (f"plan: {s.num_layers}x{s.hidden_size} {s.cell.upper()}, {self.params:,} parameters, "
                f"dropout {s.dropout:g}, batch {s.batch_size}x{s.seq_len}, lr {self.lr:g}; "
                f"{self.chars_per_s:,.0f} chars/s -> {self.chars:,.0f} chars, {self.passes:.1f} passes")


def dropout_for(passes: float) -> float:
    """Dropout for a run that sees its text `passes` times."""
    dropout = DROPOUT_PER_LOG_PASS * math.log(max(passes, 1e-9) / MAX_PASSES)
    return 0.0 if dropout < MIN_DROPOUT else round(min(MAX_DROPOUT, dropout), 2)


def ema_for(steps: float, passes: float) -> float:
    """Decay of the weight average for a run of `steps` that sees its text `passes` times.

    Its window (1 / (1 - decay)) spans a share of the run that grows with the passes: while
    the model still improves fast (few passes) a long average would lag behind it; once it
    sees the text many times, averaging over a quarter of the run smooths out the noise of
    overfitting (benchmarks/averaging.py)."""
    share = min(EMA_MAX_SHARE, max(EMA_MIN_SHARE, EMA_SHARE_PER_PASS * passes))
    return round(1 - 1 / max(10.0, share * steps), 5)


def lr_for(width: int) -> float:
    return round(BASE_LR * math.sqrt(BASE_WIDTH / width), 5)


def eval_interval_for(seconds: float, sec_per_step: float, eval_seconds: float, fewest: int) -> int:
    """Steps between evaluations of a `seconds` run at `sec_per_step`, an evaluation taking
    `eval_seconds`: as many steps as keep evaluations within `EVAL_SHARE` of the budget, but
    no more than give the run `MIN_EVALS` of them, and never fewer than `fewest`. Two
    significant digits (1,128 -> 1,100)."""
    by_share = eval_seconds / (EVAL_SHARE * sec_per_step)
    interval = max(float(fewest), min(by_share, seconds / sec_per_step / MIN_EVALS))
    return max(fewest, int(float(f"{interval:.2g}")))


def make_plan(cfg: RunConfig, explicit: set[str], train_chars: int, val_chars: int, vocab_size: int,
              speed: Callable[[Shape], float], device_type: str, fine_tuning: bool = False,
              choose_layout: bool = True) -> Plan:
    """Choose the fields of `cfg` not in `explicit` for its budget (`--time` seconds or
    `--max-steps`; neither: the default step count), for a corpus of `train_chars` training
    and `val_chars` held-out characters, with `speed(shape)` the chars/s of a shape on this
    machine (only asked when there is a time budget). `choose_layout` False: the device's
    first layout (records: how many of them a row holds depends on its length, which random
    text does not measure)."""
    time_cap, max_steps = cfg.session.time_seconds(), cfg.session.max_steps or None
    base = Shape.of(cfg)
    layouts = LAYOUTS["cuda" if device_type == "cuda" else "cpu"]
    free_layout = "batch_size" not in explicit and "seq_len" not in explicit
    if free_layout:
        base = replace(base, batch_size=layouts[0][0], seq_len=layouts[0][1])
    timed: dict[str, float] = {}  # seconds spent measuring each shape
    speeds: dict[str, float] = {}  # each shape is measured once: one plan, one speed per shape

    scored = cfg.train.scored_chars(val_chars)

    def interval_of(shape: Shape, cps: float) -> int:
        """Steps between a --time run's evaluations at this shape's speed (the budget's own
        guess at an evaluation's cost), unless the user chose them."""
        if time_cap is None or "eval_interval" in explicit:
            return cfg.session.eval_interval
        sec_per_step = shape.chars_per_batch / cps
        eval_s = guess_eval_seconds(scored, shape.chars_per_batch)(sec_per_step)
        return eval_interval_for(time_cap, sec_per_step, eval_s, cfg.session.eval_interval)

    def chars_of(shape: Shape) -> tuple[float, float]:
        """(chars/s or 0, chars the budget buys) for a shape: `--time` plans its steps with the
        speed the probe measures, evaluations included, as training itself does."""
        per_batch = shape.chars_per_batch
        if time_cap is None:
            return 0.0, float((max_steps or DEFAULT_MAX_STEPS) * per_batch)
        name = _name(shape)
        if name not in speeds:
            t0 = time.perf_counter()
            speeds[name] = speed(shape)
            timed[name] = time.perf_counter() - t0
        cps = speeds[name]
        return cps, float(steps_in(time_cap, per_batch / cps, per_batch, scored, interval_of(shape, cps)) * per_batch)

    why: list[str] = []
    chosen = base
    if time_cap is not None and "hidden_size" not in explicit:
        widths = WIDTHS if device_type == "cuda" else CPU_WIDTHS
        chosen = _choose_width(base, train_chars, chars_of, why, widths, vocab_size)
    if time_cap is not None and free_layout and choose_layout:
        chosen = _choose_layout(chosen, chars_of, why, layouts)
    settings: dict[str, Any] = {}
    if chosen.hidden_size != cfg.model.hidden_size:
        settings["hidden_size"] = chosen.hidden_size
    if (chosen.batch_size, chosen.seq_len) != (cfg.train.batch_size, cfg.train.seq_len):
        settings["batch_size"], settings["seq_len"] = chosen.batch_size, chosen.seq_len
    cps, chars = chars_of(chosen)
    passes = chars / max(1, train_chars)
    if "dropout" not in explicit:
        dropout = dropout_for(passes)
        chosen = replace(chosen, dropout=dropout)
        settings["dropout"] = dropout
        if dropout and time_cap is not None:  # dropout costs time: plan with its own speed
            cps, chars = chars_of(chosen)
            passes = chars / max(1, train_chars)
    if "lr" not in explicit:
        # A trained model fine-tuned at a from-scratch rate forgets what it knew.
        settings["lr"] = round(lr_for(chosen.hidden_size) * (FINETUNE_LR_SCALE if fine_tuning else 1), 6)
    if "patience" not in explicit and (fine_tuning or passes > MAX_PASSES):
        # The text will be read more often than it pays: stop once held-out bpc stops improving.
        settings["patience"] = PATIENCE
    if "ema" not in explicit:
        settings["ema"] = ema_for(chars / chosen.chars_per_batch, passes)
    if time_cap is not None and interval_of(chosen, cps) != cfg.session.eval_interval:
        settings["eval_interval"] = interval_of(chosen, cps)
    why.insert(0, f"{passes:.1f} passes over {train_chars:,} training characters")
    return Plan(settings, chosen, cps, chars, passes, chosen.params(vocab_size), settings.get("lr", cfg.train.lr), why,
                timed)


@dataclass(frozen=True)
class _Run:
    """What a width's run would do with the budget."""

    passes: float  # over the training text
    chars_per_param: float
    work: float  # parameters x characters trained

    @property
    def fed(self) -> bool:
        """Trains on enough characters for its parameters to be worth them."""
        return self.chars_per_param >= MIN_CHARS_PER_PARAM

    def strain(self, most_work: float) -> float:
        """How far the run is past the worse of its limits, as a ratio (1: within all): its
        passes over MAX_PASSES, its characters per parameter under MIN_CHARS_PER_PARAM, its
        work under `most_work` (the most any width that trains enough does). Where the two
        width rules disagree, the width nearer its limits is chosen: on a Zen 5 at 4 minutes
        on State of the Union, 2x384 read the text 5.5 times (1.10x) and 2x512 did 84 % of
        2x384's work (1.19x); 2x384 scored 1.584 bpc, 2x512 1.645. On a small text the narrow
        widths read it many times more (250 KB on the Xeon: 2x512 at 9.6 passes, 0.7
        characters per parameter, 2.1x) and the wide one stays, as in the panel's best cell."""
        return max(1.0, self.passes / MAX_PASSES, MIN_CHARS_PER_PARAM / max(self.chars_per_param, 1e-9),
                   most_work / max(self.work, 1e-9))


def _choose_width(base: Shape, train_chars: int, chars_of: Callable[[Shape], tuple[float, float]],
                  why: list[str], widths: tuple[int, ...], vocab_size: int) -> Shape:
    """The wider of: the widest width within WORK_SHARE of the most work (parameters x
    characters) among those training on MIN_CHARS_PER_PARAM characters per parameter, and
    the narrowest whose run reads the text at most MAX_PASSES times -- unless that wider one
    is further from its limits than the narrower is over its passes (`_Run.strain`): then
    the narrower. Narrow to wide: a wider width only takes fewer steps, reads the text fewer
    times and trains fewer characters per parameter, so the search stops once the passes
    rule is settled and the work has passed its peak or the characters per parameter their
    floor."""
    runs: dict[int, _Run] = {}
    by_passes: int | None = None
    for width in widths:
        shape = replace(base, hidden_size=width, dropout=0.0)
        chars = chars_of(shape)[1]
        if chars / shape.chars_per_batch < FEWEST_STEPS:
            break  # too few steps to train this width (or any wider one) at all
        params = shape.params(vocab_size)
        run = runs[width] = _Run(chars / max(1, train_chars), chars / params, chars * params)
        if by_passes is None and run.passes <= MAX_PASSES:
            by_passes = width
        if by_passes is not None and (not run.fed or run.work < WORK_SHARE * _most_work(runs)):
            break
    if not runs:  # no width takes FEWEST_STEPS: the narrowest
        why.append(f"{widths[0]} units: no width takes {FEWEST_STEPS:,} steps")
        return replace(base, hidden_size=widths[0])
    most = _most_work(runs)
    by_work = max((w for w, run in runs.items() if run.fed and run.work >= WORK_SHARE * most), default=widths[0])
    wide = by_passes or max(runs)  # no width reads it few enough times: the widest that trains
    few = f"{by_passes} units: the narrowest" if by_passes else f"none up to {max(runs)} units is"
    works = ", ".join(f"{w} {runs[w].work / 1e12:.1f}" for w in runs)
    why.append(f"{by_work} units: the most work on {MIN_CHARS_PER_PARAM:g} characters per parameter "
               f"(parameters x characters, 1e12: {works}); {few} reading the text at most {MAX_PASSES:g} times")
    if wide <= by_work:
        return replace(base, hidden_size=by_work)
    chosen = by_work if runs[by_work].strain(most) < runs[wide].strain(most) else wide
    why.append(f"{chosen} units: the nearer its limits of " + " and ".join(
        f"{w} ({runs[w].passes:.1f} passes, {runs[w].chars_per_param:.1f} characters per parameter, "
        f"{runs[w].work / most:.0%} of the most work: {runs[w].strain(most):.2f}x)" for w in (by_work, wide)))
    return replace(base, hidden_size=chosen)


def _choose_layout(shape: Shape, chars_of: Callable[[Shape], tuple[float, float]], why: list[str],
                   layouts: tuple[tuple[int, int], ...]) -> Shape:
    """`shape` (in the first of `layouts`) in the layout that trains the most characters a
    second, if that is LAYOUT_GAIN times the first's; else as it is."""
    if len(layouts) < 2:
        return shape
    speeds = {(b, n): chars_of(replace(shape, batch_size=b, seq_len=n))[0] for b, n in layouts}
    (b, n), first = max(speeds, key=lambda layout: speeds[layout]), layouts[0]
    gain = speeds[b, n] / max(speeds[first], 1e-9)
    measured = ", ".join(f"{bb}x{nn} {cps:,.0f}" for (bb, nn), cps in speeds.items())
    if gain >= LAYOUT_GAIN:
        why.append(f"batch {b}x{n}: {gain:.2f}x the characters a second of {first[0]}x{first[1]}, the same "
                   f"characters a step (chars/s: {measured})")
        return replace(shape, batch_size=b, seq_len=n)
    why.append(f"batch {first[0]}x{first[1]}: no layout of its characters a step trains "
               f"{LAYOUT_GAIN:g}x as fast (chars/s: {measured})")
    return shape


def _most_work(runs: dict[int, _Run]) -> float:
    """The most work of the runs that train on MIN_CHARS_PER_PARAM characters per parameter
    (0 if none does)."""
    return max((r.work for r in runs.values() if r.fed), default=0.0)


def _name(shape: Shape) -> str:
    return f"{shape.num_layers}x{shape.hidden_size} d{shape.dropout:g} b{shape.batch_size}x{shape.seq_len}"
