"""The short samples training shows at each evaluation, at a few temperatures."""

from __future__ import annotations

import torch

from charlm.model import CharRNN
from charlm.records import preview_records
from charlm.sample import Sampler
from charlm.sample_options import SampleOptions
from charlm.vocab import Vocab

PREVIEW_TEMPERATURES = (0.2, 0.5, 1.0)


def previews(model: CharRNN, vocab: Vocab, device: torch.device, length: int, seed: int,
             records: str = "") -> list[tuple[float, str]]:
    """(temperature, text) for each preview temperature; `records` ("lines", "blank-lines")
    shows a few whole records instead of running text. Sampling draws from its own seeded
    generator, so the training RNGs are untouched; the model is left in eval mode."""
    sampler = Sampler(model, vocab, device)
    if records:
        return [(t, preview_records(sampler, records, length, t, seed)) for t in PREVIEW_TEMPERATURES]
    return [(t, "".join(sampler.generate(SampleOptions(length=length, temperature=t, seed=seed))))
            for t in PREVIEW_TEMPERATURES]
