"""`charlm train` and `charlm resume`: a training session with the progress reporter, and
Ctrl-C / SIGTERM turned into a saved checkpoint."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm.cli.app import (
    DEFAULT_OUT,
    CheckpointArg,
    CorpusArg,
    EncodingOpt,
    NoPreview,
    QuietOpt,
    _rank,
    app,
    derived_options,
    err,
    handle_errors,
)
from charlm.config.run import ModelConfig, SessionConfig, TrainConfig
from charlm.errors import CharLMError, installed
from charlm.training.events import Callbacks, TrainResult


class StopFlag(Callbacks):
    """SIGINT / SIGTERM handlers that only record the signal: training finishes its step,
    saves, and exits; a second Ctrl-C while saving changes nothing. Installed when training
    starts (before that, Ctrl-C just interrupts: there is nothing to save)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._old: dict[int, Any] = {}

    def on_start(self, info: Any) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum = signum
            if self.announce:
                err(f"\ncharlm: {signal.Signals(signum).name}: finishing the step and saving...")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def __call__(self) -> int:
        return self.signum


@app.command()
@handle_errors
@derived_options(ModelConfig, TrainConfig, SessionConfig)
def train(
    corpus: CorpusArg = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML preset ([model], [train], [session] tables); flags override it.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for checkpoints and metrics.")] = DEFAULT_OUT,
    encoding: EncodingOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a run.")] = False,
    plan: Annotated[bool, typer.Option(
        "--plan", "--dry-run",
        help="Print the plan (model and recipe for this corpus, budget and machine) and exit.")] = False,
    planner: Annotated[bool, typer.Option(
        "--planner/--no-planner", help="Let the planner choose every setting you do not set "
        "(--no-planner: the built-in defaults).")] = True,
    no_preview: NoPreview = False,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """Train a new model on CORPUS (default: nltk:state_union)."""
    from charlm.config.run import Choices
    from charlm.training.session import dry_plan, fit

    if no_preview:
        settings["preview_length"] = 0
    choices = Choices.read(config, settings)
    if plan:
        if not planner:
            raise CharLMError("--plan: nothing to plan with --no-planner")
        _, chosen = dry_plan(choices.config(), corpus, choices.keys, encoding=encoding)
        print(chosen.summary())
        for line in chosen.why:
            print(f"  {line}")
        for key in sorted(chosen.settings):
            print(f"  --{key.replace('_', '-')} {chosen.settings[key]}")
        return
    _with_progress(quiet, lambda callbacks, stop: fit(
        choices.config(), corpus, out, encoding=encoding, force=force, callbacks=callbacks, pending_signal=stop,
        explicit=choices.keys, planner=planner))


def _with_progress(quiet: bool, run: Callable[[Callbacks, StopFlag], TrainResult]) -> None:
    """Run a training session with the progress reporter and Ctrl-C/SIGTERM handling, then
    print the summary, after the plot and the report (`explain_run`)."""
    from charlm.cli.progress import Reporter
    from charlm.training.events import Fanout

    # Under torchrun rank 0 alone shows progress; every rank still stops cleanly on a signal.
    main = _rank() == 0
    reporter, stop = Reporter(quiet=quiet or not main), StopFlag(announce=main)
    try:
        result = run(Fanout(stop, reporter), stop)
    finally:
        stop.restore()
        reporter.close()
    if not main:
        return
    explain_run(result, lambda text: err(f"charlm: warning: {text}"))
    reporter.summary(result)


def explain_run(result: TrainResult, warn: Callable[[str], None]) -> None:
    """After a session: draw the loss plot (when matplotlib is installed; it is optional) and
    write the run's report page and card (`charlm.analysis.report`) into its folder. Both are
    conveniences made from the saved run, so a failure only warns (`charlm report` and
    `charlm plot` remake them)."""
    if not result.metrics:  # no evaluation yet: nothing to draw or report
        return
    if installed("matplotlib"):
        from charlm.analysis.plot import plot_run

        try:
            result.plot = plot_run(result.out_dir)
        except Exception as exc:
            warn(f"could not draw the loss plot: {exc}")
    from charlm.analysis.report import write_report

    try:
        files = write_report(result.out_dir)
    except Exception as exc:
        warn(f"could not write the run's report: {exc} (try: charlm report {result.out_dir})")
        return
    result.report, result.card = files.page, files.card


@app.command()
@handle_errors
@derived_options(SessionConfig)
def resume(
    checkpoint: CheckpointArg,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="A preset to check against the run (only [session] settings may differ).")] = None,
    no_preview: NoPreview = False,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """Continue a run exactly where CHECKPOINT stopped (same schedule, data, RNG), in its folder."""
    from charlm.config.run import load_toml
    from charlm.training.session import resume as resume_run

    if no_preview:
        settings["preview_length"] = 0
    config_data = load_toml(config) if config is not None else None
    _with_progress(quiet, lambda callbacks, stop: resume_run(
        checkpoint, settings, config_file=config_data, callbacks=callbacks, pending_signal=stop))


