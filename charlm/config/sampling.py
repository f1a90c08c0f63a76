"""What a sample asks for: the sampling options, declared once (no PyTorch here, so the CLI
can build its flags from them without loading it)."""

from __future__ import annotations

from dataclasses import dataclass

from charlm.config.options import opt, validate
from charlm.errors import CharLMError


@dataclass
class SampleOptions:
    """Sampling controls, each declared once: the CLI's flags and the checks follow from them."""

    length: int = opt(500, "Characters to generate (prime excluded).", at_least=0, short="-n")
    temperature: float = opt(1.0, "Sampling temperature; 0 = greedy.", at_least=0.0, short="-t")
    top_k: int = opt(0, "Sample only from the K most likely characters (0 = off).", at_least=0)
    top_p: float = opt(1.0, "Nucleus sampling: smallest set with probability >= P (1 = off).",
                       above=0.0, at_most=1.0)
    prime: str = opt("", "Text the model reads first and continues.")
    stop: str = opt("", "End a sample when this string is generated.")
    # The generator's seed is 64 bits.
    seed: int | None = opt(None, "Same seed, same text.", at_least=0, at_most=2**64 - 1)
    num_samples: int = opt(1, "Independent samples, generated as one batch.", at_least=1)
    unknown: str = opt("error", "Prime characters outside the vocabulary: error | skip.",
                       choices=("error", "skip"))
    adapt: bool = opt(False, "First adapt a copy of the model to the prime (a few readings of it with "
                      "dynamic evaluation's gradient steps), then generate with that copy; the checkpoint "
                      "is not changed, and the model never adapts to its own output.")

    def check(self) -> SampleOptions:
        """Raise `CharLMError` naming every bad option."""
        validate(self)
        if self.adapt and not self.prime:
            raise CharLMError("--adapt: give a --prime (or --prime-file) for the model to adapt to")
        return self


def parse_temperatures(text: str) -> list[float]:
    """`0.5` or a comma list `0.2,0.5,1.0` (one sample per temperature), each checked."""
    temps = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise CharLMError(f"--temperature: {part.strip()!r} is not a number") from None
        temps.append(SampleOptions(temperature=value).check().temperature)
    return temps
