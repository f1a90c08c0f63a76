"""One recurrent step for N rows of a CharRNN, in buffers allocated once (the sampler's engine).

Steps do not go through `nn.LSTM`, whose fused kernel is built for long sequences and costs
milliseconds per call at one character: a `Stepper` runs the same cell math with `addmm` and
in-place pointwise ops, with layer 0's input projection precomputed per vocabulary id.
"""

from __future__ import annotations

import torch
from torch import nn

from charlm.model.network import CharRNN, State
from charlm.model.size import GATES


class Stepper:
    """One recurrent step for N rows of a CharRNN, in buffers allocated once.

    Same math as `nn.LSTM` / `nn.GRU` / `nn.RNN` (only the order of float additions
    differs), laid out for single steps:
    - layer 0's input projection `embed @ W_ih.T + b` is a (V, G*H) table, so embedding
      plus input matmul become one row gather;
    - all layers' hidden states live side by side in `hs` (N, L*H), so layer l's input and
      its own state, [h_{l-1} | h_l], are one contiguous column range: LSTM and RNN layers
      above 0 do a single addmm with [W_ih | W_hh];
    - LSTM gate rows are reordered (i, f, g, o) -> (i, f, o, g): one sigmoid, one tanh.
    """

    def __init__(self, model: CharRNN, n: int, device: torch.device) -> None:
        rnn: nn.RNNBase = model.rnn
        self.cell = model.cfg.cell
        self.relu = getattr(rnn, "nonlinearity", "tanh") == "relu"
        L, H = rnn.num_layers, rnn.hidden_size
        self.L, self.H, self.n = L, H, n
        emb = model.embed.weight.detach().to(device)  # (V, E)
        dtype = emb.dtype
        w = lambda name: getattr(rnn, name).detach().to(device)  # noqa: E731
        G = GATES[self.cell]
        # LSTM rows (i, f, g, o) -> (i, f, o, g); others keep their order.
        perm = (torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                           torch.arange(2 * H, 3 * H)]).to(device) if self.cell == "lstm" else None)
        order = (lambda t: t.index_select(0, perm)) if perm is not None else (lambda t: t)
        self.table = torch.empty(0)  # (V, G*H), set for layer 0 below
        self.w: list[torch.Tensor] = []  # per layer, transposed for addmm: (K, G*H)
        self.b: list[torch.Tensor] = []
        self.w_hh: list[torch.Tensor] = []  # GRU keeps input and hidden parts apart
        self.b_hh: list[torch.Tensor] = []
        for l in range(L):
            w_ih, w_hh = w(f"weight_ih_l{l}"), w(f"weight_hh_l{l}")
            b_ih = w(f"bias_ih_l{l}") if rnn.bias else torch.zeros(G * H, dtype=dtype, device=device)
            b_hh = w(f"bias_hh_l{l}") if rnn.bias else torch.zeros(G * H, dtype=dtype, device=device)
            if self.cell == "gru":
                # n = tanh(W_in x + b_in + r * (W_hn h + b_hn)): the hidden part stays separate.
                if l == 0:
                    self.table = torch.addmm(b_ih, emb, w_ih.t())
                    self.w.append(torch.empty(0, device=device))
                    self.b.append(torch.empty(0, device=device))
                else:
                    self.w.append(w_ih.t().contiguous())
                    self.b.append(b_ih)
                self.w_hh.append(w_hh.t().contiguous())
                self.b_hh.append(b_hh)
                continue
            bias = order(b_ih + b_hh)
            if l == 0:
                self.table = torch.addmm(bias, emb, order(w_ih).t()).contiguous()
                self.w.append(order(w_hh).t().contiguous())  # (H, G*H)
                self.b.append(bias)
            else:
                self.w.append(order(torch.cat([w_ih, w_hh], dim=1)).t().contiguous())  # (2H, G*H)
                self.b.append(bias)
        self.head_w = model.head.weight.detach().to(device).t().contiguous()  # (H, V)
        self.head_b = model.head.bias.detach().to(device)
        self.vocab_size = self.head_w.shape[1]
        self.dtype, self.device = dtype, device
        self.resize(n)

    def resize(self, n: int) -> None:
        """Buffers for `n` rows, every state zero (the weights are kept): a batch whose rows
        change (`charlm.generation.batch`) fills them with `set_rows`, from `state_rows`."""
        L, H, dtype, device = self.L, self.H, self.dtype, self.device
        G = GATES[self.cell]
        self.n = n
        self.hs = torch.zeros(n, L * H, dtype=dtype, device=device)  # [h_0 | h_1 | ...]
        self.h = [self.hs[:, l * H:(l + 1) * H] for l in range(L)]  # views, (N, H)
        # [h_{l-1} | h_l] for layers above 0 (layer 0 reads its input from `table`)
        self.inp = [self.hs[:, :0]] + [self.hs[:, (l - 1) * H:(l + 1) * H] for l in range(1, L)]
        self.top = self.h[-1]
        self.gates = torch.empty(L, n, G * H, dtype=dtype, device=device)
        g = self.gates
        if self.cell == "lstm":
            self.c = torch.zeros(L, n, H, dtype=dtype, device=device)
            self.tmp = torch.empty(n, H, dtype=dtype, device=device)
            self.sig = [g[l, :, :3 * H] for l in range(L)]
            self.i = [g[l, :, :H] for l in range(L)]
            self.f = [g[l, :, H:2 * H] for l in range(L)]
            self.o = [g[l, :, 2 * H:3 * H] for l in range(L)]
            self.g = [g[l, :, 3 * H:] for l in range(L)]
        elif self.cell == "gru":
            self.gh = torch.empty(L, n, 3 * H, dtype=dtype, device=device)
            self.rz = [g[l, :, :2 * H] for l in range(L)]
            self.ghrz = [self.gh[l, :, :2 * H] for l in range(L)]
            self.r = [g[l, :, :H] for l in range(L)]
            self.z = [g[l, :, H:2 * H] for l in range(L)]
            self.cand = [g[l, :, 2 * H:] for l in range(L)]
            self.ghn = [self.gh[l, :, 2 * H:] for l in range(L)]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every row's state: h as (N, L*H) and, for an LSTM, c as (L, N, H) (views)."""
        return self.hs, self.c if self.cell == "lstm" else None

    def set_rows(self, hs: torch.Tensor, c: torch.Tensor | None) -> None:
        """Set every row's state from (N, L*H) and, for an LSTM, (L, N, H) tensors."""
        self.hs.copy_(hs)
        if c is not None:
            self.c.copy_(c)

    def state_rows(self, state: State | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`state` ((L, 1 or n, H) tensors, as the model returns; None: zeros) as `n` rows laid
        out as `rows` gives them: h (n, L*H) and, for an LSTM, c (L, n, H)."""
        L, H = self.L, self.H
        hs = torch.zeros(n, L * H, dtype=self.dtype, device=self.device)
        c = torch.zeros(L, n, H, dtype=self.dtype, device=self.device) if self.cell == "lstm" else None
        if state is not None:
            h = state[0] if isinstance(state, tuple) else state
            hs.copy_(h.transpose(0, 1).reshape(-1, L * H).expand(n, -1))  # row r: [h_0[r] | h_1[r] | ...]
            if c is not None and isinstance(state, tuple):
                c.copy_(state[1].expand(-1, n, -1))
        return hs, c

    def set_state(self, state: State) -> None:
        """Start every row from `state` ((L, 1 or N, H) tensors, as the model returns)."""
        self.set_rows(*self.state_rows(state, self.n))

    def step(self, ids: torch.Tensor) -> None:
        """Feed ids (N,) int64; the new top-layer output is `self.top` (N, H)."""
        if self.cell == "lstm":
            self._lstm(ids)
        elif self.cell == "gru":
            self._gru(ids)
        else:
            self._rnn(ids)

    def _lstm(self, ids: torch.Tensor) -> None:
        for l in range(self.L):
            g, c = self.gates[l], self.c[l]
            if l == 0:
                torch.index_select(self.table, 0, ids, out=g)
                g.addmm_(self.h[0], self.w[0])
            else:
                torch.addmm(self.b[l], self.inp[l], self.w[l], out=g)
            self.sig[l].sigmoid_()
            self.g[l].tanh_()
            c.mul_(self.f[l]).addcmul_(self.i[l], self.g[l])  # c = f*c + i*g
            torch.tanh(c, out=self.tmp)
            torch.mul(self.o[l], self.tmp, out=self.h[l])  # h = o*tanh(c)

    def _gru(self, ids: torch.Tensor) -> None:
        for l in range(self.L):
            gi, gh, h = self.gates[l], self.gh[l], self.h[l]
            if l == 0:
                torch.index_select(self.table, 0, ids, out=gi)
            else:
                torch.addmm(self.b[l], self.h[l - 1], self.w[l], out=gi)
            torch.addmm(self.b_hh[l], h, self.w_hh[l], out=gh)
            self.rz[l].add_(self.ghrz[l]).sigmoid_()
            n = self.cand[l].add_(self.ghn[l].mul_(self.r[l])).tanh_()  # tanh(gi_n + r*gh_n)
            h.sub_(n).mul_(self.z[l]).add_(n)  # h = (1-z)*n + z*h

    def _rnn(self, ids: torch.Tensor) -> None:
        for l in range(self.L):
            pre = self.gates[l]
            if l == 0:
                torch.index_select(self.table, 0, ids, out=pre)
                pre.addmm_(self.h[0], self.w[0])
            else:
                torch.addmm(self.b[l], self.inp[l], self.w[l], out=pre)
            if self.relu:
                torch.clamp(pre, min=0, out=self.h[l])
            else:
                torch.tanh(pre, out=self.h[l])
