"""`charlm sample`, `novelty` and `chat`: text from a model, how much of it is copied, and an
interactive session."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm.cli.app import DEFAULT_OUT, CheckpointArg, DeviceOpt, JsonOpt, app, derived_options, err, handle_errors
from charlm.config.sampling import SampleOptions, parse_temperatures
from charlm.errors import CharLMError


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
    as_json: JsonOpt = False,
    **options: Any,
) -> None:
    """Generate text from a checkpoint, streamed to stdout as it is produced (--json: the prime,
    the samples and the --novelty report as one JSON object instead)."""
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
    if opts.adapt:
        model = model.adapted(opts.prime, opts.unknown)
        opts = replace(opts, adapt=False)
        err(f"charlm: {model.adaptation_summary()}")
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
        steps = model.stream_batch(replace(opts, temperature=t))
        if model.records:
            texts = _write_records(out, steps, opts.num_samples, shown_prime, model.records)
        else:
            texts = _write_samples(out, steps, opts.num_samples, shown_prime)
        samples.extend((t, text) for text in texts)
    out.flush()
    if model.records:  # a record is checked whole: the prime starts it
        _records_report(index, model.vocab.decode(ids), shown_prime, samples, as_json, model.records)
    else:
        _sample_report(index, shown_prime, samples, as_json)


def _write_samples(out: Any, steps: Any, n: int, prime: str) -> list[str]:
    """Stream sample 1 live; later samples of the batch are printed after it, labelled.
    Returns the generated text of each sample (prime excluded)."""
    if n > 1:
        out.write(f"--- sample 1/{n} ---\n")
    texts = _stream_first(out, steps, n, prime)
    out.write("\n")
    for row, text in enumerate(texts[1:], start=2):
        out.write(f"--- sample {row}/{n} ---\n{prime}{text}\n")
    out.flush()
    return texts


def _stream_first(out: Any, steps: Any, n: int, prime: str) -> list[str]:
    """Write the prime and sample 1 as it is generated; collect all n samples' text."""
    rows: list[list[str]] = [[] for _ in range(n)]
    out.write(prime)
    out.flush()
    for chars in steps:
        if chars[0]:
            out.write(chars[0])
            out.flush()
        for row in range(n):
            rows[row].append(chars[row])
    return ["".join(parts) for parts in rows]


def _write_records(out: Any, steps: Any, n: int, prime: str, mode: str) -> list[str]:
    """Records as the corpus writes them (one per line, or paragraphs between blank lines),
    record 1 streamed live. Returns the generated text of each (prime excluded)."""
    from charlm.data.records import SEPARATORS

    texts = _stream_first(out, steps, n, prime)
    between = SEPARATORS[mode][1:]  # a blank line between paragraphs
    out.write("\n" + "".join(f"{between}{prime}{text}\n" for text in texts[1:]))
    out.flush()
    return texts


# --- novelty ----------------------------------------------------------------------------------


def _novelty_index(model: Any) -> Any:
    """The training text's index, saying so on stderr when it has to be built (once)."""
    from charlm.analysis.novelty import training_index

    return training_index(model, on_build=lambda: err(
        "charlm: indexing the training text for the novelty report; later runs skip this"))


def _sample_report(index: Any, prime: str, samples: list[tuple[float, str]], as_json: bool) -> None:
    """After `charlm sample`: the novelty report on stderr, or everything as one JSON object."""
    from charlm.analysis.novelty import format_report, novelty_report

    report = novelty_report(index, [text for _, text in samples]) if index is not None else None
    if as_json:
        data: dict[str, Any] = {"prime": prime, "samples": [{"temperature": t, "text": text} for t, text in samples]}
        if report is not None:
            data["novelty"] = report
        print(json.dumps(data, ensure_ascii=False))
    elif report is not None:
        err(format_report(report))


def _records_report(index: Any, prime: str, shown_prime: str, samples: list[tuple[float, str]], as_json: bool,
                    mode: str) -> None:
    """`_sample_report` for a records model: every record is checked whole (prime included),
    and the report says how many are exact training records."""
    from charlm.analysis.novelty import format_report, novelty_report, record_report
    from charlm.data.records import SEPARATORS

    records = [prime + text for _, text in samples]
    report = None
    if index is not None:
        report = novelty_report(index, records)
        report["records"] = record_report(index, records, SEPARATORS[mode])
    if as_json:
        data: dict[str, Any] = {"prime": shown_prime,
                                "samples": [{"temperature": t, "text": text} for t, text in samples]}
        if report is not None:
            data["novelty"] = report
        print(json.dumps(data, ensure_ascii=False))
    elif report is not None:
        err(format_report(report))


@app.command("novelty")
@handle_errors
def novelty_cmd(
    checkpoint: CheckpointArg,
    file: Annotated[Path, typer.Argument(help="UTF-8 text file to check (e.g. saved samples).")],
    as_json: JsonOpt = False,
) -> None:
    """How much of FILE is copied verbatim from the training text of CHECKPOINT's run."""
    from charlm.analysis.novelty import format_report, novelty_report, read_text_file
    from charlm.api import load

    text = read_text_file(file)
    model = load(checkpoint)
    if model.records:  # FILE holds records: checked one by one, and as whole records
        from charlm.analysis.novelty import record_report
        from charlm.data.records import SEPARATORS, split_text

        records = split_text(text, model.records)
        if not records:
            raise CharLMError(f"{file}: holds no records (only blank lines)")
        index = _novelty_index(model)
        report = novelty_report(index, records)
        report["records"] = record_report(index, records, SEPARATORS[model.records])
    else:
        report = novelty_report(_novelty_index(model), [text])
    print(json.dumps(report, ensure_ascii=False) if as_json else format_report(report))




@app.command()
@handle_errors
@derived_options(SampleOptions, only=("temperature", "length", "top_k", "top_p", "seed", "adapt"), unset=False)
def chat(
    checkpoint: CheckpointArg,
    device: DeviceOpt = "cpu",
    **options: Any,
) -> None:
    """Interactive session: each line is a prime, its continuation streams back; /help lists
    commands (/temperature, /length, /top-k, /top-p, /seed, /adapt change the starting
    options). From a pipe: one continuation per input line on stdout."""
    from charlm.api import load
    from charlm.cli.chat import ChatSession, run

    adapt = options.pop("adapt")
    session = ChatSession(SampleOptions(**options), adapt=adapt)
    run(load(checkpoint, device=device), session)
