"""Dynamic evaluation: scoring text while the model keeps learning from what it has read.

Krause et al. (2018), "Dynamic Evaluation of Neural Sequence Models": the text is read as one
sequence, a segment at a time; each segment is scored first, then the model takes one
gradient step on it, so the next segment is predicted by a model adapted to the text so far.
The step is RMS-normalized (each parameter's gradient divided by the root mean square of its
gradients, measured beforehand) and pulled back toward the trained weights by a decay that
is larger for the parameters that move most ("RMS with a global prior"):

    theta <- theta - lr * grad / (rms + eps) + decay * rate * (theta_0 - theta),
    rate = rms / mean(rms), at most 1 / decay

The model handed in is never changed: a copy adapts. The step size and decay are tuned on a
first part of the text (`tune`), which also gives the gradients' RMS; the rest is scored,
statically and dynamically, so both numbers are on the same characters.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlm.data.streams import Ids, as_array
from charlm.errors import CharLMError
from charlm.model.network import CharRNN, State, detach_state
from charlm.model.scoring import LN2

SEGMENT = 50  # characters per adaptation step (Krause et al. use 20-100 for characters)
EPS = 1e-5  # keeps the RMS-normalized step finite where a parameter's gradient is ~0
# The grid the step size and decay are tuned over (in units of "RMS gradients" per segment):
# on State of the Union's held-out text (a 2x256 model) the best lay at 5e-4 to 1e-3 and
# decays of 3e-4 to 1e-3, within 0.001 bpc of each other; 3e-3 already diverges.
LR_GRID = (3e-4, 6e-4, 1e-3, 1.5e-3)
DECAY_GRID = (3e-4, 1e-3, 3e-3)
# `sample --adapt`: a prime is a paragraph, not a corpus, so it is read a few times, at the
# step size and decay that were best on State of the Union's held-out text.
ADAPT_LR, ADAPT_DECAY, ADAPT_PASSES = 1e-3, 1e-3, 3
ADAPT_MAX_CHARS = 20_000  # a longer prime adapts on its last this-many characters
TUNE_FRACTION = 0.25  # of the text, at most TUNE_MAX_CHARS, tunes lr and decay
TUNE_MAX_CHARS = 20_000
MIN_CHARS = 2 * SEGMENT  # below this there is nothing to adapt to


@dataclass(frozen=True)
class DynamicResult:
    """Static and dynamic bits per character on the same characters, and how they were got."""

    static_bpc: float
    dynamic_bpc: float
    chars: int  # characters scored (both ways)
    tune_chars: int  # characters that tuned lr and decay (not scored)
    lr: float
    decay: float
    segment: int
    seconds: float  # tuning and scoring


def gradient_rms(model: CharRNN, ids: np.ndarray, device: torch.device, segment: int = SEGMENT) -> list[torch.Tensor]:
    """Each parameter's root-mean-square gradient over the segments of `ids`, read as one
    sequence (dropout off): the scale the adaptation step divides by."""
    net = copy.deepcopy(model).to(device).eval()
    sums = [torch.zeros_like(p) for p in net.parameters()]
    state: State | None = None
    n = 0
    for x, y in _segments(ids, device, segment):
        net.zero_grad(set_to_none=False)
        loss, state = _loss(net, x, y, state)
        loss.backward()
        with torch.no_grad():
            for s, p in zip(sums, net.parameters(), strict=True):
                s += p.grad.float() ** 2 if p.grad is not None else 0.0
        n += 1
    return [(s / max(1, n)).sqrt() for s in sums]


def dynamic_bits(model: CharRNN, ids: np.ndarray, device: torch.device, rms: list[torch.Tensor],
                 lr: float, decay: float, segment: int = SEGMENT) -> tuple[float, int]:
    """Bits per character of `ids` read as one sequence by a copy of `model` that adapts after
    each segment (the characters after the first are scored), and how many were scored."""
    net = copy.deepcopy(model).to(device).eval()  # dropout off; the model handed in stays as it is
    return _read_adapting(net, ids, device, rms, lr, decay, segment)


def _read_adapting(net: CharRNN, ids: np.ndarray, device: torch.device, rms: list[torch.Tensor],
                   lr: float, decay: float, segment: int,
                   prior: list[torch.Tensor] | None = None) -> tuple[float, int]:
    """Read `ids` with `net`, one step on each segment after scoring it (`net` changes; the
    decay pulls toward `prior`, the trained weights, by default `net`'s own at the start);
    the bits per character it scored and how many."""
    params = list(net.parameters())
    prior = prior if prior is not None else [p.detach().clone() for p in params]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    rates = [(r / mean_rms).clamp(max=1.0 / decay) if decay else torch.zeros_like(r) for r in rms]
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state: State | None = None
    for x, y in _segments(ids, device, segment):
        net.zero_grad(set_to_none=False)
        loss, state = _loss(net, x, y, state)  # scored before the model learns from it
        bits += loss.detach().double() * y.numel() / LN2
        count += y.numel()
        loss.backward()
        with torch.no_grad():
            for p, p0, r, rate in zip(params, prior, rms, rates, strict=True):
                if p.grad is not None:
                    p.sub_(lr * p.grad / (r + EPS))
                p.add_(decay * rate * (p0 - p))
    return float(bits) / max(1, count), count


def adapted(model: CharRNN, ids: np.ndarray, device: torch.device, lr: float = ADAPT_LR, decay: float = ADAPT_DECAY,
            passes: int = ADAPT_PASSES, segment: int = SEGMENT) -> CharRNN:
    """A copy of `model` adapted to the text `ids` (a prime): `passes` readings of it with
    dynamic evaluation's steps, the gradients' RMS measured on the text itself. The copy is in
    eval mode; `model` is not changed."""
    rms = gradient_rms(model, ids, device, segment)
    net = copy.deepcopy(model).to(device).eval()
    trained = [p.detach().clone() for p in net.parameters()]
    for _ in range(passes):
        _read_adapting(net, ids, device, rms, lr, decay, segment, prior=trained)
    net.zero_grad(set_to_none=True)
    return net


def tune(model: CharRNN, ids: np.ndarray, device: torch.device, rms: list[torch.Tensor],
         segment: int = SEGMENT) -> tuple[float, float]:
    """The (lr, decay) of the grid that scores `ids` lowest when adapting."""
    scored = {(lr, decay): dynamic_bits(model, ids, device, rms, lr, decay, segment)[0]
              for lr, decay in itertools.product(LR_GRID, DECAY_GRID)}
    return min(scored, key=lambda k: (scored[k], k))


def dynamic_evaluate(model: CharRNN, ids: Ids, device: torch.device, lr: float | None = None,
                     decay: float | None = None, segment: int = SEGMENT) -> DynamicResult:
    """Static and dynamic bpc of `ids` after its first part (which tunes lr and decay where
    they are not given, and measures the gradients' RMS)."""
    started = time.perf_counter()
    text = as_array(ids)
    head = min(TUNE_MAX_CHARS, int(len(text) * TUNE_FRACTION))
    head = max(head, MIN_CHARS)
    tuning, rest = np.asarray(text[:head]), np.asarray(text[head:])
    if len(rest) < MIN_CHARS:
        raise CharLMError(f"dynamic evaluation needs at least {head + MIN_CHARS} known characters, got {len(text)}")
    rms = gradient_rms(model, tuning, device, segment)
    if lr is None or decay is None:
        tuned_lr, tuned_decay = tune(model, tuning, device, rms, segment)
        lr = tuned_lr if lr is None else lr
        decay = tuned_decay if decay is None else decay
    static, _ = static_bits(model, rest, device, segment)
    dynamic, count = dynamic_bits(model, rest, device, rms, lr, decay, segment)
    return DynamicResult(static, dynamic, count, head, lr, decay, segment, time.perf_counter() - started)


@torch.inference_mode()
def static_bits(model: CharRNN, ids: np.ndarray, device: torch.device, segment: int = SEGMENT) -> tuple[float, int]:
    """Bits per character of `ids` read as `dynamic_bits` reads it (one sequence, segment by
    segment) by the model as it is, and how many were scored."""
    was_training = model.training
    model.eval()
    bits, count = 0.0, 0
    state: State | None = None
    for x, y in _segments(ids, device, segment):
        logits, state = model(x, state)
        bits += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                      reduction="sum")) / LN2
        count += y.numel()
    model.train(was_training)
    return bits / max(1, count), count


def _segments(ids: np.ndarray, device: torch.device, segment: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each segment of `ids` read as one sequence: (1, T) inputs and their targets."""
    for start in range(0, len(ids) - 1, segment):
        window = torch.from_numpy(np.asarray(ids[start : start + segment + 1], dtype=np.int64)).to(device)
        yield window[None, :-1], window[None, 1:]


def _loss(net: CharRNN, x: torch.Tensor, y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    """Mean cross-entropy (nats) of one segment, and its final state cut from the graph."""
    logits, final = net(x, state)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss, detach_state(final)

