"""The suffix-array index of a training text: built once per corpus cache entry, memory-mapped.

The training text is never held as a Python string. Matches are found with a suffix array
over the memory-mapped corpus ids (`charlm.data.cache`), built with libdivsufsort and kept in
the corpus cache beside the ids (`<key>.train<N>.sa` and its `.json` description), written
atomically and rebuilt when missing or damaged: it keeps a CRC-32 per megabyte, each block
checked the first time a query reads it (`charlm.data.checked`), as the corpus ids are.
A query walks the suffix array block by block (7 uint8 ids, 3 uint16 ids or 1 uint32 id
packed into one integer), each block a vectorised binary search for every query at once
(`TrainingIndex.longest_matches`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from charlm.data.checked import CheckedIds, block_crcs
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError
from charlm.fs import atomic_path, write_atomic

if TYPE_CHECKING:
    from charlm.data.cache import EncodedCorpus

INDEX_FORMAT = 2  # bump when the index file or its description changes (2: block checksums)
_SPOT_CHECKS = 512  # adjacent suffix-array pairs checked for order each time the index opens


# --- the suffix array -------------------------------------------------------------------------


def suffix_array(ids: np.ndarray | CheckedIds) -> np.ndarray:
    """Start positions of the suffixes of `ids` (uint8 / uint16 / uint32) in lexicographic
    order, as int32 when they fit, else int64.

    libdivsufsort sorts bytes; wider ids are sorted as their big-endian bytes (whose byte
    order is the id order), keeping only the suffixes that start on an id boundary.
    """
    from pydivsufsort import divsufsort

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

    ids: np.ndarray | CheckedIds  # (n,) training ids: a view of the corpus cache's
    sa: np.ndarray | CheckedIds  # (n,) suffix array, memory-mapped, its blocks checked as read
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
        """`text` as training ids (int64; 0 where unknown) and a mask of the characters the corpus has."""
        return self.vocab.lookup(text)


# --- opening, building and checking the index --------------------------------------------------


def open_index(corpus: EncodedCorpus, n_train: int, *,
               on_build: Callable[[], None] | None = None) -> TrainingIndex:
    """The index of `corpus.ids[:n_train]`, from the cache folder of `corpus.path`; built
    (atomically) when it is missing or damaged. `on_build` is called before a build."""
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

    def repair() -> tuple[np.ndarray, list[int]]:
        crcs = _build(ids, path, meta_path)
        return np.memmap(path, dtype=_sa_dtype(len(ids)), mode="r", shape=(len(ids),)), crcs

    if isinstance(sa, CheckedIds):
        sa.repair_with(repair)  # a block found damaged by a query: rebuilt, and the query goes on
    starts = corpus.doc_starts
    return TrainingIndex(ids, sa, corpus.vocab, list(corpus.desc["documents"]),
                         None if starts is None else np.asarray(starts, dtype=np.int64),
                         path, built, time.perf_counter() - t0)


def _sa_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def _build(ids: np.ndarray | CheckedIds, path: Path, meta_path: Path) -> list[int]:
    """Write the suffix array to `path` (atomically), then its description; its block checksums."""
    try:
        sa = suffix_array(ids).astype(_sa_dtype(len(ids)), copy=False)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(sa.data)
        crcs = block_crcs(sa)
        del sa
        _write_meta(meta_path, len(ids), crcs)
        return crcs
    except OSError as exc:
        raise CharLMError(f"novelty index {path.parent}: cannot write: {exc.strerror}") from None


def _write_meta(meta_path: Path, n: int, crcs: list[int]) -> None:
    meta = {"format": INDEX_FORMAT, "chars": n, "dtype": _sa_dtype(n).name, "crc32": crcs}
    # The description last: an index without one is incomplete and is rebuilt.
    write_atomic(meta_path, json.dumps(meta).encode("utf-8"))


def _open_checked(path: Path, meta_path: Path, ids: np.ndarray | CheckedIds) -> CheckedIds | np.ndarray | None:
    """The suffix array, its blocks checked as they are read, or None when it is missing,
    incomplete or damaged (a sample of adjacent entries, spread over the whole file, must
    be in range and in suffix order, and their blocks must match their checksums)."""
    n = len(ids)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if (meta.get("format") != INDEX_FORMAT or meta["chars"] != n or dtype != _sa_dtype(n)
                or path.stat().st_size != n * dtype.itemsize):
            return None
        if not n:
            return np.zeros(0, dtype)
        sa = CheckedIds.of(np.memmap(path, dtype=dtype, mode="r", shape=(n,)), meta["crc32"], path,
                           label="novelty index", source="the training text")
        return sa if _spot_check(sa, ids) else None
    except (OSError, ValueError, KeyError, TypeError, CharLMError):
        return None


def _spot_check(sa: np.ndarray | CheckedIds, ids: np.ndarray | CheckedIds) -> bool:
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
