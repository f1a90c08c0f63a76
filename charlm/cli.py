"""Command-line interface: parses options, calls the library, prints, chooses exit codes.

This is the only module that prints or picks exit codes. It imports PyTorch lazily (inside
commands), so `charlm --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from charlm import __version__
from charlm.errors import CharLMError, PeerFailed, TrainingInterrupted

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


class StopFlag:
    """SIGINT / SIGTERM handlers that only record the signal: training finishes its step,
    saves, and exits; a second Ctrl-C while saving changes nothing."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._old: dict[int, Any] = {}

    def install(self) -> None:
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
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps to train (the schedule's length).")]
TimeOpt = Annotated[Optional[str], typer.Option("--time", help="Time budget: 300, 300s, 5m, 1h30m.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | mps (auto: CUDA, then MPS, then CPU).")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16 where it is fast).")]
EvalOpt = Annotated[Optional[int], typer.Option("--eval-interval", help="Steps between evaluations and checkpoints.")]
KeepOpt = Annotated[Optional[int], typer.Option("--keep", help="Step-numbered checkpoints to keep (besides latest and best).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
PreviewLen = Annotated[Optional[int], typer.Option("--preview-length", help="Characters per live sample at each evaluation.")]
NoPreview = Annotated[bool, typer.Option("--no-preview", help="No live samples at evaluations.")]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Use torch.compile.", show_default=False)]


@app.command()
@handle_errors
def train(
    corpus: CorpusArg = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML preset ([model] and [train] tables); flags override it.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for checkpoints and metrics.")] = DEFAULT_OUT,
    max_steps: MaxSteps = None,
    time: TimeOpt = None,
    device: DeviceOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (same seed, same run).")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of files (default: strict UTF-8).")] = None,
    cell: Annotated[Optional[str], typer.Option("--cell", help="lstm | gru | rnn")] = None,
    num_layers: Annotated[Optional[int], typer.Option("--num-layers", help="Recurrent layers.")] = None,
    hidden_size: Annotated[Optional[int], typer.Option("--hidden-size", help="Units per recurrent layer.")] = None,
    embedding_size: Annotated[Optional[int], typer.Option("--embedding-size", help="Character embedding size.")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="Dropout between layers and before the head.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Characters per truncated-BPTT window.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Parallel streams per batch.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (AdamW).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="Linear warmup steps before cosine decay.")] = None,
    eval_interval: EvalOpt = None,
    eval_chars: Annotated[Optional[int], typer.Option("--eval-chars", help="Held-out characters scored per evaluation, spread over the held-out text (0 = all).")] = None,
    keep: KeepOpt = None,
    precision: PrecisionOpt = None,
    compile: CompileOpt = None,
    preview_length: PreviewLen = None,
    no_preview: NoPreview = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a run.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a new model on CORPUS (default: nltk:state_union)."""
    from charlm.config import build_config
    from charlm.train import start

    flags = dict(max_steps=max_steps, time=time, device=device, seed=seed, cell=cell,
                 num_layers=num_layers, hidden_size=hidden_size, embedding_size=embedding_size,
                 dropout=dropout, seq_len=seq_len, batch_size=batch_size, lr=lr,
                 weight_decay=weight_decay, warmup_steps=warmup_steps, eval_interval=eval_interval,
                 eval_chars=eval_chars, keep=keep, precision=precision, compile=compile,
                 preview_length=0 if no_preview else preview_length)
    cfg = build_config(config, flags)
    _with_progress(quiet, lambda callbacks, stop: start(
        cfg, corpus, out, encoding=encoding, force=force, callbacks=callbacks, should_stop=stop))


def _with_progress(quiet: bool, run: Callable[[Any, StopFlag], Any]) -> None:
    """Run a training session with the progress reporter and Ctrl-C/SIGTERM handling, then
    print the summary (and draw the loss plot when matplotlib is installed; it is optional)."""
    import importlib.util

    from charlm.progress import Reporter

    # Under torchrun rank 0 alone shows progress; every rank still stops cleanly on a signal.
    main = _rank() == 0
    reporter, stop = Reporter(quiet=quiet or not main), StopFlag(announce=main)
    reporter.stop = stop  # installed when training starts: Ctrl-C before that just exits
    try:
        result = run(reporter, stop)
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
def resume(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to continue (its folder is the run's folder).")],
    max_steps: MaxSteps = None,
    time: TimeOpt = None,
    device: DeviceOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A preset to check against the run (only budgets may differ).")] = None,
    eval_interval: EvalOpt = None,
    keep: KeepOpt = None,
    precision: PrecisionOpt = None,
    compile: CompileOpt = None,
    preview_length: PreviewLen = None,
    no_preview: NoPreview = False,
    quiet: QuietOpt = False,
) -> None:
    """Continue a run exactly where its checkpoint stopped (same schedule, data, RNG)."""
    from charlm.config import load_toml
    from charlm.train import resume as resume_run

    overrides = dict(max_steps=max_steps, time=time, device=device, eval_interval=eval_interval,
                     keep=keep, precision=precision, compile=compile,
                     preview_length=0 if no_preview else preview_length)
    config_data = load_toml(config) if config is not None else None
    _with_progress(quiet, lambda callbacks, stop: resume_run(
        checkpoint, overrides, config_file=config_data, callbacks=callbacks, should_stop=stop))


# --- sample -----------------------------------------------------------------------------------


def default_checkpoint() -> Path:
    for name in ("best.pt", "latest.pt"):
        if (DEFAULT_OUT / name).exists():
            return DEFAULT_OUT / name
    raise CharLMError(f"no checkpoint given and none in {DEFAULT_OUT}/ (train one with `charlm train`, "
                      "or pass --checkpoint FILE)")


@app.command()
@handle_errors
def sample(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Checkpoint (default: checkpoints/best.pt, else latest.pt).")] = None,
    temperature: Annotated[str, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy; a comma list gives one sample each.")] = "1.0",
    length: Annotated[int, typer.Option("--length", "-n", help="Characters to generate (prime excluded).")] = 500,
    prime: Annotated[str, typer.Option("--prime", help="Text the model reads first and continues.")] = "",
    prime_file: Annotated[Optional[Path], typer.Option("--prime-file", help="Read the prime from a file.")] = None,
    echo: Annotated[bool, typer.Option("--echo/--no-echo", help="Print the prime before the continuation.")] = True,
    unknown: Annotated[str, typer.Option("--unknown", help="Prime characters outside the vocabulary: error | skip.")] = "error",
    top_k: Annotated[int, typer.Option("--top-k", help="Sample only from the K most likely characters (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: smallest set with probability >= P (1 = off).")] = 1.0,
    stop: Annotated[str, typer.Option("--stop", help="End a sample when this string is generated.")] = "",
    seed: Annotated[Optional[int], typer.Option("--seed", help="Same seed, same text.")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Independent samples, generated as one batch.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "cpu",
) -> None:
    """Generate text from a checkpoint, streamed to stdout as it is produced."""
    from charlm.api import load
    from charlm.sample import SampleOptions, parse_temperatures

    temps = parse_temperatures(temperature)
    if prime_file is not None:
        try:
            prime = prime_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CharLMError(f"--prime-file {prime_file}: cannot read: {exc}") from None
    if num_samples < 1:
        raise CharLMError(f"--num-samples: must be >= 1, got {num_samples}")
    opts = SampleOptions(length, temps[0], top_k, top_p, prime, seed, stop, unknown).check()
    model = load(checkpoint or default_checkpoint(), device=device)
    ids = model.sampler.prime_ids(prime, unknown)
    if unknown == "skip" and len(ids) < len(prime):
        err(f"charlm: warning: dropped prime characters not in the vocabulary: "
            f"{' '.join(repr(c) for c in model.vocab.unknown(prime))}")
    shown_prime = model.vocab.decode(ids) if echo else ""
    out = sys.stdout
    for t in temps:
        if len(temps) > 1:
            out.write(f"=== temperature {t:g} ===\n")
        options = dict(opts.__dict__, temperature=t)
        _write_samples(out, model.stream_batch(num_samples, **options), num_samples, shown_prime)
    out.flush()


def _write_samples(out: Any, steps: Any, n: int, prime: str) -> None:
    """Stream sample 1 live; later samples of the batch are printed after it, labelled."""
    rest: list[list[str]] = [[] for _ in range(n - 1)]
    if n > 1:
        out.write(f"--- sample 1/{n} ---\n")
    out.write(prime)
    out.flush()
    for chars in steps:
        if chars[0]:
            out.write(chars[0])
            out.flush()
        for row in range(1, n):
            rest[row - 1].append(chars[row])
    out.write("\n")
    for row, parts in enumerate(rest, start=2):
        out.write(f"--- sample {row}/{n} ---\n{prime}{''.join(parts)}\n")
    out.flush()


# --- eval / info / plot -----------------------------------------------------------------------


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to evaluate.")],
    corpus: Annotated[Optional[list[str]], typer.Argument(help="Text to score (default: the run's own held-out part).", show_default=False)] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of files.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "cpu",
) -> None:
    """Bits per character of a checkpoint on held-out text."""
    from charlm.api import load

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
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
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


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- chat / export ----------------------------------------------------------------------------


@app.command()
@handle_errors
def chat(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to talk to (loaded once).")],
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Starting temperature (/temperature changes it).")] = 1.0,
    length: Annotated[int, typer.Option("--length", "-n", help="Characters per continuation (/length changes it).")] = 500,
    top_k: Annotated[int, typer.Option("--top-k", help="Starting top-k (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Starting top-p (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed and prime, same text.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "cpu",
) -> None:
    """Interactive session: each line is a prime, its continuation streams back; /help lists
    commands. From a pipe: one continuation per input line on stdout."""
    from charlm.api import load
    from charlm.chat import ChatSession, run
    from charlm.sample import SampleOptions

    session = ChatSession(SampleOptions(length, temperature, top_k, top_p, seed=seed))
    run(load(checkpoint, device=device), session)


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write: the one-step model.")],
    vocab: Annotated[Path | None, typer.Option("--vocab", help="Vocabulary JSON to write (default: ONNX_FILE.vocab.json).")] = None,
) -> None:
    """Write the one-step model (char id and state in, logits and state out) as ONNX, and its
    vocabulary as JSON, for any ONNX runtime (needs `pip install 'charlm[export]'`)."""
    from charlm.export import check_installed, export_onnx, vocab_path

    check_installed()  # before loading: the missing package is the first thing to say
    from charlm.api import load

    meta = export_onnx(load(checkpoint), onnx, vocab)
    err(f"charlm: wrote {onnx} ({meta['cell']} {meta['num_layers']}x{meta['hidden_size']}, "
        f"inputs {meta['input']}, {', '.join(meta['state_inputs'])}) and "
        f"{vocab or vocab_path(onnx)} ({meta['vocab_size']} characters)")


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
