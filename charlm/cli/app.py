"""The Typer app and what every command shares: one error family turned into one line and
an exit code (the only place that does it), warnings as one line, options derived from the
library's declared fields, and the console-script entry point.

Nothing below the CLI prints or picks exit codes. PyTorch is imported lazily inside the
commands, so `charlm --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from charlm import __version__
from charlm.errors import CharLMError, CharLMWarning, Diverged, PeerFailed, TrainingInterrupted

# `--help` lists the commands in the order of the work (the rest follow in the order their
# modules register them), so the first command a newcomer needs is at the top.
WORK_ORDER = ("train", "resume", "sample", "eval", "info", "plot", "report")
# What a bare `charlm` shows under the usage line: the main job, in two commands.
QUICK_START = """Quick start (trains on NLTK's State of the Union for 4 minutes, then samples):

  charlm train --time 4m
  charlm sample --temperature 0.5

Your own text: charlm train notes.txt --time 4m   (a file, a folder, a glob or nltk:NAME)
Every command: charlm --help"""


class _WorkOrder(TyperGroup):
    """Typer's command group, listing `WORK_ORDER` first."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: WORK_ORDER.index(n) if n in WORK_ORDER else len(WORK_ORDER))


app = typer.Typer(
    name="charlm",
    cls=_WorkOrder,
    help="Character-level LSTM/GRU/RNN text generator: train on any text, resume, sample.",
    invoke_without_command=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_OUT = Path("checkpoints")
DIVERGED_EXIT = 3  # training diverged (`charlm.errors.Diverged`); 2 is bad input, 1 a bug


def _rank() -> int:
    """torchrun's RANK for this process (0 when it runs alone)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def err(text: str) -> None:
    """One line on stderr (naming the process when torchrun started several)."""
    rank = _rank()
    if rank and text.startswith("charlm:"):
        text = f"charlm[rank {rank}]:" + text[len("charlm:"):]
    print(text, file=sys.stderr, flush=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library exceptions into one stderr line and an exit code (the only such place)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CharLMWarning)
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except PeerFailed:
            raise typer.Exit(2) from None  # the process that failed printed the error
        except CharLMError as exc:
            err(f"charlm: error: {exc}")
            raise typer.Exit(2) from None
        except Diverged as exc:
            if _rank() == 0:  # every process stops at the same step; one of them says so
                err(f"charlm: error: {exc}")
            raise typer.Exit(DIVERGED_EXIT) from None
        except TrainingInterrupted as exc:
            if _rank() == 0:  # one report for all processes: rank 0 saved the checkpoint
                name = signal.Signals(exc.signum).name
                err(f"charlm: {name} at step {exc.step}: saved {exc.checkpoint}")
                err(f"charlm: continue with: charlm resume {exc.checkpoint}")
            raise typer.Exit(128 + exc.signum) from None
        except KeyboardInterrupt:
            if _rank() == 0:  # Ctrl-C reaches every torchrun process: one of them says so
                err("charlm: interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `charlm sample | head`: the reader is gone; stop quietly.
            _silence_stdout()
            raise typer.Exit(0) from None

    return wrapper


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A library warning as one line (rank 0 alone under torchrun: every rank sees the same)."""
    if _rank() == 0:
        err(f"charlm: warning: {message}")


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _version(value: bool) -> None:
    if value:
        print(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Character-level LSTM/GRU/RNN text generator."""
    if ctx.invoked_subcommand is None:  # a bare `charlm`: the usage line and the quick start
        print(ctx.get_usage() + "\n\n" + QUICK_START)


def derived_options(*classes: type, skip: tuple[str, ...] = (), only: tuple[str, ...] = (), unset: bool = True
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per declared field of `classes` (`charlm.config.options.opt`): its
    flag, type, help and short alias come from the field, so each option is written once.
    The command receives them as keyword arguments (`**settings`); `skip` leaves fields out,
    `only` keeps just those. With `unset`, an option not given on the command line is None
    (a --config file or the built-in default decides)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        from charlm.config.options import declared, flag

        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        added = []
        for cls in classes:
            for f, kind in declared(cls):
                if f.name in skip or (only and f.name not in only):
                    continue
                names = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"] if kind is bool else [flag(f.name)]
                names += [f.metadata["short"]] if f.metadata["short"] else []
                shown = unset and f.default not in ("", None)  # else Typer shows it, or there is none
                text = f.metadata["help"] + (f" [default: {f.default}]" if shown else "")
                option = typer.Option(*names, help=text, show_default=not unset)
                added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                               default=None if unset else f.default,
                                               annotation=Annotated[Optional[kind], option]))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        params = own + added
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


CorpusArg = Annotated[Optional[list[str]], typer.Argument(
    help="Files, folders (their *.txt), globs, or nltk:NAME[/FILEID]. Default: nltk:state_union.",
    show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
NoPreview = Annotated[bool, typer.Option("--no-preview", help="No live samples at evaluations.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")]
EncodingOpt = Annotated[Optional[str], typer.Option(
    "--encoding", help="Text encoding of files (default: strict UTF-8).")]


CheckpointArg = Annotated[Path, typer.Argument(help="A checkpoint file (a run folder's best.pt or latest.pt).",
                                               show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    """Console-script entry point: usage errors become one line on stderr and exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err("charlm: interrupted")
        sys.exit(130)
    except Exception as exc:
        # Click's usage errors (vendored inside newer Typer, so matched by interface).
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group command: show its help
            err(exc.format_message())
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "charlm"
        err(f"{where}: error: {exc.format_message()} (see {where} --help)")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
