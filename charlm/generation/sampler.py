"""Sampling: temperature / top-k / top-p, streamed one character at a time; whole records for
a records model; the short previews training shows at each evaluation.

Every sample is one group of a `charlm.generation.batch.BatchSampler`, the engine `charlm
serve` batches its requests in: the prime is read in one forward pass of the model; after
that each step feeds one character per row and carries the recurrent state (nothing is
re-read). Sampling is the Gumbel-max trick (argmax of logits / T plus Gumbel noise, an exact
draw from softmax(logits / T)); the noise is drawn in blocks from a private
`torch.Generator`, so sampling never touches the global RNG (training previews rely on
that) and the same seed gives the same text, alone or beside other requests. The host sees
one small copy per step: the picked ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import torch

from charlm.config.sampling import SampleOptions
from charlm.data.records import END, MARKERS, SEPARATORS, START
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError
from charlm.generation.batch import BatchSampler, prime_ids
from charlm.model.network import CharRNN

PREVIEW_TEMPERATURES = (0.2, 0.5, 1.0)


class Sampler:
    """Generates text from a model; the CLI, the Python API and training previews share it."""

    def __init__(self, model: CharRNN, vocab: Vocab, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.vocab = vocab
        self.device = torch.device(device)

    def prime_ids(self, prime: str, unknown: str = "error") -> torch.Tensor:
        """Ids of the prime; unknown characters raise (naming them) or are skipped."""
        return prime_ids(self.vocab, prime, unknown)

    def generate(self, opts: SampleOptions) -> Iterator[str]:
        """Yield the characters of one sample as they are generated (prime not included)."""
        for chars in self.generate_batch(replace(opts, num_samples=1)):
            if chars[0]:
                yield chars[0]

    def generate_batch(self, opts: SampleOptions) -> Iterator[list[str]]:
        """Yield, per step, one new character for each of `opts.num_samples` rows generated as
        one batch ("" for a row that has already produced `opts.stop`): one group of a
        `charlm.generation.batch.BatchSampler`, as `charlm serve` generates every request."""
        opts.check()
        if opts.seed is None:
            opts = replace(opts, seed=int.from_bytes(os.urandom(8), "little") >> 1)
        engine = BatchSampler(self.model, self.vocab, self.device)
        group = engine.add(opts)
        while not group.finished:
            for g, chars in engine.step():
                if g is group:
                    yield chars

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
