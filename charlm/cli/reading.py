"""`charlm eval`, `info`, `plot`, `report` and `inspect`: what a checkpoint or run holds and how it reads text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm.cli.app import DEFAULT_OUT, CheckpointArg, DeviceOpt, EncodingOpt, JsonOpt, _table, app, err, handle_errors
from charlm.errors import CharLMError


def warn_skipped(chars: int) -> None:
    """The warning for characters a score left out (not in the model's vocabulary), if any."""
    if chars:
        err(f"charlm: warning: {chars} characters not in the vocabulary were left out of the score")


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: CheckpointArg,
    corpus: Annotated[Optional[list[str]], typer.Argument(
        help="Text to score (default: the run's own held-out part).", show_default=False)] = None,
    encoding: EncodingOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "cpu",
    by_char: Annotated[bool, typer.Option(
        "--by-char", help="Print JSON with every character's bits: the text read as one sequence from a fresh "
        "state, as `charlm inspect` reads it (default text: the passage inspect shows).")] = False,
    dynamic: Annotated[bool, typer.Option(
        "--dynamic", help="Also score with dynamic evaluation: the model keeps learning from the text it "
        "has read, one gradient step per 50 characters (Krause et al. 2018). The text's first quarter "
        "(at most 20,000 characters) tunes the step size and decay; the rest is scored both ways.")] = False,
    dynamic_lr: Annotated[Optional[float], typer.Option(
        "--dynamic-lr", help="With --dynamic: this step size instead of the tuned one.", show_default=False,
        min=0.0)] = None,
    dynamic_decay: Annotated[Optional[float], typer.Option(
        "--dynamic-decay", help="With --dynamic: this pull toward the trained weights instead of the tuned one.",
        show_default=False, min=0.0, max=1.0)] = None,
) -> None:
    """Bits per character of a checkpoint on held-out text."""
    from charlm.api import load

    if (dynamic_lr is not None or dynamic_decay is not None) and not dynamic:
        raise CharLMError("--dynamic-lr and --dynamic-decay go with --dynamic")
    if dynamic:
        if by_char:
            raise CharLMError("--dynamic and --by-char cannot be combined")
        lm = load(checkpoint, device=device)
        scored = lm.evaluate_dynamic(corpus, encoding, lr=dynamic_lr, decay=dynamic_decay)
        warn_skipped(scored["skipped_chars"])
        if as_json:
            print(json.dumps(scored))
            return
        gain = scored["static_bpc"] - scored["dynamic_bpc"]
        print(_table([("static bpc", f"{scored['static_bpc']:.4f}"),
                      ("dynamic bpc", f"{scored['dynamic_bpc']:.4f} ({gain:+.4f} better)" if gain >= 0
                       else f"{scored['dynamic_bpc']:.4f} ({-gain:.4f} worse)"),
                      ("chars scored", f"{scored['chars']:,} (after {scored['tune_chars']:,} that tuned it)"),
                      ("step size, decay", f"{scored['lr']:g}, {scored['decay']:g} per {scored['segment']} chars"),
                      ("time", f"{scored['seconds']:.1f} s"),
                      ("corpus", ", ".join(scored["corpus"])),
                      ("checkpoint", f"{scored['checkpoint']} (step {scored['step']:,})")]))
        return

    if by_char:
        from charlm.analysis.inspection import by_char as per_char
        from charlm.analysis.inspection import load_text

        lm = load(checkpoint, device=device)
        result = per_char(lm, *load_text(lm, corpus, None, encoding))
        warn_skipped(result["skipped_chars"])
        print(json.dumps(result, ensure_ascii=False))
        return
    result = load(checkpoint, device=device).evaluate(corpus, encoding)
    warn_skipped(result["skipped_chars"])
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
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint file (with --verify: a run folder, or a file).", show_default=False)],
    as_json: JsonOpt = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check every checkpoint of the run folder against its checksums: one line each; "
        "exit 2 if any is damaged.")] = False,
) -> None:
    """What a checkpoint holds: config, vocabulary, parameters, progress, corpus."""
    from charlm.api import load

    if verify:
        _verify_all(checkpoint, as_json)
        return
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
            ("machine", data["machine"] or "- (not recorded: written before charlm kept it)"),
            ("checksums", "verified" if data["verified"] else
             f"not verified (format {data['format_version']}: written before checkpoints carried them)"),
            ("corpus", f"{', '.join(c['sources'] or [])}: {fmt(c['documents'])} documents, {fmt(c['chars'])} chars"),
            ("corpus sha256", str(c["sha256"])),
            ("plan", data["plan"] or "- (settings as given)")]
    if data.get("init_from"):
        from charlm.training.finetune import describe

        init = data["init_from"]
        rows += [("initialised from", describe(init)),
                 ("its corpus sha256", str(init["corpus"]["sha256"]))]
    for section, values in data["config"].items():
        rows.extend((f"{section}.{k}", str(v)) for k, v in values.items())
    print(_table(rows))


def _verify_all(target: Path, as_json: bool) -> None:
    """`info --verify`: every checkpoint of a run folder (or one file), one line each."""
    from charlm.storage.checkpoint import verify_files

    results = verify_files(target)
    if as_json:
        print(json.dumps([{"checkpoint": str(p), "ok": ok, "verified": verified, "step": step, "problem": problem}
                          for p, ok, verified, step, problem in results]))
    else:
        for path, ok, verified, step, problem in results:
            state = ("ok" if verified else "ok, not verified (older format)") if ok else "DAMAGED"
            where = f"step {step:,}" if step is not None else "-"
            print(f"{state:<32} {where:<14} {path}" + (f"\n    {problem}" if problem else ""))
    bad = [p for p, ok, *_ in results if not ok]
    if bad:
        raise CharLMError(f"{len(bad)} of {len(results)} checkpoints in {target} are damaged or unreadable: "
                          + ", ".join(p.name for p in bad))


@app.command()
@handle_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run folder holding metrics.jsonl.")] = DEFAULT_OUT,
) -> None:
    """Write RUN_DIR/loss.png: train and val bpc against characters seen (needs matplotlib)."""
    from charlm.analysis.plot import plot_run

    path = plot_run(run_dir)
    print(path)


@app.command()
@handle_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (its checkpoints and metrics.jsonl).")] = DEFAULT_OUT,
    device: DeviceOpt = "cpu",
) -> None:
    """Write RUN_DIR/report.html (curves, plan, scores, samples, next commands: one self-contained
    page) and RUN_DIR/README.md (the same facts in text), from what the folder holds."""
    from charlm.analysis.report import write_report

    files = write_report(run_dir, device=device)
    print(files.page)
    if files.card is not None:
        print(files.card)


@app.command("inspect")
@handle_errors
def inspect_cmd(
    checkpoint: CheckpointArg,
    text_file: Annotated[Optional[Path], typer.Argument(
        help="Text to read (default: a stretch of the run's own held-out text).", show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Read this text instead of a file.")] = None,
    html: Annotated[Path, typer.Option(
        "--html", help="The page to write: one self-contained HTML file.")] = Path("inspect.html"),
    npz: Annotated[Optional[Path], typer.Option(
        "--npz", help="Also write the per-character states, probabilities and characters (numpy .npz).")] = None,
    max_chars: Annotated[int, typer.Option(
        "--max-chars", help="Read at most this many characters of the text.")] = 5000,
    layer: Annotated[Optional[int], typer.Option(
        "--layer", help="Open the page on this layer's unit (0 = first layer).")] = None,
    kind: Annotated[Optional[str], typer.Option(
        "--kind", help="... of this kind: h, c, i, f, g, o (LSTM); h, r, z, n (GRU); h (RNN).")] = None,
    unit: Annotated[Optional[int], typer.Option("--unit", help="... and this unit number (0 = first).")] = None,
    levels: Annotated[int, typer.Option(
        "--levels", help="Activation values kept per unit on the page (2-256; more is sharper and bigger).")] = 16,
    encoding: EncodingOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Write an HTML page showing the model's surprisal, predictions and units on a text."""
    from charlm.analysis.inspect_page import write_page
    from charlm.analysis.inspection import check_options, inspect_text, load_text, write_npz
    from charlm.api import load

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


