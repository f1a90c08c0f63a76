"""CharRNN: embedding -> LSTM | GRU | RNN (PyTorch's fused kernels) -> linear head.

With weight drop or locked dropout (AWD-LSTM's regularizers, Merity et al. 2017), training
runs the layers one fused call each: `torch.func.functional_call` hands a layer's weights,
its hidden-to-hidden matrix dropped, to a one-layer module of the same cell, so oneDNN (CPU)
or cuDNN (GPU) still runs the whole sequence in one kernel. The trained parameters are the
module's own (`rnn.weight_hh_l0`, ...): the state dict is the same with and without them,
gradients reach them through the drop, and evaluation, sampling and export run the plain
multi-layer call. (PyTorch's `parametrize` on RNN weights silently stops their updates,
pytorch #65688; replacing the module's weight in place loses it on `.to(device)`, #32929.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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
        # One-layer modules without storage of their own (meta device), in a tuple so that
        # they are not submodules: no parameters, nothing in the state dict, nothing to move.
        self._layers = tuple(
            _CELLS[cfg.cell](size, cfg.hidden_size, batch_first=True, device="meta")
            for size in {cfg.embedding_size, cfg.hidden_size}
        ) if self.regularized else ()

    @property
    def regularized(self) -> bool:
        """Whether training runs weight drop or locked dropout (the layer-by-layer path)."""
        return self.cfg.regularized()

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        x = self.embed(idx)  # (B, T, E)
        if self.training and self.regularized:
            out, state = self._regularized(x, state)
        else:
            out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def _regularized(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """The recurrent layers in training with weight drop and locked dropout: one fused
        call per layer, each with its recurrent matrix dropped by a new mask."""
        cfg, names = self.cfg, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        finals: list[list[torch.Tensor]] = []
        for k in range(cfg.num_layers):
            x = locked_dropout(x, cfg.locked_dropout)
            if k > 0:
                x = F.dropout(x, cfg.dropout)  # what the multi-layer module does between layers
            weights = {f"{n}_l0": getattr(self.rnn, f"{n}_l{k}") for n in names}
            weights["weight_hh_l0"] = drop_weight(weights["weight_hh_l0"], cfg.weight_drop)
            layer = self._layers[0] if x.shape[-1] == self._layers[0].input_size else self._layers[-1]
            h0 = None if state is None else state_like([t[k : k + 1] for t in state_to_list(state)], state)
            x, final = functional_call(layer, weights, (x, h0))
            finals.append(state_to_list(final))
        out = locked_dropout(x, cfg.locked_dropout)
        joined = [torch.cat(parts) for parts in zip(*finals, strict=True)]  # (layers, B, H) each
        return out, state_from_list(joined, cfg.cell)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        h = torch.zeros(shape, device=device)
        return (h, torch.zeros_like(h)) if self.cfg.cell == "lstm" else h

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def drop_weight(w: torch.Tensor, p: float) -> torch.Tensor:
    """DropConnect: `w` with each entry zeroed with probability `p` (to 1/65536) and the rest
    scaled by 1/(1-p); `w` itself when `p` is 0. Gradients reach `w` through the kept entries.

    Why not `F.dropout`: its mask draws one random number per entry, and on a CPU that took
    12.8 of a 2x384 step's ~70 ms (profiled, two 1536x384 matrices). Here one 64-bit draw
    gives four entries their 16-bit chances: a third of the time (benchmarks/regularize_speed.py).
    """
    if not p:
        return w
    n = w.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=w.device).random_(-(2**63), None)
    chance = draws.view(torch.int16)[:n].view(w.shape)  # uniform over [-32768, 32767]
    keep = chance >= round(p * 65536) - 32768
    return w * (keep.to(w.dtype) / (1 - p))


def locked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of `x` (B, T, F) with one mask per sequence, the same at every time step
    (variational dropout, Gal & Ghahramani 2016); `x` itself when `p` is 0."""
    if not p:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


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
