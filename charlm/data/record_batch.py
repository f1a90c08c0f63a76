"""Batches of records: whole records packed into windows, each read from a fresh state.

The records are cut into B rows at record boundaries, rows of about equal length. Each
batch takes from every row a window of at most T (`--seq-len`) positions: as many whole
records as fit (a record is its start marker and its characters; its targets are the
characters and the end marker). Every record of a window becomes one row of the batch,
padded to the longest, and starts from a zero state:

    row 0 of the text:  S a n n S b o b S c a r o l S d a v e S e ...   (S: start marker)
    window 0 (T = 16):  [S a n n] [S b o b] [S c a r o l]      -> 3 batch rows, from zero
    window 1:           [S d a v e] [S e ...] ...

So the recurrent layers run as PyTorch's fused kernel (oneDNN / cuDNN) over a (records x
longest) batch, with no step-by-step loop and nothing crossing from one record to the next;
padding positions are computed but never scored. A record longer than T is read in pieces
of T, alone in its window, its state carried from piece to piece (the gradient stops at the
piece's edge, as in stream mode); every piece but the last is exactly T long, the batch's
longest, so its final state is exact. A window fills to T minus what does not fit: its
next record starts the next window.

A batch is a function of the pass's batch number alone, so a checkpoint stores that number
(and the pass) and a resume recomputes every row's place, in any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from charlm.data.records import RecordSet
from charlm.errors import CharLMError


@dataclass
class RecordBatch:
    """One window of every row: one batch row per record (or piece of one)."""

    x: torch.Tensor  # (S, L) input ids, padded
    y: torch.Tensor  # (S, L) target ids
    mask: torch.Tensor  # (S, L) bool: real positions (the ones scored)
    record: np.ndarray  # (S,) which record (of the RecordSet) each batch row reads
    seg_row: torch.Tensor  # (S,) the text row each batch row comes from
    carried: torch.Tensor  # batch rows that continue a record from their text row's previous window
    out_rows: torch.Tensor  # text rows whose record goes on in their next window ...
    out_segs: torch.Tensor  # ... and the batch row holding its piece (exactly L long)

    @property
    def chars(self) -> int:
        return int(self.mask.sum())

    # A batch row's starting state is zero, or (`carried`) its text row's state; after the
    # window, the text rows in `out_rows` carry the state of batch rows `out_segs`
    # (`charlm.model.scoring` applies both to the model's state).


class RecordRows:
    """A RecordSet cut into rows at record boundaries, read a window at a time (`next`)."""

    def __init__(self, rs: RecordSet, n_rows: int, window: int, device: torch.device,
                 rows: range | None = None) -> None:
        count = rs.count
        if count < n_rows:
            raise CharLMError(f"--records: {count:,} training records are fewer than the {n_rows} rows of a "
                              "batch (--batch-size); use a smaller --batch-size or more records")
        self.rs, self.window, self.device = rs, window, device
        self.tokens = rs.lengths + 1  # a record's positions: its start marker and its characters
        self.off = np.concatenate([[0], np.cumsum(self.tokens)]).astype(np.int64)  # (R + 1,)
        total = int(self.off[-1])
        first = np.searchsorted(self.off[:-1], np.arange(n_rows + 1) * total // n_rows, side="left")
        first[0], first[-1] = 0, count
        for b in range(1, n_rows):  # every row gets at least one record
            first[b] = min(max(first[b], first[b - 1] + 1), count - (n_rows - b))
        mine = np.asarray(rows if rows is not None else range(n_rows), dtype=np.int64)
        self.first, self.end = first[mine], first[mine + 1]  # (B,) each row's records [first, end)
        self.restart()

    def __len__(self) -> int:
        return len(self.first)

    def restart(self) -> None:
        """Back to the start of every row (a new pass)."""
        self.rec = self.first.copy()  # (B,) the record each row is in
        self.at = np.zeros_like(self.rec)  # (B,) and how far into it (a long record's pieces)

    @property
    def done(self) -> bool:
        return bool((self.rec >= self.end).all())

    def _advance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Take the next window of every row: its segments (record, offset, length, text row)
        and which rows' records go on past it; moves the rows on."""
        T = self.window
        active = self.rec < self.end
        r = np.minimum(self.rec, len(self.tokens) - 1)
        rest = self.tokens[r] - self.at
        piece = active & (rest > T)  # in a record longer than the window: one piece of T
        whole = active & ~piece  # the rest of its record, then every whole record that fits
        fits = np.searchsorted(self.off, self.off[r] + self.at + T, side="right") - 1
        stop = np.where(whole, np.minimum(fits, self.end), self.rec)
        counts = np.where(piece, 1, stop - self.rec)  # >= 1 for a `whole` row: its record fits
        seg_row = np.repeat(np.arange(len(counts)), counts)
        k = np.arange(len(seg_row)) - np.repeat(np.cumsum(counts) - counts, counts)  # index in its row
        seg_rec = np.repeat(self.rec, counts) + k
        seg_off = np.where(k == 0, np.repeat(self.at, counts), 0)
        seg_len = np.where(piece[seg_row], T, self.tokens[np.minimum(seg_rec, len(self.tokens) - 1)] - seg_off)
        self.at = np.where(piece, self.at + T, 0)
        self.rec = np.where(piece, self.rec, stop)
        return seg_rec, seg_off, seg_len, seg_row, piece

    def skip(self, batches: int) -> None:
        """Move on `batches` windows without building them (a resume finds its place)."""
        for _ in range(batches):
            self._advance()

    def next(self) -> RecordBatch:
        """The next window of every row as a batch (call only while not `done`)."""
        rs = self.rs
        seg_rec, seg_off, seg_len, seg_row, piece = self._advance()
        width = int(seg_len.max())
        j = seg_off[:, None] + np.arange(width + 1)  # (S, L + 1) positions in each record
        chars = rs.lengths[seg_rec][:, None]
        inside = (j >= 1) & (j <= chars)
        src = np.where(inside, rs.starts[seg_rec][:, None] + j - 1, 0)
        ids = rs.table[np.asarray(rs.ids[src.ravel()]).astype(np.int64)].reshape(src.shape)
        # Position 0 is the start marker, then the characters; the one after the last is the
        # end marker (and so is the padding past it, which is never scored).
        tokens = np.where(j == 0, rs.start_id, np.where(inside, ids, rs.end_id))
        mask = np.arange(width) < seg_len[:, None]
        carried = np.flatnonzero(seg_off > 0)
        out_rows = np.flatnonzero(piece)
        out_segs = np.searchsorted(seg_row, out_rows)  # a piece is its row's only segment
        assert not len(out_rows) or width == self.window  # a piece's final state is exact
        to = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device))  # noqa: E731
        return RecordBatch(to(tokens[:, :-1]), to(tokens[:, 1:]), to(mask), seg_rec, to(seg_row), to(carried),
                           to(out_rows), to(out_segs))


class RecordBatcher:
    """Training windows over the rows of the training records; its position (the batch
    number within the pass, and the pass) is part of a checkpoint."""

    def __init__(self, rs: RecordSet, batch_size: int, seq_len: int, device: torch.device,
                 rows: range | None = None) -> None:
        self.rows = RecordRows(rs, batch_size, seq_len, device, rows)
        self.starts = self.rows.first  # one per row of this process (as StreamBatcher's)
        self.seq_len = seq_len
        self.pos = 0  # batches taken in this pass
        self.epoch = 0

    @property
    def chars_per_batch(self) -> int:
        return len(self.rows) * self.seq_len

    def next(self) -> RecordBatch:
        if self.rows.done:
            self.rows.restart()  # every row starts a record again
            self.pos = 0
            self.epoch += 1
        self.pos += 1
        return self.rows.next()

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rows.restart()
        self.rows.skip(int(state["pos"]))
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])
