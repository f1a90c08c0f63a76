"""What a user sees during training: a tqdm bar on a terminal (or a notebook's widget, given
`tqdm.auto`'s bar), plain lines otherwise.

Part of the CLI layer (the library reports through `Callbacks`; this draws it on stderr).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from charlm.training.events import Callbacks, EvalRecord, StartInfo, StepStats, TrainResult


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Reporter(Callbacks):
    """Progress bar, evaluation lines, live previews and the closing summary, on stderr."""

    def __init__(self, quiet: bool = False, stream: Any = None, bar: Callable[..., Any] | None = None) -> None:
        """`bar`: a tqdm class that draws without a terminal (a notebook's widget): bars are then
        drawn whatever `stream` is. Without it, tqdm's own bars, on a terminal only."""
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar_class: Callable[..., Any] = bar or tqdm
        self.tty = bar is not None or bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: tqdm | None = None  # training steps
        self.corpus_bar: tqdm | None = None  # hashing / encoding the corpus
        self.encoding_noted = False  # said (off a terminal) that encoding started
        self.smooth: float | None = None
        self.val: float | None = None

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """A bar for hashing / encoding the corpus (on a terminal; a large corpus takes a while).

        Off a terminal (a log file) one line says that encoding started, so a log of a large
        corpus does not sit silent until training begins."""
        if self.quiet:
            return
        if not self.tty:
            if stage == "encoding" and not self.encoding_noted:
                self.encoding_noted = True
                size = f" ({total / 1e6:,.0f} MB)" if total >= 1e6 else ""
                self._print(f"charlm: encoding the corpus{size} into the cache; later runs skip this")
            return
        bar = self.corpus_bar
        if bar is None or bar.desc != stage:
            self._end_corpus_bar()
            bar = self.corpus_bar = self._new_bar(total=total or None, file=self.stream, desc=stage, unit="B",
                            unit_scale=True, unit_divisor=1024, leave=False, mininterval=0.5,
                            dynamic_ncols=_columns(self.stream) > 0,
                            ncols=None if _columns(self.stream) > 0 else 100)
        bar.update(done - bar.n)

    def _new_bar(self, **options: Any) -> tqdm:
        if self.bar_class is not tqdm:  # a widget sizes itself; terminal columns mean nothing to it
            options = {k: v for k, v in options.items() if k not in ("ncols", "dynamic_ncols")}
        try:
            return self.bar_class(**options)
        except ImportError:  # tqdm.notebook without ipywidgets: a text bar instead
            return tqdm(**options)

    def _end_corpus_bar(self) -> None:
        if self.corpus_bar is not None:
            self.corpus_bar.close()
            self.corpus_bar = None

    def on_message(self, text: str) -> None:
        self._end_corpus_bar()  # the corpus is read once a message about it comes
        self._print(f"charlm: {text}")

    def on_start(self, info: StartInfo) -> None:
        if self.quiet:
            return
        m = info.config.model
        verb = f"resuming at step {info.step:,}" if info.resumed else "training"
        self._print(
            f"charlm: {verb}: {m.num_layers}x{m.hidden_size} {m.cell.upper()}, "
            f"{info.params:,} parameters, {info.vocab_size} characters; "
            f"{info.train_chars:,} train / {info.val_chars:,} held-out chars; "
            f"{info.device} {info.precision}"
            + (f" x {info.world_size} processes" if info.world_size > 1 else "")
            + f"; output {info.out_dir}/"
        )
        if self.tty:
            # A pseudo-terminal may report 0 columns (script, some CI consoles): tqdm would then
            # draw an empty bar, so fall back to a fixed width there.
            wide = _columns(self.stream) > 0
            self.bar = self._new_bar(total=info.total_steps, initial=info.step, file=self.stream,
                            unit="step", dynamic_ncols=wide, ncols=None if wide else 100,
                            leave=True)

    def on_plan(self, total_steps: int) -> None:
        if self.bar is not None and self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def on_step(self, stats: StepStats) -> None:
        # Exponential smoothing: per-batch loss is noisy, the trend is what matters.
        self.smooth = stats.bpc if self.smooth is None else 0.95 * self.smooth + 0.05 * stats.bpc
        if self.bar is None:
            return
        post = {"bpc": f"{self.smooth:.3f}"}
        if self.val is not None:
            post["val"] = f"{self.val:.3f}"
        post["chars/s"] = f"{stats.chars_per_s:,.0f}"
        post["lr"] = f"{stats.lr:.2e}"
        if stats.time_cap is not None:
            post["left"] = f"{max(0.0, stats.time_cap - stats.elapsed):.0f}s"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(stats.step - self.bar.n)

    def on_eval(self, record: EvalRecord, previews: list[tuple[float, str]]) -> None:
        self.val = record.val_bpc
        self._print(
            f"step {record.step:,}: train {record.train_bpc:.3f} bpc, val {record.val_bpc:.3f} bpc, "
            f"lr {record.lr:.2e}, {record.chars:,} chars, {record.elapsed:.0f}s"
        )
        for t, text in previews:
            self._print(f"  --- sample at temperature {t:g} ---\n  " + text.replace("\n", "\n  "))

    def close(self) -> None:
        self._end_corpus_bar()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, result: TrainResult) -> None:
        if self.quiet:
            return
        best = "-" if result.best_val_bpc is None else f"{result.best_val_bpc:.4f}"
        state = ("stopped early (held-out bpc had stopped improving: --patience)" if result.stopped_early
                 else "finished" if result.finished else "paused (time budget reached)")
        out = result.out_dir
        lines = [
            f"charlm: {state} at step {result.step:,}"
            + (f" of {result.total_steps:,}" if result.total_steps else "")
            + f"; {result.chars_seen:,} chars seen in {result.elapsed:.0f}s of training; "
            f"best val bpc {best}",
        ]
        if result.seconds:
            lines.append("charlm: " + spent(result.seconds))
        lines.append(f"charlm: checkpoints in {out}/ (latest.pt, best.pt)")
        lines.append(f"  sample:  charlm sample --checkpoint {shlex.quote(str(result.best))} --temperature 0.5")
        latest = shlex.quote(str(result.latest))
        if result.finished:
            lines.append(f"  train on: charlm resume {latest} --max-steps {result.step * 2}")
        else:
            lines.append(f"  resume:  charlm resume {latest}")
        if result.report is not None:
            card = f" (and its card, {result.card.name})" if result.card is not None else ""
            lines.append(f"charlm: the run's report: {result.report}{card}")
        if result.plot is not None:
            lines.append(f"charlm: loss curves in {result.plot}")
        else:
            lines.append(f"  plot:    charlm plot {shlex.quote(str(out))}   (pip install 'charlm[plot]')")
        for line in lines:
            print(line, file=self.stream, flush=True)


def spent(seconds: dict[str, float]) -> str:
    """How a session's seconds were spent, for its closing lines."""
    total = seconds["total"]
    share = f" ({100 * seconds['training'] / total:.0f} %)" if total > 0 else ""
    parts = [f"{seconds['training']:.0f}s training{share}", f"{seconds['evaluation']:.0f}s evaluating",
             f"{seconds['saving']:.0f}s saving"]
    if seconds["planning"]:
        parts.append(f"{seconds['planning']:.0f}s measuring this machine for the planner")
    return f"{total:.0f}s in this session: " + ", ".join(parts)
