"""What a run reads: the corpus in its model's vocabulary, which part is held out, and the
stream layout for truncated BPTT.

The corpus cache (`charlm.data.cache`) holds ids in the corpus's own vocabulary. A model's
vocabulary can be larger: records mode adds its two markers, and fine-tuning keeps every
character the earlier model knew. The ids are then read through a table, a window at a time
(`Translated`, `charlm.data.records.RecordSet`), never translated into a copy.

Which text is held out is decided here once (`split_data`): the last `val_fraction` of the
characters of a stream of text, the last `val_fraction` of the records of a records model.
Training, evaluation, the planner, `charlm inspect`'s default passage and the novelty index
all take it from there.

The training part is cut into B equal contiguous streams, one per batch row; batch k is
the window [pos, pos + T) of every stream, so row b of batch k+1 continues row b of batch k
and the hidden state can be carried across batches:

    stream 0: |--batch 0--|--batch 1--|--batch 2--| ...
    stream 1: |--batch 0--|--batch 1--|--batch 2--| ...
       ...          (B rows, each len(train) // B characters)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from charlm.data.checked import CheckedIds
from charlm.data.records import MARKERS, RecordSet, RecordSplit, check_markers, record_set
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError

if TYPE_CHECKING:
    from charlm.data.cache import EncodedCorpus


class Translated:
    """Corpus ids read through a table (corpus id -> model id), a window at a time: a corpus
    whose model has a larger vocabulary (fine-tuning merges vocabularies) trains from its
    cached ids as they are, with no translated copy of the corpus. Slices stay views."""

    def __init__(self, ids: np.ndarray | CheckedIds, table: np.ndarray) -> None:
        self.ids = ids
        self.table = table.astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Translated(self.ids[index], self.table)
        return self.table[np.asarray(self.ids[index])]

    def tolist(self) -> list[int]:
        return self.table[np.asarray(self.ids)].tolist()


# A memory-mapped corpus (its blocks checked as read), maybe read through a table
Array = Union[np.ndarray, CheckedIds, Translated]
Ids = Union[Array, torch.Tensor]  # ... or any 1-D id tensor


@dataclass
class Split:
    """Encoded corpus cut into the training part and the held-out tail (views, not copies)."""

    train: Array  # (N_train,) small-int ids
    val: Array  # (N_val,) the last `val_fraction` of the corpus

    @property
    def train_end(self) -> int:
        """Where the training text ends in the corpus ids."""
        return len(self.train)

    @property
    def val_start(self) -> int:
        """Where the held-out text starts in the corpus ids."""
        return len(self.train)


def as_array(ids: Ids) -> Array:
    """A 1-D numpy view of `ids` (a memmap stays a memmap; a tensor is shared, not copied; a
    `Translated` view stays one)."""
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy()
    return ids


def split(ids: Ids, val_fraction: float) -> Split:
    """Hold out the last `val_fraction` of the corpus (the latest documents) for validation."""
    ids = as_array(ids)
    n_val = max(2, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise CharLMError(f"corpus is too small to train on: {len(ids)} characters")
    return Split(ids[:-n_val], ids[-n_val:])


def split_data(data: Ids | RecordSet, val_fraction: float) -> Split | RecordSplit:
    """What a run trains on and what it holds out: whole records for a records model, else the
    last `val_fraction` of the characters."""
    if isinstance(data, RecordSet):
        return data.split(val_fraction)
    return split(data, val_fraction)


def model_vocab(corpus_chars: str, records: str = "", base_chars: str = "") -> Vocab:
    """The vocabulary of a new model: the corpus's characters, the record markers in records
    mode, and every character of the model it starts from (`base_chars`), by code point."""
    if records:
        check_markers(corpus_chars, records)
    chars = set(corpus_chars) | set(base_chars) | (set(MARKERS) if records else set())
    return Vocab("".join(sorted(chars)))


def training_data(corpus: EncodedCorpus, vocab: Vocab, records: str = "") -> Ids | RecordSet:
    """The corpus as the Trainer reads it for a model with `vocab`: its ids (read through a
    table when the vocabularies differ), or its records (`records` mode). Raises
    `CharLMError` when a corpus character has no id in `vocab` or records cannot be split."""
    missing = sorted(set(corpus.vocab.chars) - set(vocab.chars))
    if missing:
        raise CharLMError(f"the corpus holds characters the model's vocabulary lacks: "
                          f"{', '.join(repr(c) for c in missing[:20])}")
    if records:
        rs = record_set(corpus.ids, corpus.vocab, vocab, records)
        rs.split(0.0)  # refuses a corpus of fewer than two records, before anything is written
        return rs
    if corpus.vocab.chars == vocab.chars:
        return corpus.ids
    return Translated(corpus.ids, vocab.table_from(corpus.vocab))


class StreamBatcher:
    """Yields (x, y) windows of B contiguous streams; its position is part of a checkpoint.

    The ids stay where they are (a memory-mapped corpus of gigabytes is never copied): each
    batch gathers its B windows of T + 1 characters. `rows` picks which of the B streams this
    process trains on (a slice of them per rank in distributed training).
    """

    def __init__(self, ids: Ids, batch_size: int, seq_len: int, device: torch.device,
                 rows: range | None = None) -> None:
        self.ids = as_array(ids)
        usable = len(self.ids) - 1  # the last character is only ever a target
        stream_len = usable // batch_size
        if stream_len < 1:
            raise CharLMError(
                f"training text ({len(self.ids)} characters) is too short for --batch-size "
                f"{batch_size}; use a smaller batch or more text"
            )
        rows = rows if rows is not None else range(batch_size)
        self.starts = np.asarray(rows, dtype=np.int64)[:, None] * stream_len  # (B, 1)
        self.device = device
        self.seq_len = min(seq_len, stream_len)
        self.stream_len = stream_len
        self.pos = 0
        self.epoch = 0

    @property
    def chars_per_batch(self) -> int:
        return len(self.starts) * self.seq_len

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next window (x, y, each (B, T)) and whether it starts a new pass (reset state)."""
        if self.pos + self.seq_len > self.stream_len:
            # Drop the ragged tail and start a new pass over the streams.
            self.pos = 0
            self.epoch += 1
        start = self.pos
        self.pos += self.seq_len
        index = self.starts + np.arange(start, start + self.seq_len + 1)  # (B, T + 1)
        window = torch.from_numpy(self.ids[index].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return window[:, :-1], window[:, 1:], start == 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def translate(ids: Ids, table: np.ndarray, chunk: int = 1 << 24) -> tuple[np.ndarray, int]:
    """`ids` mapped through `table` (old id -> new id, -1 for none), a chunk at a time, with
    the unmapped ones dropped: the ids and how many were dropped."""
    ids = as_array(ids)
    known = table[table >= 0]
    dtype = np.min_scalar_type(int(known.max()) if len(known) else 0)
    parts = []
    for start in range(0, len(ids), chunk):
        mapped = table[ids[start:start + chunk]]
        parts.append(mapped[mapped >= 0].astype(dtype))
    out = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return out, len(ids) - len(out)
