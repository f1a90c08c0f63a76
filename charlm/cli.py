"""Command-line interface: parses options, calls the library, prints, chooses exit codes.

This is the only module that prints or picks exit codes. It imports PyTorch lazily (inside
commands), so `charlm --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm import __version__
from charlm.config import ModelConfig, SessionConfig, TrainConfig
from charlm.errors import CharLMError, CharLMWarning, PeerFailed, TrainingInterrupted
from charlm.events import Callbacks, TrainResult
from charlm.sample_options import SampleOptions, parse_temperatures

app = typer.Typer(
    name="charlm",
    help="Character-level LSTM/GRU/RNN text generator: train on any text, resume, sample.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_OUT = Path("checkpoints")


def _rank() -> int:
    """torchrun's RANK for this process (0 when it runs alone)."""
    import os

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
    import os

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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Character-level LSTM/GRU/RNN text generator."""


def derived_options(*classes: type, skip: tuple[str, ...] = (), unset: bool = True
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per declared field of `classes` (`charlm.options.opt`): its
    flag, type, help and short alias come from the field, so each option is written once.
    The command receives them as keyword arguments (`**settings`). With `unset`, an option
    not given on the command line is None (a --config file or the built-in default decides)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        from charlm.options import declared, flag

        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        added = []
        for cls in classes:
            for f, kind in declared(cls):
                if f.name in skip:
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


# --- train / resume ---------------------------------------------------------------------------

CorpusArg = Annotated[Optional[list[str]], typer.Argument(
    help="Files, folders (their *.txt), globs, or nltk:NAME[/FILEID]. Default: nltk:state_union.",
    show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
NoPreview = Annotated[bool, typer.Option("--no-preview", help="No live samples at evaluations.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")]
EncodingOpt = Annotated[Optional[str], typer.Option(
    "--encoding", help="Text encoding of files (default: strict UTF-8).")]


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
    no_preview: NoPreview = False,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """Train a new model on CORPUS (default: nltk:state_union)."""
    from charlm.config import build_config
    from charlm.session import fit

    if no_preview:
        settings["preview_length"] = 0
    cfg = build_config(config, settings)
    _with_progress(quiet, lambda callbacks, stop: fit(
        cfg, corpus, out, encoding=encoding, force=force, callbacks=callbacks, pending_signal=stop))


def _with_progress(quiet: bool, run: Callable[[Callbacks, StopFlag], TrainResult]) -> None:
    """Run a training session with the progress reporter and Ctrl-C/SIGTERM handling, then
    print the summary (and draw the loss plot when matplotlib is installed; it is optional)."""
    import importlib.util

    from charlm.events import Fanout
    from charlm.report import Reporter

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
    if importlib.util.find_spec("matplotlib") is not None and (result.out_dir / "metrics.jsonl").exists():
        from charlm.plot import plot_run

        result.plot = plot_run(result.out_dir)
    reporter.summary(result)


@app.command()
@handle_errors
@derived_options(SessionConfig)
def resume(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to continue (its folder is the run's folder).")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="A preset to check against the run (only [session] settings may differ).")] = None,
    no_preview: NoPreview = False,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """Continue a run exactly where its checkpoint stopped (same schedule, data, RNG)."""
    from charlm.config import load_toml
    from charlm.session import resume as resume_run

    if no_preview:
        settings["preview_length"] = 0
    config_data = load_toml(config) if config is not None else None
    _with_progress(quiet, lambda callbacks, stop: resume_run(
        checkpoint, settings, config_file=config_data, callbacks=callbacks, pending_signal=stop))


# --- sample -----------------------------------------------------------------------------------


def default_checkpoint() -> Path:
    for name in ("best.pt", "latest.pt"):
        if (DEFAULT_OUT / name).exists():
            return DEFAULT_OUT / name
    raise CharLMError(f"no checkpoint given and none in {DEFAULT_OUT}/ (train one with `charlm train`, "
                      "or pass --checkpoint FILE)")


@app.command()
@handle_errors
@derived_options(SampleOptions, skip=("temperature",), unset=False)
def sample(
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", "-c", help="Checkpoint (default: checkpoints/best.pt, else latest.pt).")] = None,
    # Not derived from SampleOptions.temperature: the command takes a comma list.
    temperature: Annotated[str, typer.Option(
        "--temperature", "-t", help="Sampling temperature; 0 = greedy; a comma list gives one sample each.")] = "1.0",
    prime_file: Annotated[Optional[Path], typer.Option("--prime-file", help="Read the prime from a file.")] = None,
    echo: Annotated[bool, typer.Option("--echo/--no-echo", help="Print the prime before the continuation.")] = True,
    device: DeviceOpt = "cpu",
    novelty: Annotated[bool, typer.Option(
        "--novelty", help="Then report how much of the text is copied from the training text (on stderr).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (prime, samples, and the --novelty report) instead of streaming text.")
    ] = False,
    **options: Any,
) -> None:
    """Generate text from a checkpoint, streamed to stdout as it is produced."""
    import io

    from charlm.api import load

    temps = parse_temperatures(temperature)
    if prime_file is not None:
        try:
            options["prime"] = prime_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CharLMError(f"--prime-file {prime_file}: cannot read: {exc}") from None
    opts = SampleOptions(**options).check()
    model = load(checkpoint or default_checkpoint(), device=device)
    # The index first: a missing or changed training text is reported before sampling.
    index = _novelty_index(model) if novelty else None
    ids = model.sampler.prime_ids(opts.prime, opts.unknown)
    if opts.unknown == "skip" and len(ids) < len(opts.prime):
        err(f"charlm: warning: dropped prime characters not in the vocabulary: "
            f"{' '.join(repr(c) for c in model.vocab.unknown(opts.prime))}")
    shown_prime = model.vocab.decode(ids) if echo else ""
    out = io.StringIO() if as_json else sys.stdout
    samples: list[tuple[float, str]] = []
    for t in temps:
        if len(temps) > 1:
            out.write(f"=== temperature {t:g} ===\n")
        texts = _write_samples(out, model.stream_batch(replace(opts, temperature=t)), opts.num_samples, shown_prime)
        samples.extend((t, text) for text in texts)
    out.flush()
    _sample_report(index, shown_prime, samples, as_json)


def _write_samples(out: Any, steps: Any, n: int, prime: str) -> list[str]:
    """Stream sample 1 live; later samples of the batch are printed after it, labelled.
    Returns the generated text of each sample (prime excluded)."""
    rows: list[list[str]] = [[] for _ in range(n)]
    if n > 1:
        out.write(f"--- sample 1/{n} ---\n")
    out.write(prime)
    out.flush()
    for chars in steps:
        if chars[0]:
            out.write(chars[0])
            out.flush()
        for row in range(n):
            rows[row].append(chars[row])
    out.write("\n")
    for row, parts in enumerate(rows[1:], start=2):
        out.write(f"--- sample {row}/{n} ---\n{prime}{''.join(parts)}\n")
    out.flush()
    return ["".join(parts) for parts in rows]


# --- novelty ----------------------------------------------------------------------------------


def _novelty_index(model: Any) -> Any:
    """The training text's index, saying so on stderr when it has to be built (once)."""
    from charlm.novelty import training_index

    return training_index(model, on_build=lambda: err(
        "charlm: indexing the training text for the novelty report; later runs skip this"))


def _sample_report(index: Any, prime: str, samples: list[tuple[float, str]], as_json: bool) -> None:
    """After `charlm sample`: the novelty report on stderr, or everything as one JSON object."""
    from charlm.novelty import format_report, novelty_report

    report = novelty_report(index, [text for _, text in samples]) if index is not None else None
    if as_json:
        data: dict[str, Any] = {"prime": prime, "samples": [{"temperature": t, "text": text} for t, text in samples]}
        if report is not None:
            data["novelty"] = report
        print(json.dumps(data, ensure_ascii=False))
    elif report is not None:
        err(format_report(report))


@app.command("novelty")
@handle_errors
def novelty_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint whose training text to compare with.")],
    file: Annotated[Path, typer.Argument(help="UTF-8 text file to check (e.g. saved samples).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How much of FILE is copied verbatim from the checkpoint's training text."""
    from charlm.api import load
    from charlm.novelty import format_report, novelty_report, read_text_file

    text = read_text_file(file)
    report = novelty_report(_novelty_index(load(checkpoint)), [text])
    print(json.dumps(report, ensure_ascii=False) if as_json else format_report(report))


# --- eval / info / plot -----------------------------------------------------------------------


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to evaluate.")],
    corpus: Annotated[Optional[list[str]], typer.Argument(
        help="Text to score (default: the run's own held-out part).", show_default=False)] = None,
    encoding: EncodingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "cpu",
    by_char: Annotated[bool, typer.Option("--by-char", help="Print JSON with every character's bits: the text read as one sequence from a fresh state, as `charlm inspect` reads it (default text: the passage inspect shows).")] = False,
) -> None:
    """Bits per character of a checkpoint on held-out text."""
    from charlm.api import load

    if by_char:
        from charlm.inspect import by_char as per_char
        from charlm.inspect import load_text

        lm = load(checkpoint, device=device)
        result = per_char(lm, *load_text(lm, corpus, None, encoding))
        if result["skipped_chars"]:
            err(f"charlm: warning: {result['skipped_chars']} characters not in the vocabulary were "
                "left out of the score")
        print(json.dumps(result, ensure_ascii=False))
        return
    result = load(checkpoint, device=device).evaluate(corpus, encoding)
    if result["skipped_chars"]:
        err(f"charlm: warning: {result['skipped_chars']} characters not in the vocabulary were "
            "left out of the score")
    if as_json:
        print(json.dumps(result))
        return
    rows = [("bpc", f"{result['bpc']:.4f}"), ("chars scored", f"{result['chars']:,}"),
            ("chars skipped", f"{result['skipped_chars']:,}"), ("corpus", ", ".join(result["corpus"])),
            ("checkpoint", f"{result['checkpoint']} (step {result['step']:,})")]
    print(_table(rows))


@app.command()
@handle_errors
def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What a checkpoint holds: config, vocabulary, parameters, progress, corpus."""
    from charlm.api import load

    data = load(checkpoint).info()
    if as_json:
        print(json.dumps(data))
        return
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    c = data["corpus"]
    rows = [("checkpoint", data["checkpoint"]), ("step", f"{fmt(data['step'])} / {fmt(data['total_steps'])}"),
            ("chars seen", fmt(data["chars_seen"])), ("training time", f"{data['elapsed_s']:.0f} s"),
            ("best val bpc", fmt(data["best_val_bpc"])), ("last val bpc", fmt(data["last_val_bpc"])),
            ("parameters", fmt(data["parameters"])), ("vocabulary", f"{data['vocab_size']} characters"),
            ("trained on", f"{data['device_trained']} ({data['precision']})"
             + (f" x {data['processes']} processes" if data["processes"] > 1 else "")),
            ("corpus", f"{', '.join(c['sources'] or [])}: {fmt(c['documents'])} documents, {fmt(c['chars'])} chars"),
            ("corpus sha256", str(c["sha256"]))]
    for section, values in data["config"].items():
        rows.extend((f"{section}.{k}", str(v)) for k, v in values.items())
    print(_table(rows))


@app.command()
@handle_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run folder holding metrics.jsonl.")] = DEFAULT_OUT,
) -> None:
    """Write RUN_DIR/loss.png: train and val bpc against characters seen (needs matplotlib)."""
    from charlm.plot import plot_run

    path = plot_run(run_dir)
    print(path)


@app.command("inspect")
@handle_errors
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to look inside.")],
    text_file: Annotated[Optional[Path], typer.Argument(help="Text to read (default: a stretch of the run's own held-out text).", show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Read this text instead of a file.")] = None,
    html: Annotated[Path, typer.Option("--html", help="The page to write: one self-contained HTML file.")] = Path("inspect.html"),
    npz: Annotated[Optional[Path], typer.Option("--npz", help="Also write the per-character states, probabilities and characters (numpy .npz).")] = None,
    max_chars: Annotated[int, typer.Option("--max-chars", help="Read at most this many characters of the text.")] = 5000,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Open the page on this layer's unit (0 = first layer).")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="... of this kind: h, c, i, f, g, o (LSTM); h, r, z, n (GRU); h (RNN).")] = None,
    unit: Annotated[Optional[int], typer.Option("--unit", help="... and this unit number (0 = first).")] = None,
    levels: Annotated[int, typer.Option("--levels", help="Activation values kept per unit on the page (2-256; more is sharper and bigger).")] = 16,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of TEXT_FILE (default: strict UTF-8).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "cpu",
) -> None:
    """Write an HTML page showing the model's surprisal, predictions and units on a text."""
    from charlm.api import load
    from charlm.inspect import check_options, inspect_text, load_text, write_npz
    from charlm.inspect_page import write_page

    lm = load(checkpoint, device=device)
    initial = check_options(lm.model.cfg, layer, kind, unit, levels, max_chars)
    ins = inspect_text(lm, *load_text(lm, [str(text_file)] if text_file else None, text, encoding), max_chars=max_chars)
    if ins.meta["chars_total"] > max_chars:
        err(f"charlm: read the first {max_chars:,} of {ins.meta['chars_total']:,} characters (--max-chars)")
    if ins.scores.skipped:
        err(f"charlm: warning: {ins.scores.skipped} characters not in the vocabulary are shown unscored")
    print(write_page(html, ins, levels, initial))
    if npz is not None:
        print(write_npz(npz, ins))


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
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `charlm`: show the help
            err(exc.format_message())
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "charlm"
        err(f"{where}: error: {exc.format_message()} (see {where} --help)")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
