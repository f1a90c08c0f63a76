"""What `charlm serve` allows: its limits, each declared once (its `charlm serve` flag and
its check follow from the field). No FastAPI or PyTorch here, so the CLI can build its flags
without either installed."""

from __future__ import annotations

from dataclasses import dataclass

from charlm.config.options import opt, validate


@dataclass
class ServeSettings:
    """Limits of `charlm serve`; each field is the flag of the same name (`--max-length`)."""

    max_length: int = opt(10_000, "Longest sample a request may ask for, in characters.", at_least=1)
    max_samples: int = opt(8, "Most samples per request.", at_least=1)
    max_prime: int = opt(10_000, "Longest prime, in characters.", at_least=1)
    max_body: int = opt(131_072, "Largest request body, in bytes.", at_least=1)
    max_in_flight: int = opt(64, "Requests generated or sent at once; more get 503.", at_least=1)
    chunk_steps: int = opt(32, "Characters a request advances per turn of the generation worker.", at_least=1)
    # One row at a time gains nothing from more threads, and on a busy machine a second thread
    # that must meet the first at every operation makes each step many times slower
    # (measured: 330 vs 6,500 chars/s for a 2x256 LSTM on 2 loaded cores).
    threads: int = opt(1, "PyTorch CPU threads (1 is fastest for sampling one row at a time).", at_least=1)
    buffer_chars: int = opt(8_192, "Characters generated ahead of a slow reader before its request pauses.",
                            at_least=1)

    def check(self) -> ServeSettings:
        validate(self)
        return self
