"""Is it just copying? How much of a generated text occurs verbatim in the training text.

Measures, for generated texts (one or more samples):

- the longest verbatim span: the longest piece of a sample that occurs somewhere in the
  training text, with where it occurs (document, character offset) and a short excerpt;
- n-gram novelty: for n = 8, 16, 32, the share of the samples' n-grams (every position,
  repeats counted) that occur nowhere in the training text;
- for records (one item per line): the share of generated records that are exact training
  records, i.e. occur in the training text as a whole line (`record_report`).

All of them come from the *matching statistics* of a sample: for each position i, the
length of the longest prefix of sample[i:] that occurs in the training text. The longest
span is their maximum, and the n-gram starting at i occurs in the training text exactly
when the match at i is at least n long.

The training text is never held as a Python string: the matches come from a suffix array
over the memory-mapped corpus ids, kept in the corpus cache (`charlm.analysis.suffix`).

Which text counts: only the part of the corpus the model trained on, a prefix of the cached
ids (up to `train_end` of the run's split, `charlm.data.streams.split_data`). The index is built
over that prefix alone (its length is part of the file name) rather than over the whole
corpus with matches filtered afterwards: a match must then never run into the held-out
tail, which a suffix array of the whole text cannot promise without checking every
occurrence, and the prefix costs no more to index than the whole. A second run with
another `val_fraction` on the same corpus gets its own index.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from charlm.analysis.suffix import TrainingIndex, open_index
from charlm.errors import CharLMError

if TYPE_CHECKING:
    from charlm.api import CharLM
    from charlm.data.cache import EncodedCorpus

NGRAM_SIZES = (8, 16, 32)
EXCERPT_CHARS = 60


# --- the training text ------------------------------------------------------------------------


def training_corpus(model: CharLM) -> tuple[EncodedCorpus, int]:
    """The corpus `model` trained on (checked against its recorded hash) and the length of
    its training part; raises `CharLMError` when the text is gone or changed."""
    corpus = model.run_corpus()
    return corpus, model.run_split(corpus).train_end


def training_index(model: CharLM, on_build: Callable[[], None] | None = None) -> TrainingIndex:
    """The suffix-array index of `model`'s training text (built on first use)."""
    corpus, n_train = training_corpus(model)
    return open_index(corpus, n_train, on_build=on_build)


def read_text_file(path: Path) -> str:
    """A text file to check, as one string; raises `CharLMError` when it is missing,
    unreadable, not UTF-8 or empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CharLMError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CharLMError(f"{path}: is a folder, not a text file") from None
    except OSError as exc:
        raise CharLMError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CharLMError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    if not text:
        raise CharLMError(f"{path}: file is empty")
    return text


# --- the measures -----------------------------------------------------------------------------


def _concat(index: TrainingIndex, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts' ids end to end, and how far from each position a match may reach (to the
    end of its text or its next unknown character)."""
    parts = [index.encode(t) for t in texts]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    known = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=bool)
    lengths = np.array([len(p[0]) for p in parts], dtype=np.int64)
    ends = np.cumsum(lengths)
    pos = np.arange(len(ids), dtype=np.int64)
    # A match stops at the first unknown character at or after i, or at the end of i's text.
    unknown = np.append(np.flatnonzero(~known), len(ids))
    next_unknown = unknown[np.searchsorted(unknown, pos, side="left")]
    text_end = ends[np.searchsorted(ends, pos, side="right")] if len(pos) else pos
    return ids, np.minimum(next_unknown, text_end) - pos


def matching_statistics(index: TrainingIndex, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text, for each position i: the length of the longest prefix of text[i:] found in
    the training text, and one training position where it occurs (-1 where the length is 0)."""
    ids, reach = _concat(index, texts)
    length, where = index.longest_matches(ids, np.arange(len(ids)), reach)
    bounds = np.cumsum([0] + [len(t) for t in texts])
    return [(length[a:b], where[a:b]) for a, b in itertools.pairwise(bounds)]


def novelty_report(index: TrainingIndex, texts: Sequence[str],
                   ngram_sizes: Sequence[int] = NGRAM_SIZES) -> dict[str, Any]:
    """How much of `texts` (generated samples) is copied from the training text.

    Returns a JSON-ready dict: characters and samples checked, the longest verbatim span
    (length, sample number, start in the sample, training offset, document and offset in
    it, excerpt) and for each n the n-grams checked, the novel ones and their share.
    """
    texts = list(texts)
    stats = matching_statistics(index, texts)
    span: dict[str, Any] = {"length": 0}
    best = 0
    for number, (text, (length, where)) in enumerate(zip(texts, stats, strict=True), start=1):
        if len(length) and int(length.max()) > best:
            start = int(length.argmax())
            best = int(length[start])
            document, offset = index.locate(int(where[start]))
            piece = text[start:start + best]
            span = {"length": best, "sample": number, "sample_offset": start,
                    "training_offset": int(where[start]), "document": document,
                    "document_offset": offset,
                    "excerpt": piece if len(piece) <= EXCERPT_CHARS else piece[:EXCERPT_CHARS] + "…"}
    ngrams: dict[str, Any] = {}
    for n in ngram_sizes:
        total = sum(max(0, len(length) - n + 1) for length, _ in stats)
        novel = sum(int(np.count_nonzero(length[:max(0, len(length) - n + 1)] < n)) for length, _ in stats)
        ngrams[str(n)] = {"total": total, "novel": novel,
                          "novel_share": round(novel / total, 6) if total else None}
    unknown = sum(int(np.count_nonzero(~index.encode(t)[1])) for t in texts)
    return {"samples": len(texts), "chars": sum(len(t) for t in texts), "unknown_chars": unknown,
            "training_chars": len(index), "longest_span": span, "ngrams": ngrams,
            "index": {"path": str(index.path), "built": index.built,
                      "seconds": round(index.seconds, 3)}}


def exact_records(index: TrainingIndex, records: Sequence[str], separator: str = "\n") -> np.ndarray:
    """Which `records` are exact training records: each occurs in the training text as a
    whole record, between two separators (or the start or the end of the training text)."""
    if not separator:
        raise ValueError("exact_records: the separator must not be empty")
    records = list(records)
    n = len(index)
    # Records inside the text: separator + record + separator occurs (one query each).
    wrapped = [separator + r + separator for r in records]
    ids, reach = _concat(index, wrapped)
    starts = np.cumsum([0] + [len(w) for w in wrapped])[:-1].astype(np.int64)
    length, _ = index.longest_matches(ids, starts, reach[starts] if len(ids) else starts)
    found = np.zeros(len(records), dtype=bool)
    for i, record in enumerate(records):
        if separator in record:
            continue  # it holds a separator, so it is never one whole record
        found[i] = bool(length[i] == len(wrapped[i])
                        or _equals(index, 0, record + separator)  # the first record
                        or _equals(index, n - len(record) - len(separator), separator + record)  # the last
                        or (len(record) == n and _equals(index, 0, record)))  # the only one
    return found


def _equals(index: TrainingIndex, at: int, piece: str) -> bool:
    """Whether the training text holds `piece` at position `at`."""
    if at < 0 or at + len(piece) > len(index):
        return False
    ids, known = index.encode(piece)
    return bool(known.all()) and bool(np.array_equal(np.asarray(index.ids[at:at + len(ids)], dtype=np.int64), ids))


def record_report(index: TrainingIndex, records: Sequence[str], separator: str = "\n") -> dict[str, Any]:
    """The share of generated `records` that are exact training records (JSON-ready)."""
    found = exact_records(index, records, separator)
    total, exact = len(found), int(found.sum())
    return {"records": total, "exact": exact, "novel": total - exact,
            "exact_share": round(exact / total, 6) if total else None}


# --- text form --------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for people (what `charlm novelty` and `--novelty` print)."""
    samples = f"{report['samples']} sample{'s' if report['samples'] != 1 else ''}"
    lines = [(f"novelty: {report['chars']:,} characters in {samples} checked against "
              f"{report['training_chars']:,} training characters")]
    span = report["longest_span"]
    if span["length"]:
        where = (f"{span['document']} at character {span['document_offset']:,}"
                 if span["document"] is not None else f"training character {span['training_offset']:,}")
        sample = f" (sample {span['sample']})" if report["samples"] > 1 else ""
        lines.append(f"  longest copied span: {span['length']:,} characters{sample}, from {where}: "
                     f"{json.dumps(span['excerpt'], ensure_ascii=False)}")
    else:
        lines.append("  longest copied span: 0 characters")
    for n, row in report["ngrams"].items():
        share = "-" if row["novel_share"] is None else f"{100 * row['novel_share']:.1f}%"
        lines.append(f"  novel {n}-grams: {share} ({row['novel']:,} of {row['total']:,})")
    if "records" in report:
        rec = report["records"]
        share = "-" if rec["exact_share"] is None else f"{100 * rec['exact_share']:.1f}%"
        lines.append(f"  exact training records: {share} ({rec['exact']:,} of {rec['records']:,})")
    if report["unknown_chars"]:
        lines.append(f"  characters not in the training text: {report['unknown_chars']:,}")
    return "\n".join(lines)
