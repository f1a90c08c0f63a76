"""Command-line interface: parses options, calls one library function, prints, picks the
exit code. This package is the only place that prints or picks exit codes.

    app.py         the Typer app, errors -> one line + exit code, derived options, main()
    training.py    train, resume
    generation.py  sample, novelty, chat
    reading.py     eval, info, plot, report, inspect
    serving.py     serve, export
    progress.py    the training progress display (a tqdm bar, evaluations, previews, summary)
    chat.py        the interactive session behind `charlm chat`
    notebook.py    `charlm.fit` / `charlm.resume` for Python callers: progress by tqdm.auto

Imports: any group of the library, always inside the commands for the ones that load PyTorch,
so `charlm --help` does not.
"""

from __future__ import annotations

from charlm.cli import generation, reading, serving, training  # noqa: F401  (each registers its commands)
from charlm.cli.app import app, err, handle_errors, main

__all__ = ["app", "err", "handle_errors", "main"]
