"""Batches of records: rows of truncated-BPTT windows, the state reset at every record start.

The records are laid end to end, each as its start marker and its characters (its targets:
the characters and the end marker), and cut into B rows at record boundaries, rows of about
equal length; batch k is the window [kT, kT + T) of every row:

    row 0: |S a n n S b o b S c a r o l S d| a v e S e ...     (S: a start marker)
    row 1: |S e l l a S f r a n k S g r a c| e S h a l ...
            '---------- window 0 ----------''-- window 1 ...

A window holds the ends and starts of several records. Zeroing the state at a record start
inside a window would need a Python loop over its T steps, so instead each window is split
at its record starts into segments, and the segments of all rows run through the model's
fused recurrent kernel as one packed batch (`torch.nn.utils.rnn.PackedSequence`): a segment
that starts a record starts from a zero state; the first segment of a row that continues a
record from the previous window starts from that row's carried state; the state at the end
of a row's last segment is carried to its next window. So a record longer than T is trained
in pieces of T with its state carried from piece to piece (the gradient stops at the window
edge, as in stream mode), and nothing crosses from one record to the next. The output layer
reads only real positions: there is no padding to pay for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from charlm.errors import CharLMError
from charlm.evaluate import LN2
from charlm.model import CharRNN, State, state_from_list, state_to_list
from charlm.records import RecordSet


@dataclass
class RecordBatch:
    """One window of every row, as packed segments."""

    x: PackedSequence  # input ids, one sequence per segment
    y: torch.Tensor  # (N,) target ids in the packed order
    record: np.ndarray  # (N,) which record (of the RecordSet) each target belongs to
    seg_row: torch.Tensor  # (S,) the row of each segment
    carried: torch.Tensor  # (S,) segment numbers that continue a record from the row's previous window
    rows: torch.Tensor  # rows with a segment in this window ...
    last: torch.Tensor  # ... and the number of their last segment

    @property
    def chars(self) -> int:
        return len(self.y)

    def initial_state(self, carry: State) -> State:
        """Each segment's starting state: zero, or its row's carried state."""
        out = []
        for c in state_to_list(carry):
            h0 = c.new_zeros(c.shape[0], len(self.seg_row), c.shape[2])
            h0[:, self.carried] = c[:, self.seg_row[self.carried]]
            out.append(h0)
        return _as_state(out, carry)

    def carry(self, final: State, carry: State) -> State:
        """The rows' state after this window: their last segment's final state (rows with no
        segment keep theirs; they are past their end until the next pass)."""
        out = []
        for c, f in zip(state_to_list(carry), state_to_list(final), strict=True):
            c = c.clone()
            c[:, self.rows] = f[:, self.last].to(c.dtype)
            out.append(c)
        return _as_state(out, carry)


def _as_state(tensors: list[torch.Tensor], like: State) -> State:
    return state_from_list(tensors, "lstm" if isinstance(like, tuple) else "gru")


class RecordRows:
    """A RecordSet cut into rows at record boundaries; `window` builds the batch of any window."""

    def __init__(self, rs: RecordSet, n_rows: int, rows: range | None = None) -> None:
        self.rs = rs
        count = rs.count
        if count < n_rows:
            raise CharLMError(f"--records: {count:,} training records are fewer than the {n_rows} rows of a "
                              "batch (--batch-size); use a smaller --batch-size or more records")
        # Each record is its start marker and its characters: lengths + 1 positions.
        self.off = np.concatenate([[0], np.cumsum(rs.lengths + 1)]).astype(np.int64)  # (R + 1,)
        self.total = int(self.off[-1])
        first = np.searchsorted(self.off[:-1], np.arange(n_rows + 1) * self.total // n_rows, side="left")
        first[0], first[-1] = 0, count
        for b in range(1, n_rows):  # every row gets at least one record
            first[b] = min(max(first[b], first[b - 1] + 1), count - (n_rows - b))
        mine = np.asarray(rows if rows is not None else range(n_rows), dtype=np.int64)
        self.row_start = self.off[first[mine]]  # (B,)
        self.row_end = self.off[first[mine + 1]]
        self.longest = int((self.row_end - self.row_start).max())

    def __len__(self) -> int:
        return len(self.row_start)

    def window(self, pos: int, length: int, device: torch.device) -> RecordBatch:
        """Positions [pos, pos + length) of every row, split at record starts."""
        rs, T, B = self.rs, length, len(self)
        p = self.row_start[:, None] + pos + np.arange(T + 1)  # (B, T + 1)
        valid = p[:, :T] < self.row_end[:, None]  # a prefix of each row
        p = np.minimum(p, self.total)
        rec = np.searchsorted(self.off, p, side="right") - 1  # (B, T + 1), R at the very end
        inside = p > self.off[rec]  # a character; else a record's start marker
        src = np.where(inside, rs.starts[np.minimum(rec, rs.count - 1)] + p - self.off[rec] - 1, 0)
        chars = rs.table[np.asarray(rs.ids[src.ravel()]).astype(np.int64)].reshape(src.shape)
        tok = np.where(inside, chars, rs.start_id)
        x = tok[:, :T]
        y = np.where(inside[:, 1:], tok[:, 1:], rs.end_id)  # the next record's start: this one's end
        # Segments: a row's first valid position, and every record start.
        begins = valid & ((x == rs.start_id) | (np.arange(T) == 0))
        flat = np.flatnonzero(begins)  # row-major: segments ordered by row, then position
        seg_row = flat // T
        row_stop = seg_row * T + valid.sum(1)[seg_row]
        lengths = np.minimum(np.append(flat[1:], B * T), row_stop) - flat
        index = np.minimum(flat[:, None] + np.arange(int(lengths.max())), B * T - 1)  # (S, Lmax)
        lengths_t = torch.from_numpy(lengths)

        def pack(a: np.ndarray, to: torch.device | None = None) -> PackedSequence:
            padded = torch.from_numpy(np.ascontiguousarray(a.ravel()[index]))
            return pack_padded_sequence(padded if to is None else padded.to(to), lengths_t, batch_first=True,
                                        enforce_sorted=False)

        xs, ys, records = pack(x, device), pack(y, device), pack(rec[:, :T])
        carried = np.flatnonzero(x.ravel()[flat] != rs.start_id)
        rows = np.flatnonzero(valid[:, 0])
        last = np.searchsorted(seg_row, rows, side="right") - 1
        to = (lambda a: torch.from_numpy(a).to(device))  # noqa: E731
        return RecordBatch(xs, ys.data, records.data.numpy(), to(seg_row), to(carried),
                           to(rows), to(last))


class RecordBatcher:
    """Training windows over the rows of the training records; its position is part of a
    checkpoint (as `charlm.data.StreamBatcher`'s)."""

    def __init__(self, rs: RecordSet, batch_size: int, seq_len: int, device: torch.device,
                 rows: range | None = None) -> None:
        self.rows = RecordRows(rs, batch_size, rows)
        self.starts = self.rows.row_start  # one per row of this process (as StreamBatcher's)
        self.seq_len = seq_len
        self.device = device
        self.pos = 0
        self.epoch = 0

    @property
    def chars_per_batch(self) -> int:
        return len(self.rows) * self.seq_len

    def next(self) -> RecordBatch:
        if self.pos >= self.rows.longest:
            self.pos = 0  # every row starts a record again: the state resets by itself
            self.epoch += 1
        start = self.pos
        self.pos += self.seq_len
        return self.rows.window(start, self.seq_len, self.device)

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def packed_loss(net: Callable[..., Any], batch: RecordBatch, carry: State) -> tuple[torch.Tensor, State]:
    """Mean cross-entropy (nats) of a batch's targets and the rows' state to carry."""
    logits, final = net(batch.x, batch.initial_state(carry))  # (N, V)
    loss = F.cross_entropy(logits.float(), batch.y)
    return loss, batch.carry(final, carry)


@torch.inference_mode()
def record_bits(model: CharRNN, rs: RecordSet, device: torch.device, chunk: int = 1024,
                max_rows: int = 16) -> np.ndarray:
    """Bits of each record (float64, (R,)): its characters and its end marker, each record
    read from a fresh state, in `max_rows` rows of `chunk`-long windows."""
    if rs.count == 0:
        return np.zeros(0, dtype=np.float64)
    rows = RecordRows(rs, min(max_rows, rs.count))
    was_training = model.training
    model.eval()
    bits = np.zeros(rs.count, dtype=np.float64)
    carry = model.init_state(len(rows), device)
    for pos in range(0, rows.longest, chunk):
        batch = rows.window(pos, chunk, device)
        logits, final = model(batch.x, batch.initial_state(carry))
        nats = F.cross_entropy(logits.float(), batch.y, reduction="none").double().cpu().numpy()
        bits += np.bincount(batch.record, weights=nats / LN2, minlength=rs.count)
        carry = batch.carry(final, carry)
    model.train(was_training)
    return bits


def evaluate_records(model: CharRNN, rs: RecordSet, device: torch.device,
                     max_chars: int | None = None) -> tuple[float, int]:
    """Bits per character of whole records (end markers counted, start markers not) and the
    characters scored; with `max_chars`, every k-th record, so that about that many are scored."""
    if max_chars and len(rs) > max_chars:
        step = -(-len(rs) // max_chars)
        rs = rs.subset(np.arange(0, rs.count, step))
    bits = record_bits(model, rs, device)
    return float(bits.sum()) / max(1, len(rs)), len(rs)
