"""A corpus cache entry's ids, each block checked against its CRC-32 the first time it is read.

A memory-mapped gigabyte corpus is not re-hashed whole on every run: the entry keeps a
CRC-32 per `BLOCK_BYTES` of ids (`block_crcs`, written with it), and `CheckedIds` checks a
block when a read first touches it — a training batch, a held-out slice, a records scan, the
novelty index's build — then remembers it. Checked bytes are the bytes written, and the
written ids are all inside the vocabulary, so no id outside it can reach the model.

A block that fails is repaired when the entry can be: `repair` (given by the cache when the
corpus's files are still there) rebuilds the entry from them, and reading goes on from the
new file, with one warning. Without it the read raises `CharLMError` naming the entry.

`CheckedIds` stands where a 1-D numpy array of ids stands: `len`, slicing (a view, nothing
read), integer and fancy indexing, `numpy.asarray`, comparisons and arithmetic (through
numpy's ufuncs, each input read, so checked, first).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from charlm.errors import CharLMError, CharLMWarning

BLOCK_BYTES = 1 << 20  # bytes of ids per checksum: 0.5 ms of CRC-32 here, 4 bytes in the entry's description

# The entry after a repair: its ids (a memmap) and their block checksums.
Repair = Callable[[], tuple[np.ndarray, list[int]]]


def block_crcs(ids: np.ndarray, block_bytes: int = BLOCK_BYTES) -> list[int]:
    """The CRC-32 of each `block_bytes` of `ids`' bytes."""
    raw = np.asarray(ids).reshape(-1).view(np.uint8)
    return [zlib.crc32(raw[a:a + block_bytes].data) for a in range(0, len(raw), block_bytes)]


class _Entry:
    """What every view of one entry shares: the ids, their checksums, which blocks are checked."""

    def __init__(self, ids: np.ndarray, crcs: list[int], path: Path, repair: Repair | None, label: str,
                 source: str) -> None:
        self.path, self.repair, self.label, self.source = path, repair, label, source
        self._set(ids, crcs)

    def _set(self, ids: np.ndarray, crcs: list[int]) -> None:
        self.ids = ids
        self.per_block = BLOCK_BYTES // ids.dtype.itemsize  # ids per block
        self.crcs = np.asarray(crcs, dtype=np.uint32)
        self.checked = np.zeros(len(self.crcs), dtype=bool)
        if len(self.crcs) != -(-len(ids) // self.per_block):
            raise CharLMError(f"{self.label} {self.path}: its checksums do not cover it")

    def check(self, first: int, last: int) -> None:
        """Check every block holding ids first..last (inclusive) that is not checked yet."""
        blocks = np.arange(first // self.per_block, last // self.per_block + 1)
        self.check_blocks(blocks)

    def check_blocks(self, blocks: np.ndarray) -> None:
        todo = blocks[~self.checked[blocks]]
        for b in np.unique(todo):
            a = int(b) * self.per_block
            raw = np.asarray(self.ids[a:a + self.per_block]).view(np.uint8)
            if zlib.crc32(raw.data) != int(self.crcs[b]):
                self._damaged(int(b))
                return self.check_blocks(blocks)  # the repaired entry: checked from the start
            self.checked[b] = True
        return None

    def _damaged(self, block: int) -> None:
        what = (f"{self.label} {self.path}: damaged (block {block + 1} of {len(self.crcs)} does not "
                "match the checksum written with it)")
        if self.repair is None:
            raise CharLMError(f"{what}, and {self.source} cannot be read, so it cannot be rebuilt: restore "
                              f"{self.source}, or delete {self.path} and train on the corpus again")
        warnings.warn(f"{what}; rebuilding it from {self.source}", CharLMWarning, stacklevel=2)
        repair, self.repair = self.repair, None  # rebuilt once: a second failure is not the cache's
        self._set(*repair())


class CheckedIds(NDArrayOperatorsMixin):
    """A view [start, start + length) of a cache entry's ids whose blocks are checked as read."""

    def __init__(self, entry: _Entry, start: int = 0, length: int | None = None) -> None:
        self._entry, self._start = entry, start
        self._len = len(entry.ids) - start if length is None else length

    @classmethod
    def of(cls, ids: np.ndarray, crcs: list[int], path: Path, repair: Repair | None = None,
           label: str = "corpus cache entry", source: str = "the corpus's files") -> CheckedIds:
        """The whole of `path`: `ids` (its memmap) with its `block_crcs`; `label` names it and
        `source` says what `repair` rebuilds it from, in the messages."""
        return cls(_Entry(ids, crcs, path, repair, label, source))

    def repair_with(self, repair: Repair | None) -> None:
        """From now on a damaged block is repaired by `repair` (None: refused)."""
        self._entry.repair = repair

    @property
    def dtype(self) -> np.dtype:
        return self._entry.ids.dtype

    @property
    def shape(self) -> tuple[int]:
        return (self._len,)

    ndim = 1

    @property
    def size(self) -> int:
        return self._len

    @property
    def memory_mapped(self) -> bool:
        """Whether the ids are read from the file as they are used (a memmap), not held in memory."""
        return isinstance(self._entry.ids, np.memmap)

    @property
    def nbytes(self) -> int:
        return self._len * self.dtype.itemsize

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step == 1:  # a view: nothing is read yet
                return CheckedIds(self._entry, self._start + start, max(0, stop - start))
            return np.asarray(self)[index]
        if isinstance(index, int | np.integer):
            i = int(index) + (self._len if index < 0 else 0)
            if not 0 <= i < self._len:
                raise IndexError(f"index {index} is out of bounds for ids of length {self._len}")
            self._entry.check(self._start + i, self._start + i)
            return self._entry.ids[self._start + i]
        idx = np.asarray(index)
        if idx.dtype == bool:
            return np.asarray(self)[idx]
        idx = np.where(idx < 0, idx + self._len, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"index out of bounds for ids of length {self._len}")
        at = idx + self._start
        if idx.size:
            self._entry.check_blocks(np.unique(at // self._entry.per_block))
        return self._entry.ids[at]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self._len:
            self._entry.check(self._start, self._start + self._len - 1)
        out = self._entry.ids[self._start:self._start + self._len]
        # copy=True (numpy.array's default) asks for a copy: a view would follow the file.
        return np.array(out, dtype=dtype, copy=True) if copy else np.asarray(out, dtype=dtype)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        arrays = [np.asarray(x) if isinstance(x, CheckedIds) else x for x in inputs]
        return getattr(ufunc, method)(*arrays, **kwargs)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)
