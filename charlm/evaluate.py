"""Held-out bits per character.

The held-out ids are scored as S long rows in parallel, each carrying its hidden state from
chunk to chunk (as training carries it from batch to batch), so little is lost to the cold
start of a row; the rows are read from the ids (a memory-mapped corpus) one chunk at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from charlm.data import Ids, as_array
from charlm.model import CharRNN, State

LN2 = math.log(2.0)


def eval_rows(n: int, max_chars: int | None = None, max_streams: int = 16,
              min_len: int = 512) -> tuple[np.ndarray, int]:
    """How a held-out text of `n` characters is scored: the rows' start offsets (S,) and their
    length. Every character after the first of a row is scored.

    Rows are long (>= `min_len` where the text allows). With `max_chars` (a large corpus),
    S rows of max_chars / S characters are spread evenly over the text instead of covering
    all of it."""
    budget = n if not max_chars or max_chars >= n else max(2, max_chars)
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
