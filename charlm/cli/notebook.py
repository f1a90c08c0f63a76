"""`charlm.fit` and `charlm.resume` for Python callers (a notebook, a script): the library's
training sessions with what `charlm train` shows around them.

Progress is drawn by `tqdm.auto`'s bar: a widget in Jupyter, a bar in a terminal, plain lines
in a log, nothing with `quiet=True`. Interrupting the kernel (or Ctrl-C) finishes the step,
saves `latest.pt` and raises `charlm.errors.TrainingInterrupted`, as the command does. After
the session come the loss plot and the run's report (`report.html`, `README.md`). Both return
the session's `TrainResult`: the run's metrics (`result.metrics`) and its paths
(`out_dir`, `best`, `latest`, `report`, `plot`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charlm.config.run import RunConfig
from charlm.errors import CharLMWarning
from charlm.training.events import Callbacks, Fanout, TrainResult


def fit(cfg: RunConfig, specs: list[str] | None = None, out_dir: Path | str = "checkpoints", *,
        quiet: bool = False, callbacks: Callbacks | None = None, **options: Any) -> TrainResult:
    """Train a new model on CORPUS `specs` (None: nltk:state_union) into `out_dir`, showing
    progress; `options` are those of `charlm.training.session.fit` (encoding, force,
    explicit, planner, ...), and `callbacks` see the session too."""
    from charlm.training.session import fit as fit_session

    return _shown(quiet, callbacks, lambda cb, stop: fit_session(
        cfg, specs, out_dir, callbacks=cb, pending_signal=stop, **options))


def resume(path: Path | str, changes: dict[str, Any] | None = None, *, quiet: bool = False,
           callbacks: Callbacks | None = None, **options: Any) -> TrainResult:
    """Continue the run that wrote checkpoint `path`, showing progress; `changes` and
    `options` are those of `charlm.training.session.resume`."""
    from charlm.training.session import resume as resume_session

    return _shown(quiet, callbacks, lambda cb, stop: resume_session(
        path, changes, callbacks=cb, pending_signal=stop, **options))


def _shown(quiet: bool, callbacks: Callbacks | None,
           run: Callable[[Callbacks, Callable[[], int]], TrainResult]) -> TrainResult:
    import tqdm.asyncio
    import tqdm.auto

    from charlm.cli.progress import Reporter
    from charlm.cli.training import StopFlag, explain_run

    # tqdm.auto's bar is the terminal's (tqdm.asyncio's) unless a notebook kernel runs: its
    # widget draws without a terminal; the terminal's only on one (else plain lines, as the CLI).
    widget = tqdm.auto.tqdm if tqdm.auto.tqdm is not tqdm.asyncio.tqdm else None
    reporter = Reporter(quiet=quiet, bar=widget)
    stop = StopFlag(announce=not quiet)
    # Signal handlers can only be set from the main thread (a notebook's cells run there).
    inner = [stop] if threading.current_thread() is threading.main_thread() else []
    targets = [*inner, reporter, *([callbacks] if callbacks is not None else [])]
    try:
        result = run(Fanout(*targets), stop)
    finally:
        stop.restore()
        reporter.close()
    explain_run(result, lambda text: warnings.warn(text, CharLMWarning, stacklevel=3))
    reporter.summary(result)
    return result
