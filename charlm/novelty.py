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

The training text is never held as a Python string. Matches are found with a suffix array
over the memory-mapped corpus ids (`charlm.encode`), built once with libdivsufsort and
kept in the corpus cache beside the ids (`<key>.train<N>.sa` and its `.json` description),
written atomically and rebuilt when missing or damaged. A query walks the suffix array
block by block (7 uint8 ids, 3 uint16 ids or 1 uint32 id packed into one integer), each
block a vectorised binary search for every position of the samples at once.

Which text counts: only the part of the corpus the model trained on,
`charlm.data.split(ids, val_fraction).train`, a prefix of the cached ids. The index is built
over that prefix alone (its length is part of the file name) rather than over the whole
corpus with matches filtered afterwards: a match must then never run into the held-out
tail, which a suffix array of the whole text cannot promise without checking every
occurrence, and the prefix costs no more to index than the whole. A second run with
another `val_fraction` on the same corpus gets its own index.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from charlm import checkpoint as ckpt_io
from charlm.errors import CharLMError
from charlm.vocab import Vocab

if TYPE_CHECKING:
    from charlm.api import CharLM
    from charlm.encode import EncodedCorpus

INDEX_FORMAT = 1  # bump when the index file or its description changes
NGRAM_SIZES = (8, 16, 32)
EXCERPT_CHARS = 60
_SPOT_CHECKS = 512  # adjacent suffix-array pairs checked for order each time the index opens


# --- the training text ------------------------------------------------------------------------


def training_corpus(model: CharLM) -> tuple[EncodedCorpus, int]:
    """The corpus `model` trained on (checked against its recorded hash) and the length of
    its training part; raises `CharLMError` when the text is gone or changed."""
    from charlm.data import split
    from charlm.encode import reopen_corpus

    corpus = reopen_corpus(model.checkpoint["corpus"], model.path)
    return corpus, len(split(corpus.ids, model.config.train.val_fraction).train)


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


# --- the suffix array -------------------------------------------------------------------------


def suffix_array(ids: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of `ids` (uint8 / uint16 / uint32) in lexicographic
    order, as int32 when they fit, else int64.

    libdivsufsort sorts bytes; wider ids are sorted as their big-endian bytes (whose byte
    order is the id order), keeping only the suffixes that start on an id boundary.
    """
    from pydivsufsort import divsufsort  # type: ignore[import-untyped]

    ids = np.asarray(ids)
    if ids.dtype not in (np.uint8, np.uint16, np.uint32) or ids.ndim != 1:
        raise TypeError(f"suffix_array: expected 1-D uint8/16/32 ids, got {ids.dtype} {ids.shape}")
    n = len(ids)
    out_dtype = np.int32 if n < 2**31 else np.int64
    if n < 2:
        return np.zeros(n, dtype=out_dtype)
    size = ids.dtype.itemsize
    # A writable contiguous copy: divsufsort's wrapper refuses read-only memmaps.
    data = np.array(ids, dtype=ids.dtype.newbyteorder(">")).view(np.uint8)
    sa = divsufsort(data, force64=len(data) >= 2**31)
    if size > 1:
        sa = sa[sa % size == 0] // size
    return sa.astype(out_dtype, copy=False)


@dataclass
class TrainingIndex:
    """The training text (a prefix of the corpus ids) and its suffix array, both memory-mapped."""

    ids: np.ndarray  # (n,) training ids: a view of the corpus memmap
    sa: np.ndarray  # (n,) suffix array, read-only memmap
    vocab: Vocab
    documents: list[str]  # the corpus's documents, in order
    doc_starts: np.ndarray | None  # where each document starts in the ids; None: not recorded
    path: Path  # the index file
    built: bool  # True when this call built (or rebuilt) it
    seconds: float  # time spent opening (and building) it

    def __post_init__(self) -> None:
        size = self.ids.dtype.itemsize
        self._width = {1: 7, 2: 3, 4: 1}[size]  # ids per block key: width * bits + 8 <= 64
        self._bits = 8 * size

    def __len__(self) -> int:
        return len(self.ids)

    # Matching statistics --------------------------------------------------------------------

    def longest_matches(self, pattern: np.ndarray, starts: np.ndarray,
                        limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each query q, the longest prefix of pattern[starts[q]: starts[q] + limits[q]]
        that occurs in the training text: its length, and one training position where it
        occurs (-1 for a length of 0).

        The suffixes that share the first d ids with the query form one interval [lo, hi)
        of the suffix array; each round narrows it to the next block of ids with two binary
        searches. When no suffix shares the whole next block, the longest match ends inside
        it, at one of the two suffixes beside where the block would be inserted.
        """
        pattern = np.asarray(pattern, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        limits = np.asarray(limits, dtype=np.int64)
        q_count, n, width = len(starts), len(self.ids), self._width
        length = np.zeros(q_count, dtype=np.int64)
        where = np.full(q_count, -1, dtype=np.int64)
        lo = np.zeros(q_count, dtype=np.int64)
        hi = np.full(q_count, n, dtype=np.int64)
        depth = np.zeros(q_count, dtype=np.int64)
        act = np.flatnonzero(limits > 0) if n else np.zeros(0, dtype=np.int64)
        while len(act):
            avail = np.clip(limits[act] - depth[act], 0, width)
            pvals = self._pattern_block(pattern, starts[act] + depth[act], avail)
            pkey = self._key(pvals, avail)
            d, a_lo, a_hi = depth[act], lo[act], hi[act]
            first = self._search(a_lo, a_hi, d, pkey, inclusive=False)
            after = self._search(first, a_hi, d, pkey, inclusive=True)
            whole = (avail == width) & (after > first)
            # Those that share the whole block go one block deeper.
            deeper = act[whole]
            lo[deeper], hi[deeper] = first[whole], after[whole]
            depth[deeper] += width
            # The others end inside this block: at the neighbours of the insertion point.
            end = ~whole
            if end.any():
                ids_left = act[end]
                best_len = np.zeros(len(ids_left), dtype=np.int64)
                best_at = np.full(len(ids_left), -1, dtype=np.int64)
                for cand in (first[end] - 1, first[end]):
                    ok = (cand >= a_lo[end]) & (cand < a_hi[end])
                    pos = self._sa_at(np.where(ok, cand, a_lo[end]))
                    tvals, tavail = self._text_block(pos + d[end])
                    same = (tvals == pvals[end]) & (np.arange(width) < np.minimum(tavail, avail[end])[:, None])
                    lcp = np.where(same.all(axis=1), width, same.argmin(axis=1))
                    better = ok & ((lcp > best_len) | (best_at < 0))
                    best_len = np.where(better, lcp, best_len)
                    best_at = np.where(better, pos, best_at)
                length[ids_left] = d[end] + best_len
                where[ids_left] = np.where(length[ids_left] > 0, best_at, -1)
            act = deeper
        return length, where

    def _sa_at(self, k: np.ndarray) -> np.ndarray:
        pos = np.asarray(self.sa[k], dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self.ids)):
            raise CharLMError(f"{self.path}: damaged novelty index (delete it to rebuild)")
        return pos

    def _text_block(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The next `width` training ids at each position (0 past the end) and how many exist."""
        n = len(self.ids)
        idx = pos[:, None] + np.arange(self._width)
        valid = idx < n
        vals = np.asarray(self.ids[np.minimum(idx, n - 1)], dtype=np.uint64)
        vals[~valid] = 0
        return vals, valid.sum(axis=1)

    def _pattern_block(self, pattern: np.ndarray, pos: np.ndarray, avail: np.ndarray) -> np.ndarray:
        cols = np.arange(self._width)
        idx = np.minimum(pos[:, None] + cols, max(len(pattern) - 1, 0))
        vals = pattern[idx].astype(np.uint64) if len(pattern) else np.zeros(idx.shape, np.uint64)
        vals[cols >= avail[:, None]] = 0
        return vals

    def _key(self, vals: np.ndarray, avail: np.ndarray) -> np.ndarray:
        """Blocks as integers whose order is the blocks' lexicographic order: the ids packed
        big-endian (0 where a block runs out), then the count of ids present, so that a
        shorter block sorts before its extensions as it does in the suffix array."""
        key = np.zeros(len(vals), dtype=np.uint64)
        for col in range(self._width):
            key = (key << np.uint64(self._bits)) | vals[:, col]
        return (key << np.uint64(8)) | avail.astype(np.uint64)

    def _search(self, lo: np.ndarray, hi: np.ndarray, depth: np.ndarray, pkey: np.ndarray,
                inclusive: bool) -> np.ndarray:
        """Per query, the first k in [lo, hi) whose block at `depth` is > pkey (inclusive)
        or >= pkey (not inclusive); every query's binary search runs in the same loop."""
        lo, hi = lo.copy(), hi.copy()
        act = np.flatnonzero(lo < hi)
        while len(act):
            mid = (lo[act] + hi[act]) // 2
            vals, avail = self._text_block(self._sa_at(mid) + depth[act])
            key = self._key(vals, avail)
            right = key <= pkey[act] if inclusive else key < pkey[act]
            lo[act] = np.where(right, mid + 1, lo[act])
            hi[act] = np.where(right, hi[act], mid)
            act = act[lo[act] < hi[act]]
        return lo

    # Where a training position comes from ---------------------------------------------------

    def locate(self, pos: int) -> tuple[str | None, int | None]:
        """The document holding training position `pos` and the offset inside it (None,
        None when the corpus cache did not record document boundaries)."""
        if self.doc_starts is None or pos < 0:
            return None, None
        doc = int(np.searchsorted(self.doc_starts, pos, side="right")) - 1
        return self.documents[doc], pos - int(self.doc_starts[doc])

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """`text` as training ids (int64) and a mask of the characters the corpus has."""
        if not text:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        table = np.frombuffer(self.vocab.chars.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        ids = np.minimum(np.searchsorted(table, codes), len(table) - 1)
        known = table[ids] == codes
        return np.where(known, ids, 0), known


# --- opening, building and checking the index --------------------------------------------------


def open_index(corpus: EncodedCorpus, n_train: int, *,
               on_build: Callable[[], None] | None = None) -> TrainingIndex:
    """The index of `corpus.ids[:n_train]`, from the cache folder of `corpus.path`; built
    (atomically) when it is missing or damaged. `on_build` is called before a build."""
    from charlm.encode import document_starts

    t0 = time.perf_counter()
    ids = corpus.ids[:n_train]
    path = corpus.path.with_name(f"{corpus.path.stem}.train{n_train}.sa")
    meta_path = path.with_name(path.name + ".json")
    sa = _open_checked(path, meta_path, ids)
    built = sa is None
    if sa is None:
        if on_build is not None:
            on_build()
        _build(ids, path, meta_path)
        sa = _open_checked(path, meta_path, ids)
        if sa is None:
            raise CharLMError(f"{path}: the novelty index just written does not read back")
    starts = document_starts(corpus)
    return TrainingIndex(ids, sa, corpus.vocab, list(corpus.desc["documents"]),
                         None if starts is None else np.asarray(starts, dtype=np.int64),
                         path, built, time.perf_counter() - t0)


def _sa_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def _build(ids: np.ndarray, path: Path, meta_path: Path) -> None:
    """Write the suffix array to `path` (temporary file + rename), then its description."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sa = suffix_array(ids).astype(_sa_dtype(len(ids)), copy=False)
        with open(tmp, "wb") as fh:
            fh.write(sa.data)
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.blake2b(sa.data, digest_size=16).hexdigest()
        del sa
        os.replace(tmp, path)
        _write_meta(meta_path, len(ids), digest, path.stat().st_mtime_ns)
    except OSError as exc:
        raise CharLMError(f"novelty index {path.parent}: cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_meta(meta_path: Path, n: int, digest: str, mtime_ns: int) -> None:
    meta = {"format": INDEX_FORMAT, "chars": n, "dtype": _sa_dtype(n).name,
            "blake2b": digest, "mtime_ns": mtime_ns}
    # The description last: an index without one is incomplete and is rebuilt.
    ckpt_io.write_atomic(meta_path, json.dumps(meta).encode("utf-8"))


def _open_checked(path: Path, meta_path: Path, ids: np.ndarray) -> np.ndarray | None:
    """The suffix array as a read-only memmap, or None when it is missing or damaged.

    A file whose modification time is still the one recorded when it was written is
    trusted (checking a checksum of hundreds of megabytes would cost more than a report);
    one touched since is checked against the recorded checksum. Either way a sample of
    adjacent entries must be in range and in suffix order.
    """
    n = len(ids)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        stat = path.stat()
        if (meta.get("format") != INDEX_FORMAT or meta["chars"] != n or dtype != _sa_dtype(n)
                or stat.st_size != n * dtype.itemsize):
            return None
        if stat.st_mtime_ns != meta["mtime_ns"]:
            if _digest(path) != meta["blake2b"]:
                return None
            try:  # the same bytes with a new time (a copy, a restore): trust it from now on
                _write_meta(meta_path, n, meta["blake2b"], stat.st_mtime_ns)
            except OSError:
                pass
        sa = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sa if _spot_check(sa, ids) else None


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _spot_check(sa: np.ndarray, ids: np.ndarray) -> bool:
    """Adjacent entries at evenly spread places are in range, distinct and in order (by
    their first 16 ids: a tie there is not checked further)."""
    n = len(ids)
    if n < 2:
        return n == 0 or int(sa[0]) == 0
    k = np.unique(np.linspace(0, n - 2, min(_SPOT_CHECKS, n - 1)).astype(np.int64))
    a, b = np.asarray(sa[k], dtype=np.int64), np.asarray(sa[k + 1], dtype=np.int64)
    if min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n or np.any(a == b):
        return False
    cols = np.arange(16)
    ia, ib = a[:, None] + cols, b[:, None] + cols
    # -1 past the end: a suffix sorts before its extensions.
    ta = np.where(ia < n, np.asarray(ids[np.minimum(ia, n - 1)], dtype=np.int64), -1)
    tb = np.where(ib < n, np.asarray(ids[np.minimum(ib, n - 1)], dtype=np.int64), -1)
    diff = ta != tb
    first = diff.argmax(axis=1)
    rows = np.arange(len(k))
    differs = diff.any(axis=1)
    return bool(np.all(~differs | (ta[rows, first] < tb[rows, first])))


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
    for number, (text, (length, where)) in enumerate(zip(texts, stats), start=1):
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
