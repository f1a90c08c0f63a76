"""CharRNN: embedding -> LSTM | GRU | RNN (PyTorch's fused kernels) -> linear head."""

from __future__ import annotations

import torch
from torch import nn

from charlm.config.run import ModelConfig

# LSTM state is (h, c); GRU and RNN state is h alone. Each is (layers, B, H).
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    """Character language model; `forward` takes and returns the recurrent state."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.embedding_size)
        # One fused multi-layer kernel (oneDNN / cuDNN): no per-timestep Python loop.
        self.rnn = _CELLS[cfg.cell](
            cfg.embedding_size,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        x = self.embed(idx)  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        h = torch.zeros(shape, device=device)
        return (h, torch.zeros_like(h)) if self.cfg.cell == "lstm" else h

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Cut the graph at the batch boundary: gradients flow through `seq_len` steps only
    (truncated BPTT), while the values still carry context from earlier batches."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def state_to_list(state: State) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def state_from_list(tensors: list[torch.Tensor], cell: str) -> State:
    return (tensors[0], tensors[1]) if cell == "lstm" else tensors[0]


def state_like(tensors: list[torch.Tensor], like: State) -> State:
    """`tensors` in the form of `like`: an (h, c) pair, or h alone."""
    return (tensors[0], tensors[1]) if isinstance(like, tuple) else tensors[0]
