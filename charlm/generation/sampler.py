"""Sampling: temperature / top-k / top-p, streamed one character at a time; whole records for
a records model; the short previews training shows at each evaluation.

The prime is read in one forward pass of the model; after that each step feeds one
character per row and carries the recurrent state (nothing is re-read), through a
`charlm.generation.stepper.Stepper`. Sampling is the Gumbel-max trick (argmax of logits / T plus Gumbel noise, an
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

from charlm.config.sampling import SampleOptions
from charlm.data.records import END, MARKERS, SEPARATORS, START
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError
from charlm.generation.stepper import Stepper
from charlm.model.network import CharRNN, State

PREVIEW_TEMPERATURES = (0.2, 0.5, 1.0)
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
            stepper = Stepper(model, n, self.device)
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

    def generate_records(self, opts: SampleOptions) -> Iterator[list[str]]:
        """Per step, one character for each of `opts.num_samples` whole records generated as
        one batch: each starts fresh with the start marker (then the prime) and ends at the
        end marker ("" once a record has ended); the markers themselves are never yielded."""
        if opts.stop:
            raise CharLMError("--stop: a records model ends every sample at the end of its record; "
                              "--stop is not used with it")
        for chars in self.generate_batch(replace(opts, prime=START + opts.prime, stop=END)):
            yield ["" if c in MARKERS else c for c in chars]

    def previews(self, length: int, seed: int, records: str = "") -> list[tuple[float, str]]:
        """(temperature, text) for each preview temperature; `records` ("lines", "blank-lines")
        shows a few whole records, written as the corpus writes them, instead of running text.
        Drawn from a private seeded generator: the training RNGs are untouched."""
        out = []
        for t in PREVIEW_TEMPERATURES:
            opts = SampleOptions(length=length, temperature=t, seed=seed, num_samples=5 if records else 1)
            if records:
                rows: list[list[str]] = [[] for _ in range(opts.num_samples)]
                for chars in self.generate_records(opts):
                    for row, ch in enumerate(chars):
                        rows[row].append(ch)
                out.append((t, SEPARATORS[records].join("".join(r) for r in rows)))
            else:
                out.append((t, "".join(self.generate(opts))))
        return out


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


class _Picker:
    """Next ids from the stepper's top-layer output: greedy, or Gumbel-max over logits / T
    (after the top-k / top-p filters). 1/T is folded into the head's weights, and without
    filters the noise block also carries the head's bias, so a plain sampling step is one
    addmm plus one argmax."""

    def __init__(self, stepper: Stepper, opts: SampleOptions, gen: torch.Generator) -> None:
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
