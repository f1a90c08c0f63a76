"""Scoring text with the model: held-out bits per character, and the loss of a records batch.

A stream of text is scored as S long rows in parallel, each carrying its hidden state from
chunk to chunk (as training carries it from batch to batch), so little is lost to the cold
start of a row; the rows are read from the ids (a memory-mapped corpus) one chunk at a time.
Records are scored whole, each from a fresh state (`evaluate_records`), read in the same
windows training reads them in (`charlm.data.record_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config.run import scored_chars
from charlm.data.record_batch import RecordBatch, RecordRows
from charlm.data.records import RecordSet, RecordSplit
from charlm.data.streams import Ids, Split, as_array
from charlm.model.network import CharRNN, State, state_like, state_to_list

LN2 = math.log(2.0)


def eval_rows(n: int, max_chars: int | None = None, max_streams: int = 16,
              min_len: int = 512) -> tuple[np.ndarray, int]:
    """How a held-out text of `n` characters is scored: the rows' start offsets (S,) and their
    length. Every character after the first of a row is scored.

    Rows are long (>= `min_len` where the text allows). With `max_chars` (a large corpus),
    S rows of max_chars / S characters are spread evenly over the text instead of covering
    all of it."""
    budget = scored_chars(n, max_chars or 0)
    streams = max(1, min(max_streams, budget // min_len))
    return np.arange(streams, dtype=np.int64) * (n // streams), budget // streams


@torch.inference_mode()
def evaluate(model: CharRNN, ids: Ids, device: torch.device, chunk: int = 1024,
             max_chars: int | None = None) -> tuple[float, int]:
    """Bits per character of `ids` (dropout off; fp32, or the precision of an enclosing
    `torch.autocast`, with the loss summed in fp64) and how many characters were scored;
    `max_chars` caps the characters scored (rows spread over all of `ids`)."""
    ids = as_array(ids)
    starts, length = eval_rows(len(ids), max_chars)
    was_training = model.training
    model.eval()
    total_bits = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state: State | None = None
    for start in range(0, length - 1, chunk):
        end = min(start + chunk + 1, length)  # one more: the last input's target
        window = torch.from_numpy(ids[starts[:, None] + np.arange(start, end)].astype(np.int64)).to(device)
        x, y = window[:, :-1], window[:, 1:]  # (S, T) each
        logits, state = model(x, state)  # (S, T, V); the state carries into the next chunk
        nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total_bits += nats.double() / LN2
        count += y.numel()
    model.train(was_training)
    return float(total_bits) / max(1, count), count


def score_held_out(model: CharRNN, split: Split | RecordSplit, device: torch.device,
                   eval_chars: int = 0) -> tuple[float, int]:
    """Bits per character of a run's held-out part (whole records for a records model), at
    most about `eval_chars` of them (0: all)."""
    if isinstance(split, RecordSplit):
        return evaluate_records(model, split.val, device, max_chars=eval_chars or None)
    return evaluate(model, split.val, device, max_chars=eval_chars or None)


def stream_loss(net: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Mean cross-entropy (nats) of a batch of streams (B, T), and the state it leaves."""
    logits, final = net(x, state)  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)), final


# --- records ------------------------------------------------------------------------------------


def initial_state(batch: RecordBatch, carry: State) -> State:
    """Each batch row's starting state: zero, or its text row's carried state."""
    out = []
    for c in state_to_list(carry):
        h0 = c.new_zeros(c.shape[0], len(batch.seg_row), c.shape[2])
        h0[:, batch.carried] = c[:, batch.seg_row[batch.carried]]
        out.append(h0)
    return state_like(out, carry)


def carry_on(batch: RecordBatch, final: State, carry: State) -> State:
    """The text rows' state after this window (only a record that goes on needs one)."""
    out = []
    for c, f in zip(state_to_list(carry), state_to_list(final), strict=True):
        c = c.clone()
        c[:, batch.out_rows] = f[:, batch.out_segs].to(c.dtype)
        out.append(c)
    return state_like(out, carry)


def record_loss(net: Callable[..., Any], batch: RecordBatch, carry: State) -> tuple[torch.Tensor, State]:
    """Mean cross-entropy (nats) over a batch's real positions, and the rows' state to carry."""
    logits, final = net(batch.x, initial_state(batch, carry))  # (S, L, V)
    loss = F.cross_entropy(logits[batch.mask].float(), batch.y[batch.mask])
    return loss, carry_on(batch, final, carry)


@torch.inference_mode()
def record_bits(model: CharRNN, rs: RecordSet, device: torch.device, window: int = 1024,
                max_rows: int = 16) -> np.ndarray:
    """Bits of each record (float64, (R,)): its characters and its end marker, each record
    read from a fresh state; `max_rows` rows read `window` positions at a time."""
    if rs.count == 0:
        return np.zeros(0, dtype=np.float64)
    rows = RecordRows(rs, min(max_rows, rs.count), window, device)
    was_training = model.training
    model.eval()
    bits = np.zeros(rs.count, dtype=np.float64)
    carry = model.init_state(len(rows), device)
    while not rows.done:
        batch = rows.next()
        logits, final = model(batch.x, initial_state(batch, carry))
        nats = F.cross_entropy(logits.float().transpose(1, 2), batch.y, reduction="none")  # (S, L)
        per_row = (nats * batch.mask).sum(1).double().cpu().numpy()
        bits += np.bincount(batch.record, weights=per_row / LN2, minlength=rs.count)
        carry = carry_on(batch, final, carry)
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
