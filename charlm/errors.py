"""The one exception family the library raises; only the CLI turns it into exit codes. And
the one refusal of a feature whose optional extra is not installed (`require_extra`)."""

from __future__ import annotations

import importlib.util


class CharLMError(Exception):
    """Bad input or an unusable file: the CLI prints the message on one line and exits 2."""


class CharLMWarning(UserWarning):
    """Something the user should know that does not stop the command (issued with
    `warnings.warn`; the CLI prints it as one `charlm: warning:` line)."""


class PeerFailed(CharLMError):
    """Another torchrun process stopped on a `CharLMError` (and printed it); this one stops
    too, with exit code 2 and no message of its own, so the user reads the error once."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"process {rank} stopped: {message}")
        self.rank = rank


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`; the CLI exits 128 + signum."""

    def __init__(self, signum: int, checkpoint: str, step: int) -> None:
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step


class WriteFailed(CharLMError):
    """A file of the run (or the corpus cache) could not be written, a full disk most often;
    the message says what, how much space it needs and what was kept. Exit code 2."""

    def __init__(self, message: str, path: str, written: list[str] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.written = written or []  # files of the same save written before this one failed


class Diverged(Exception):
    """Training diverged (a non-finite or exploding loss; see `charlm.training.divergence`); the step
    was not applied and nothing broken was saved. The CLI prints the message and exits 3."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def installed(package: str) -> bool:
    """Whether `package` can be found for import (not one set to None in sys.modules, or broken)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require_extra(what: str, extra: str, *packages: str, hint: str = "") -> None:
    """Refuse `what` (a command or flag) with one line when any of `packages` is missing: which
    ones, and the pip command that installs the optional extra `extra` (then `hint`)."""
    missing = [p for p in packages if not installed(p)]
    if missing:
        raise CharLMError(f"{what} needs {' and '.join(missing)}: pip install 'charlm[{extra}]'{hint}")
