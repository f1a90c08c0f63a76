"""Sampling: temperature / top-k / top-p, streamed one character at a time.

The prime is read in one forward pass; after that each step feeds one character per row
and carries the recurrent state (nothing is re-read). Random numbers come from a private
`torch.Generator` in blocks, so sampling never touches the global RNG (training previews
rely on that) and the same seed gives the same text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from charlm.errors import CharLMError
from charlm.model import CharRNN
from charlm.vocab import Vocab

_BLOCK = 256  # uniform random numbers drawn per row at a time


@dataclass
class SampleOptions:
    """Sampling controls; `check()` raises `CharLMError` naming a bad flag."""

    length: int = 500
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    prime: str = ""
    seed: int | None = None
    stop: str = ""
    unknown: str = "error"  # or "skip"

    def check(self) -> "SampleOptions":
        check_temperature(self.temperature)
        if self.length < 0:
            raise CharLMError(f"--length: must be >= 0, got {self.length}")
        if self.top_k < 0:
            raise CharLMError(f"--top-k: must be >= 0 (0 = off), got {self.top_k}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise CharLMError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.unknown not in ("error", "skip"):
            raise CharLMError(f"--unknown: must be error or skip, got {self.unknown!r}")
        if self.seed is not None and self.seed < 0:
            raise CharLMError(f"--seed: must be >= 0, got {self.seed}")
        return self


def check_temperature(t: float) -> float:
    if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
        raise CharLMError(f"--temperature: must be a finite number >= 0 (0 = greedy), got {t}")
    return float(t)


def parse_temperatures(text: str) -> list[float]:
    """`0.5` or a comma list `0.2,0.5,1.0` (one sample per temperature)."""
    temps = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise CharLMError(f"--temperature: {part.strip()!r} is not a number") from None
        temps.append(check_temperature(value))
    return temps


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

    def generate(self, **options) -> Iterator[str]:
        """Yield the characters of one sample as they are generated (prime not included)."""
        for chars in self.generate_batch(1, **options):
            if chars[0]:
                yield chars[0]

    @torch.inference_mode()
    def generate_batch(self, num_samples: int, length: int = 500, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, prime: str = "", seed: int | None = None,
                       stop: str = "", unknown: str = "error") -> Iterator[list[str]]:
        """Yield, per step, one new character for each of `num_samples` rows generated as one
        batch ("" for a row that has already produced `stop`)."""
        opts = SampleOptions(length, temperature, top_k, top_p, prime, seed, stop, unknown).check()
        if num_samples < 1:
            raise CharLMError(f"--num-samples: must be >= 1, got {num_samples}")
        if length == 0:
            return
        model, vocab, device = self.model, self.vocab, self.device
        was_training = model.training
        model.eval()
        try:
            ids = self.prime_ids(opts.prime, opts.unknown)
            if len(ids) == 0:
                # No prime: start as at a document boundary (or from the first character).
                ids = torch.tensor([vocab.encode("\n")[0] if "\n" in vocab else 0])
            gen = torch.Generator().manual_seed(opts.seed if opts.seed is not None
                                                else int.from_bytes(os.urandom(8), "little") >> 1)
            x = ids.to(device).unsqueeze(0).expand(num_samples, -1)  # (N, P)
            logits, state = model(x, None)
            logits = logits[:, -1]  # (N, V)
            chars = vocab.chars
            done = [False] * num_samples
            tails = [""] * num_samples
            uniforms = torch.empty(0)
            for i in range(length):
                if i % _BLOCK == 0:
                    uniforms = torch.rand(num_samples, _BLOCK, generator=gen).to(device)
                nxt = _pick(logits.float(), opts.temperature, opts.top_k, opts.top_p,
                            uniforms[:, i % _BLOCK])  # (N,)
                picked = nxt.tolist()
                out = []
                for row, idx in enumerate(picked):
                    if done[row]:
                        out.append("")
                        continue
                    ch = chars[idx]
                    out.append(ch)
                    if opts.stop:
                        tails[row] = (tails[row] + ch)[-len(opts.stop):]
                        done[row] = tails[row] == opts.stop
                yield out
                if all(done) or i == length - 1:
                    break
                logits, state = model(nxt.unsqueeze(1), state)  # (N, 1, V)
                logits = logits[:, -1]
        finally:
            model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          u: torch.Tensor) -> torch.Tensor:
    """Next ids (N,) from logits (N, V) with uniforms u (N,) by inverse-CDF sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the top character always stays).
        cut = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.cumsum(dim=-1)  # (N, V)
    target = (u * cdf[:, -1]).unsqueeze(1)  # (N, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Never land on a zero-probability id through float rounding at the top end.
    idx = idx.clamp_(max=logits.shape[-1] - 1)
    return torch.where(probs.gather(1, idx.unsqueeze(1)).squeeze(1) > 0, idx, probs.argmax(dim=-1))
