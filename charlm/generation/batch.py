"""Many samples advanced together, each with its own options: the one engine behind every
sample (`charlm sample`, `CharLM.sample` / `stream_batch`, training's previews) and behind
`charlm serve`, whose requests join and leave the batch between steps (continuous batching).

A `Group` is one request: its `num_samples` rows, its temperature, top-k / top-p, stop
string, seed and length. Rows of every group sit side by side in one `Stepper`, so a step
is one recurrent step and one output projection for all of them; then each group's rows
are scaled by their own 1 / T, filtered by their own top-k / top-p, and given Gumbel noise
from their own seeded generator, drawn in the same blocks whether the group is alone or
not. The prime is read in one pass (the model's fused kernel, batch 1) before the group
joins. A group that leaves, or is paused (`detach`: a slow reader), takes its rows' state
with it, and the others do not notice.

In a `shared` engine (`charlm serve`'s), a group's rows compute the same numbers alone or
batched, so a seeded request writes the same text whatever else the server is doing: every
operation is row by row, and so are the matrix products from some number of rows on. Below
it BLAS takes other kernels whose sums round differently: on a Xeon a one-row product (gemv)
differs from two rows or more; on a Zen 5, products of 1-3, 5-7 and 9-11 rows differ from
those of 4, 8 and 12 or more. `exact_rows` measures which sizes agree on this machine, for
this model, and a shared batch of another size runs with spare rows beside it. An engine
that is not shared (`charlm sample`, the Python API, previews: one group whose rows never
change) runs with its own rows only, the fastest: one row is gemv (on a Zen 5, 15k
chars/s at the default shape against 5.5k padded to four rows). Its text is then the
shared engine's except where a rounding difference tips a near tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from charlm.config.sampling import SampleOptions
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError
from charlm.generation.stepper import Stepper
from charlm.model.network import CharRNN, State

_NOISE_FLOATS = 1 << 20  # Gumbel noise a group draws at a time: (steps, rows, V) about this
_MAX_BLOCK = 256  # ... and at most this many steps per block
_CHECKED_ROWS = (*range(1, 25), 32, 40, 48, 56)  # batch sizes `exact_rows` compares ...
_REFERENCE_ROWS = 64  # ... with the rows of a batch this size
_exact: dict[tuple[object, ...], tuple[int, ...]] = {}  # exact_rows' answer per model shape and device


@dataclass(eq=False)
class Group:
    """One request's rows in the batch (made by `BatchSampler.add`)."""

    opts: SampleOptions
    n: int
    greedy: bool
    top_k: int
    top_p: float
    gen: torch.Generator
    block: int  # steps of noise per draw
    steps: int = 0  # characters generated per row so far
    finished: bool = False  # its length reached, or every row has produced the stop string
    done: list[bool] = field(default_factory=list)  # per row: stopped
    tails: list[str] = field(default_factory=list)  # per row: the last len(stop) characters
    noise: torch.Tensor | None = None  # (block, n, V) Gumbel noise of the current block
    zeros: torch.Tensor | None = None  # (n, V): a greedy group's "noise"
    # Off the batch (waiting to join, or detached): its rows' state and next input ids.
    state: tuple[torch.Tensor, torch.Tensor | None] | None = None  # h (n, L*H), c (L, n, H)
    cur: torch.Tensor | None = None  # (n,) int64

    @property
    def filtered(self) -> bool:
        return bool(self.top_k or self.top_p)

    def step_noise(self, j: int) -> torch.Tensor:
        """The (n, V) noise of step `j`, drawing the next block first when one starts."""
        if self.greedy:
            assert self.zeros is not None
            return self.zeros
        if j % self.block == 0:
            assert self.zeros is not None
            V = self.zeros.shape[1]
            u = torch.rand(self.block, self.n, V, generator=self.gen, dtype=torch.float32)
            self.noise = u.log_().neg_().log_().neg_().to(self.zeros)  # u = 0 gives -inf: never picked
        assert self.noise is not None
        return self.noise[j % self.block]


class BatchSampler:
    """Groups of rows generated as one batch; groups join (`add`), leave (`remove`), or step
    aside and come back (`detach`, `attach`) between steps."""

    def __init__(self, model: CharRNN, vocab: Vocab, device: torch.device | str = "cpu", shared: bool = False) -> None:
        """`shared`: groups will join and leave, and each must compute what it computes
        alone (see the module docstring)."""
        self.model, self.vocab, self.device, self.shared = model, vocab, torch.device(device), shared
        self.stepper = Stepper(model, 1, self.device)
        self.sizes: tuple[int, ...] = ()  # exact_rows, measured at the first layout that needs it
        self.groups: list[Group] = []  # in the batch, in row order
        self.changed = True  # the batch's groups changed since its buffers were laid out
        self.cur = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.inv_t = torch.ones(1, 1, device=self.device)
        self.scores = torch.empty(0)
        self.noise = torch.empty(0)
        self.spare: torch.Tensor | None = None  # the spare rows' (zero) noise, when there are any
        self.spans: list[tuple[Group, int, int]] = []  # each group's rows a:b
        self.filtered: list[tuple[Group, int, int]] = []  # ... of those with top-k / top-p
        w, b = self.stepper.head_w, self.stepper.head_b
        self._bound = float((w.abs().sum(0) + b.abs()).max())  # |logits| at most this

    @property
    def rows(self) -> int:
        return sum(g.n for g in self.groups)

    @torch.inference_mode()
    def add(self, opts: SampleOptions) -> Group:
        """A new group for `opts` (checked; its prime read), joining at the next step. A group
        with length 0 is finished at once."""
        opts.check()
        if opts.seed is None:
            raise CharLMError("a batched sample needs a seed")  # the caller picks one (it reports it)
        n, V = opts.num_samples, self.stepper.vocab_size
        ids = self._prime(opts)
        t = opts.temperature
        # Logits / T beyond float range: sampling at such a T is greedy (ties aside).
        greedy = t == 0 or not math.isfinite(self._bound / t) or self._bound / t > 1e30
        group = Group(opts, n, greedy, opts.top_k if 0 < opts.top_k < V else 0, opts.top_p if opts.top_p < 1 else 0.0,
                      torch.Generator().manual_seed(opts.seed),
                      max(1, min(_MAX_BLOCK, opts.length, _NOISE_FLOATS // (n * V))),
                      finished=opts.length == 0, done=[False] * n, tails=[""] * n)
        group.zeros = torch.zeros(n, V, dtype=self.stepper.head_w.dtype, device=self.device)
        # The last prime character is the first step's input; the ones before it make the state.
        group.state = self.stepper.state_rows(_read(self.model, ids[:-1], self.device) if len(ids) > 1 else None, n)
        group.cur = torch.full((n,), ids[-1], dtype=torch.int64, device=self.device)
        if not group.finished:
            self.attach(group)
        return group

    @torch.inference_mode()
    def attach(self, group: Group) -> None:
        """Put a detached group (or a new one) back in the batch, from its saved state."""
        if group not in self.groups and not group.finished:
            self._save()
            self.groups.append(group)
            self.changed = True

    @torch.inference_mode()
    def detach(self, group: Group) -> None:
        """Take a group out of the batch, keeping its rows' state (it can `attach` again)."""
        if group in self.groups:
            self._save()
            self.groups.remove(group)
            self.changed = True

    def remove(self, group: Group) -> None:
        """Take a group out for good."""
        self.detach(group)
        group.state = group.cur = None

    @torch.inference_mode()
    def step(self) -> list[tuple[Group, list[str]]]:
        """One character for every row of every group in the batch ("" for a row that has
        produced its stop string); a group that ends here is `finished` and leaves."""
        if not self.groups:
            return []
        if self.changed:
            self._layout()
        st = self.stepper
        st.step(self.cur)
        scores = torch.addmm(st.head_b, st.top, st.head_w, out=self.scores)  # (N, V) logits
        for g, a, b in self.filtered:  # top-k / top-p see logits / T: scaled here, first
            part = scores[a:b].mul_(1.0 / g.opts.temperature)
            _filter(part, g.top_k, g.top_p)
        if len(self.spans) == 1 and self.spare is None:  # one group, as `charlm sample` has
            g = self.spans[0][0]
            if g.greedy:
                torch.argmax(scores, dim=1, out=self.cur)
            else:  # the block's row for this step is used once: it takes the sum
                torch.argmax(g.step_noise(g.steps).addcmul_(scores, self.inv_t), dim=1, out=self.cur)
        else:
            noises = [g.step_noise(g.steps) for g, _, _ in self.spans]
            if self.spare is not None:
                noises.append(self.spare)
            noise = torch.cat(noises, out=self.noise)
            # noise + logits / T per row (1 / T is 1 for greedy and already-scaled rows): the
            # same operation, row by row, as a group alone gets above.
            torch.argmax(noise.addcmul_(scores, self.inv_t), dim=1, out=self.cur)
        picked = self.cur.tolist()  # the one host sync of the step
        chars = self.vocab.chars
        out: list[tuple[Group, list[str]]] = []
        ended = False
        for g, a, b in self.spans:
            g.steps += 1
            stop = g.opts.stop
            if not stop:
                text = [chars[i] for i in picked[a:b]]
            else:
                text = []
                for row, i in enumerate(picked[a:b]):
                    if g.done[row]:
                        text.append("")
                        continue
                    ch = chars[i]
                    text.append(ch)
                    g.tails[row] = (g.tails[row] + ch)[-len(stop):]
                    g.done[row] = g.tails[row] == stop
            out.append((g, text))
            if g.steps >= g.opts.length or (stop and all(g.done)):
                g.finished = ended = True
        if ended:
            self._save()
            self.groups = [g for g in self.groups if not g.finished]
            for g in (g for g, _, _ in self.spans if g.finished):
                g.state = g.cur = None
            self.changed = True
        return out

    def _prime(self, opts: SampleOptions) -> list[int]:
        ids = prime_ids(self.vocab, opts.prime, opts.unknown).tolist()
        # No prime: start as at a document boundary (or from the first character).
        return ids or [self.vocab.encode("\n")[0].item() if "\n" in self.vocab else 0]

    def _save(self) -> None:
        """Copy the batch's rows back into their groups (before the batch changes)."""
        if self.changed:  # not laid out since the last change: the groups hold their state
            return
        hs, c = self.stepper.rows()
        for g, a, b in self.spans:
            g.state = (hs[a:b].clone(), c[:, a:b].clone() if c is not None else None)
            g.cur = self.cur[a:b].clone()

    def _layout(self) -> None:
        """Lay the batch's groups out in the stepper's rows, from their saved states."""
        st = self.stepper
        if self.shared and self.rows < _CHECKED_ROWS[-1] and not self.sizes:
            self.sizes = exact_rows(st)
        n = padded_rows(self.rows, self.sizes) if self.sizes else self.rows
        if st.n != n:
            st.resize(n)
            self.cur = torch.zeros(n, dtype=torch.int64, device=self.device)
            self.scores = torch.empty(n, st.vocab_size, dtype=st.head_w.dtype, device=self.device)
            self.noise = torch.zeros(n, st.vocab_size, dtype=st.head_w.dtype, device=self.device)
        spare = n - self.rows
        self.spare = torch.zeros(spare, st.vocab_size, dtype=st.head_w.dtype, device=self.device) if spare else None
        self.inv_t = torch.ones(n, 1, dtype=st.head_w.dtype, device=self.device)
        hs, c = st.rows()
        self.spans = []
        a = 0
        for g in self.groups:
            assert g.state is not None and g.cur is not None
            b = a + g.n
            hs[a:b].copy_(g.state[0])
            if c is not None and g.state[1] is not None:
                c[:, a:b].copy_(g.state[1])
            self.cur[a:b].copy_(g.cur)
            if not g.greedy and not g.filtered:
                self.inv_t[a:b] = 1.0 / g.opts.temperature
            self.spans.append((g, a, b))
            a = b
        self.filtered = [(g, a, b) for g, a, b in self.spans if g.filtered and not g.greedy]
        self.changed = False


def prime_ids(vocab: Vocab, prime: str, unknown: str = "error") -> torch.Tensor:
    """Ids of the prime; unknown characters raise (naming them) or are skipped."""
    missing = vocab.unknown(prime)
    if missing and unknown != "skip":
        names = " ".join(repr(c) for c in missing[:20])
        raise CharLMError(f"--prime: characters not in the model's vocabulary: {names} "
                          "(use --unknown skip to drop them)")
    return vocab.encode(prime, unknown="skip")


def _read(model: CharRNN, ids: list[int], device: torch.device, chunk: int = 4096) -> State:
    """Recurrent state after reading `ids` (batch 1: every row starts from it), through the
    model's fused kernel a chunk at a time; the output layer is skipped (only the state is
    needed), so a long --prime-file costs no (P, V) logits."""
    was_training = model.training
    model.eval()  # dropout off while reading the prime
    try:
        x = torch.tensor(ids, device=device)[None]  # (1, P)
        state = None
        for start in range(0, x.shape[1], chunk):
            _, state = model.rnn(model.embed(x[:, start:start + chunk]), state)
    finally:
        model.train(was_training)
    assert state is not None  # `ids` is never empty
    return state


@torch.inference_mode()
def exact_rows(st: Stepper) -> tuple[int, ...]:
    """The batch sizes in which a step computes each row's numbers (state and logits) bit for
    bit as a big batch does, on this machine and device, for `st`'s model, up to the one from
    which every size does (the last): one step of `_REFERENCE_ROWS` rows from random states
    against a step of each of `_CHECKED_ROWS` from the same states. On a Zen 5 with column
    views as inputs (as the stepper has them) that is (4, 8, 12): 1-3, 5-7 and 9-11 rows
    round differently; on a Xeon, (2,). Measured once per model shape, precision and device
    (a few milliseconds); `st` is left at its size with zero state."""
    key = (st.cell, st.L, st.H, st.vocab_size, st.dtype, str(st.device))  # every product's shape follows
    if key in _exact:
        return _exact[key]
    n0, gen = st.n, torch.Generator().manual_seed(0)
    N = _REFERENCE_ROWS
    hs = (torch.rand(N, st.L * st.H, generator=gen) * 2 - 1).to(st.hs)
    c = torch.randn(st.L, N, st.H, generator=gen).to(st.hs) if st.cell == "lstm" else None
    ids = torch.randint(0, st.vocab_size, (N,), generator=gen).to(st.device)

    def step(m: int) -> tuple[torch.Tensor, ...]:
        st.resize(m)
        st.set_rows(hs[:m], c[:, :m] if c is not None else None)
        st.step(ids[:m])
        out_h, out_c = st.rows()
        logits = torch.addmm(st.head_b, st.top, st.head_w)
        return (out_h.clone(), logits) + ((out_c.clone(),) if out_c is not None else ())

    ref = step(N)
    agree = [m for m in _CHECKED_ROWS
             if all(torch.equal(a, b[:m] if a.dim() == 2 else b[:, :m]) for a, b in zip(step(m), ref, strict=True))]
    st.resize(n0)
    every = N  # none agrees: as many rows as the reference, which agrees with itself
    for m in reversed(_CHECKED_ROWS):
        if m not in agree:
            break
        every = m
    _exact[key] = sizes = (*(m for m in agree if m < every), every)
    return sizes


def padded_rows(n: int, sizes: tuple[int, ...]) -> int:
    """The rows a batch of `n` runs with: `n` itself from the last of `exact_rows`' `sizes`
    on, else the smallest of them that holds `n` (spare rows fill the rest)."""
    return n if n >= sizes[-1] else min(m for m in sizes if m >= n)


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
