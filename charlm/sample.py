"""Sampling: temperature / top-k / top-p, streamed one character at a time.

The prime is read in one forward pass of the model; after that each step feeds one
character per row and carries the recurrent state (nothing is re-read). Steps do not go
through `nn.LSTM` (whose fused kernel is built for long sequences and costs milliseconds
per call at one character): a `_Stepper` runs the same cell math with `addmm` and in-place
pointwise ops on buffers allocated once, with layer 0's input projection precomputed per
vocabulary id. Sampling is the Gumbel-max trick (argmax of logits / T plus Gumbel noise, an
exact draw from softmax(logits / T)); the noise is drawn in blocks from a private
`torch.Generator`, so sampling never touches the global RNG (training previews rely on
that) and the same seed gives the same text. The host sees one small copy per step: the
picked ids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from charlm.errors import CharLMError
from charlm.model import CharRNN, State
from charlm.sample_options import SampleOptions
from charlm.vocab import Vocab

_NOISE_FLOATS = 1 << 20  # Gumbel noise drawn at a time: (steps, N, V) with steps*N*V about this
_MAX_BLOCK = 256  # ... and at most this many steps per block


class Sampler:
    """Generates text from a model; the CLI, the Python API and training previews share it."""

    def __init__(self, model: CharRNN, vocab: Vocab, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.vocab = vocab
        self.device = torch.device(device)

    def prime_ids(self, prime: str, unknown: str = "error") -> torch.Tensor:
        """Ids of the prime; unknown characters raise (naming them) or are skipped."""
        missing = self.vocab.unknown(prime)
        if missing and unknown != "skip":
            names = " ".join(repr(c) for c in missing[:20])
            raise CharLMError(f"--prime: characters not in the model's vocabulary: {names} "
                              "(use --unknown skip to drop them)")
        return self.vocab.encode(prime, unknown="skip")

    def generate(self, opts: SampleOptions) -> Iterator[str]:
        """Yield the characters of one sample as they are generated (prime not included)."""
        for chars in self.generate_batch(replace(opts, num_samples=1)):
            if chars[0]:
                yield chars[0]

    @torch.inference_mode()
    def generate_batch(self, opts: SampleOptions) -> Iterator[list[str]]:
        """Yield, per step, one new character for each of `opts.num_samples` rows generated as
        one batch ("" for a row that has already produced `opts.stop`)."""
        opts.check()
        if opts.length == 0:
            return
        n, model, vocab = opts.num_samples, self.model, self.vocab
        was_training = model.training
        model.eval()  # dropout off while reading the prime
        try:
            ids = self.prime_ids(opts.prime, opts.unknown).tolist()
            if not ids:
                # No prime: start as at a document boundary (or from the first character).
                ids = [vocab.encode("\n")[0].item() if "\n" in vocab else 0]
            stepper = _Stepper(model, n, self.device)
            if len(ids) > 1:  # the last prime character is the first step's input
                stepper.set_state(_read(model, ids[:-1], self.device))
            seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            pick = _Picker(stepper, opts, torch.Generator().manual_seed(seed))
            cur = torch.full((n,), ids[-1], dtype=torch.int64, device=self.device)  # (N,)
            chars, stop_s = vocab.chars, opts.stop
            done = [False] * n
            tails = [""] * n
            for i in range(opts.length):
                stepper.step(cur)
                pick(i, cur)  # writes the next ids into `cur`
                picked = cur.tolist()  # the one host sync of the step
                if not stop_s:
                    yield [chars[idx] for idx in picked]
                    continue
                out = []
                for row, idx in enumerate(picked):
                    if done[row]:
                        out.append("")
                        continue
                    ch = chars[idx]
                    out.append(ch)
                    tails[row] = (tails[row] + ch)[-len(stop_s):]
                    done[row] = tails[row] == stop_s
                yield out
                if all(done):
                    break
        finally:
            model.train(was_training)


def _read(model: CharRNN, ids: list[int], device: torch.device, chunk: int = 4096) -> State:
    """Recurrent state after reading `ids` (batch 1: every row starts from it), through the
    model's fused kernel a chunk at a time; the output layer is skipped (only the state is
    needed), so a long --prime-file costs no (P, V) logits."""
    x = torch.tensor(ids, device=device)[None]  # (1, P)
    state = None
    for start in range(0, x.shape[1], chunk):
        _, state = model.rnn(model.embed(x[:, start:start + chunk]), state)
    assert state is not None  # `ids` is never empty
    return state


class _Stepper:
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
        G = {"lstm": 4, "gru": 3, "rnn": 1}[self.cell]
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

    def set_state(self, state: State) -> None:
        """Start every row from `state` ((L, 1 or N, H) tensors, as the model returns)."""
        h = state[0] if isinstance(state, tuple) else state
        for l in range(self.L):
            self.h[l].copy_(h[l].expand(self.n, -1))
        if self.cell == "lstm":
            self.c.copy_(state[1].expand(-1, self.n, -1))

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


class _Picker:
    """Next ids from the stepper's top-layer output: greedy, or Gumbel-max over logits / T
    (after the top-k / top-p filters). 1/T is folded into the head's weights, and without
    filters the noise block also carries the head's bias, so a plain sampling step is one
    addmm plus one argmax."""

    def __init__(self, stepper: _Stepper, opts: SampleOptions, gen: torch.Generator) -> None:
        self.top, self.n, V = stepper.top, stepper.n, stepper.vocab_size
        self.gen = gen
        t, w, b = opts.temperature, stepper.head_w, stepper.head_b
        # Logits / T beyond float range: sampling at such a T is greedy (ties aside).
        bound = float((w.abs().sum(0) + b.abs()).max()) / t if t > 0 else math.inf
        self.greedy = t == 0 or not math.isfinite(bound) or bound > 1e30
        if not self.greedy:
            w, b = w / t, b / t
        self.w, self.b = w, b
        self.top_k = opts.top_k if 0 < opts.top_k < V else 0
        self.top_p = opts.top_p if opts.top_p < 1.0 else 0.0
        self.filtered = bool(self.top_k or self.top_p)
        self.scores = torch.empty(self.n, V, dtype=w.dtype, device=w.device)  # (N, V)
        self.block = max(1, min(_MAX_BLOCK, opts.length, _NOISE_FLOATS // (self.n * V)))
        self.noise: list[torch.Tensor] = []

    def __call__(self, i: int, out: torch.Tensor) -> None:
        scores = self.scores
        if self.greedy:
            torch.addmm(self.b, self.top, self.w, out=scores)
            torch.argmax(scores, dim=1, out=out)
            return
        j = i % self.block
        if j == 0:
            self._draw()
        if not self.filtered:
            torch.addmm(self.noise[j], self.top, self.w, out=scores)  # noise holds the bias
        else:
            torch.addmm(self.b, self.top, self.w, out=scores)
            _filter(scores, self.top_k, self.top_p)
            scores.add_(self.noise[j])
        torch.argmax(scores, dim=1, out=out)

    def _draw(self) -> None:
        """Gumbel noise -log(-log(u)) for the next block of steps, one (N, V) view per step."""
        u = torch.rand(self.block, self.n, self.scores.shape[1], generator=self.gen,
                       dtype=torch.float32)
        g = u.log_().neg_().log_().neg_().to(self.scores)  # u = 0 gives -inf: never picked
        if not self.filtered:
            g.add_(self.b)
        self.noise = list(g.unbind(0))


def _filter(scores: torch.Tensor, top_k: int, top_p: float) -> None:
    """Set scores (N, V) = logits / T outside the top-k and outside the top-p nucleus to -inf."""
    if top_k:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (N, 1)
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p:
        probs = torch.softmax(scores, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the top character always stays).
        cut = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        scores.masked_fill_(torch.zeros_like(cut).scatter_(-1, order, cut), float("-inf"))
