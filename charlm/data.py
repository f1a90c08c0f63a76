"""The encoded corpus, its train/validation split, and the stream layout for truncated BPTT.

The training part is cut into B equal contiguous streams, one per batch row; batch k is
the window [pos, pos + T) of every stream, so row b of batch k+1 continues row b of batch k
and the hidden state can be carried across batches:

    stream 0: |--batch 0--|--batch 1--|--batch 2--| ...
    stream 1: |--batch 0--|--batch 1--|--batch 2--| ...
       ...          (B rows, each len(train) // B characters)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from charlm.errors import CharLMError


@dataclass
class Split:
    """Encoded corpus cut into the training part and the held-out tail."""

    train: torch.Tensor  # (N_train,) small-int ids
    val: torch.Tensor  # (N_val,) the last `val_fraction` of the corpus


def split(ids: torch.Tensor, val_fraction: float) -> Split:
    """Hold out the last `val_fraction` of the corpus (the latest documents) for validation."""
    n_val = max(2, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise CharLMError(f"corpus is too small to train on: {len(ids)} characters")
    return Split(ids[:-n_val], ids[-n_val:])


class StreamBatcher:
    """Yields (x, y) windows of B contiguous streams; its position is part of a checkpoint."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, device: torch.device):
        usable = len(ids) - 1  # the last character is only ever a target
        stream_len = usable // batch_size
        if stream_len < 1:
            raise CharLMError(
                f"training text ({len(ids)} characters) is too short for --batch-size "
                f"{batch_size}; use a smaller batch or more text"
            )
        # Inputs and targets as (B, L) views of one preloaded tensor: a batch is a slice.
        data = ids[: stream_len * batch_size + 1].to(device=device, dtype=torch.long)
        self.x = data[:-1].view(batch_size, stream_len)
        self.y = data[1:].view(batch_size, stream_len)
        self.seq_len = min(seq_len, stream_len)
        self.stream_len = stream_len
        self.pos = 0
        self.epoch = 0

    @property
    def chars_per_batch(self) -> int:
        return self.x.shape[0] * self.seq_len

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next window (x, y, each (B, T)) and whether it starts a new pass (reset state)."""
        if self.pos + self.seq_len > self.stream_len:
            # Drop the ragged tail and start a new pass over the streams.
            self.pos = 0
            self.epoch += 1
        start = self.pos
        self.pos += self.seq_len
        window = slice(start, start + self.seq_len)
        return self.x[:, window], self.y[:, window], start == 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def eval_streams(ids: torch.Tensor, max_streams: int = 16, min_len: int = 512) -> torch.Tensor:
    """Held-out text as (S, L) rows, evaluated in parallel with carried state.

    Every character after the first of each row is scored; rows are long (>= `min_len`
    where the text allows) so little is lost to the cold start of each row.
    """
    n = len(ids)
    streams = max(1, min(max_streams, n // min_len))
    length = n // streams
    return ids[: streams * length].view(streams, length).long()
