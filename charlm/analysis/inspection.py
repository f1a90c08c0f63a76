"""What a model sees in a text: surprisal, next-character predictions, and every unit.

A text is scored as ONE sequence from a fresh (zero) state, exactly as `charlm eval` scores
a text of one row: characters outside the vocabulary are left out of the sequence (and
counted), the first known character is context only, and every later one gets its
surprisal in bits, -log2 p(char | everything before it).

Alongside, the recurrent layers are replayed step by step in numpy from the model's own
weights with the math of `nn.LSTM` / `nn.GRU` / `nn.RNN`, which exposes what the fused
kernel hides: the cell state c and the gates at every character (LSTM i, f, g, o; GRU
r, z, n). The unit finder (`charlm.analysis.unit_finder`) names the units that track simple properties
of the text. Nothing here prints; `charlm.analysis.inspect_page` draws the result as HTML.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from charlm.analysis.unit_finder import UnitMatch, find_units, text_properties
from charlm.errors import CharLMError
from charlm.fs import atomic_path
from charlm.model.scoring import LN2

if TYPE_CHECKING:
    from charlm.api import CharLM
    from charlm.config.run import ModelConfig
    from charlm.data.vocab import Vocab
    from charlm.model.network import CharRNN

# What each cell exposes per character: the hidden state h first, then its internal state
# and gates in the row order of PyTorch's weight matrices.
KINDS = {"lstm": ("h", "c", "i", "f", "g", "o"), "gru": ("h", "r", "z", "n"), "rnn": ("h",)}
DEFAULT_CHARS = 5000  # default passage length: a few seconds of work, a few MB of page
EVAL_CHUNK = 1024  # characters per forward call, as `charlm eval` reads one row
@dataclass
class Scores:
    """Per-character surprisal of a text read as one sequence from a fresh state.

    `N` characters of text, of which `M` are in the vocabulary (`known`); the model reads
    those M in order. `bits[p]` is NaN where nothing was scored: the first known character
    (no context yet) and every unknown character.
    """

    text: str
    known: np.ndarray  # (N,) bool
    ids: np.ndarray  # (M,) int64: the known characters' ids, in order
    bits: np.ndarray  # (N,) float64 surprisal in bits; NaN where unscored
    probs: np.ndarray  # (M, V) float32: next-character distribution after each known char

    @property
    def scored(self) -> int:
        """Characters that got a surprisal (M - 1)."""
        return max(0, len(self.ids) - 1)

    @property
    def skipped(self) -> int:
        """Characters outside the vocabulary (shown, never scored)."""
        return int((~self.known).sum())

    @property
    def bpc(self) -> float:
        """Mean surprisal of the scored characters: the passage's bits per character."""
        return float(np.nansum(self.bits)) / max(1, self.scored)

    @property
    def positions(self) -> np.ndarray:
        """(M,) index into `text` of each known character."""
        return np.flatnonzero(self.known)


@dataclass
class Inspection:
    """Everything `charlm inspect` shows: scores, per-character states and found units."""

    scores: Scores
    states: dict[tuple[int, str], np.ndarray]  # (layer, kind) -> (M, H) float32
    units: dict[str, list[UnitMatch]]  # property -> best units, strongest first
    properties: dict[str, str]  # property -> "" when found, else why it was not searched
    cell: str
    num_layers: int
    hidden_size: int
    vocab: str  # the model's characters, in id order
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint, corpus, step, bpc...
    nonlinearity: str = "tanh"  # a plain RNN may use relu (its h is then unbounded)


# --- choosing the text -------------------------------------------------------------------


def load_text(lm: CharLM, specs: list[str] | None = None, text: str | None = None,
              encoding: str | None = None) -> tuple[str, str]:
    """The text to look at and a description of where it came from.

    `text` (given inline) wins; else the CORPUS `specs` (files, folders, globs, nltk:...),
    read strictly; else a stretch of the run's own held-out text.
    """
    if text is not None and specs:
        raise CharLMError("give a TEXT_FILE or --text, not both")
    if text is not None:
        source = "--text"
    elif specs:
        from charlm.data.cache import encode_corpus

        corpus = encode_corpus(list(specs), encoding)  # read as training reads text (and cached)
        text = corpus.vocab.decode(corpus.ids.tolist())
        source = ", ".join(specs)
    else:
        try:
            text = lm.held_out_text(DEFAULT_CHARS)
        except CharLMError as exc:
            raise CharLMError(f"{exc} (pass a TEXT_FILE or --text to inspect other text)") from None
        source = "held-out text of the run"
    if not text:
        raise CharLMError("the text is empty")
    return text, source


def check_levels(levels: int) -> None:
    """The page stores each activation as one byte: 2 to 256 values per unit."""
    if not 2 <= levels <= 256:
        raise CharLMError(f"--levels {levels}: must be between 2 and 256")


def check_options(cfg: ModelConfig, layer: int | None = None, kind: str | None = None,
                  unit: int | None = None, levels: int = 16, max_chars: int = DEFAULT_CHARS
                  ) -> dict[str, Any]:
    """Refuse a --layer / --kind / --unit the model does not have, or a bad --levels /
    --max-chars (before any work); returns the page's initial view ({} or {"unit": ...})."""
    if layer is not None and not 0 <= layer < cfg.num_layers:
        raise CharLMError(f"--layer {layer}: the model has {cfg.num_layers} layer(s), "
                          f"numbered 0 to {cfg.num_layers - 1}")
    if kind is not None and kind not in KINDS[cfg.cell]:
        raise CharLMError(f"--kind {kind}: a {cfg.cell.upper()} has {', '.join(KINDS[cfg.cell])}")
    if unit is not None and not 0 <= unit < cfg.hidden_size:
        raise CharLMError(f"--unit {unit}: each layer has {cfg.hidden_size} units, numbered 0 to {cfg.hidden_size - 1}")
    check_levels(levels)
    if max_chars < 2:
        raise CharLMError(f"--max-chars {max_chars}: must be at least 2")
    if layer is None and kind is None and unit is None:
        return {}
    return {"unit": [layer or 0, kind or "h", unit or 0]}


# --- scoring -----------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Batch-1 recurrent steps are too small to share: on a busy machine a second busy-
    waiting OpenMP thread slows them down many times, so the work runs on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def score(model: CharRNN, vocab: Vocab, text: str, device: torch.device | str = "cpu") -> Scores:
    """Surprisal of every character of `text` and the model's softmax after each one.

    The known characters are read as one sequence from a zero state, `EVAL_CHUNK` at a time
    with the state carried (the same calls `charlm eval` makes for one row), so the mean of
    `bits` equals what `charlm eval` reports for a text of one row.
    """
    if not text:
        raise CharLMError("the text is empty")
    all_ids, known = vocab.lookup(text)
    ids = all_ids[known]
    if len(ids) < 2:
        raise CharLMError(f"nothing to score: {len(ids)} of the text's {len(text)} characters "
                          "are in the model's vocabulary (at least 2 are needed)")
    was_training = model.training
    model.eval()
    x = torch.from_numpy(ids).to(device)[None]  # (1, M)
    probs, nats = [], []
    state = None
    with _one_thread():
        for start in range(0, x.shape[1], EVAL_CHUNK):
            logits, state = model(x[:, start : start + EVAL_CHUNK], state)  # (1, T, V)
            logits = logits[0].float()
            probs.append(torch.softmax(logits, dim=-1).cpu())
            target = x[0, start + 1 : start + EVAL_CHUNK + 1]
            nats.append(F.cross_entropy(logits[: len(target)], target, reduction="none").double().cpu())
    model.train(was_training)
    bits = np.full(len(text), np.nan)
    bits[np.flatnonzero(known)[1:]] = (torch.cat(nats) / LN2).numpy()
    return Scores(text, known, ids, bits, torch.cat(probs).numpy())


def top_k(probs: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The k likeliest ids per row, likeliest first, and their probabilities."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)


# --- states: the recurrent layers replayed step by step -------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # tanh form: no overflow for large |x|


@torch.inference_mode()
def trace_states(model: CharRNN, ids: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """Per-character h (and c, gates) of every layer for `ids` read from a zero state.

    Uses the layer weights directly, with PyTorch's equations (weights stacked in gate order
    i, f, g, o for an LSTM; r, z, n for a GRU). The input projection of a whole layer is one
    matrix product; only the recurrent product runs per step. Eval mode: no dropout.
    """
    rnn, cell = model.rnn, model.cfg.cell
    H = model.cfg.hidden_size
    x = model.embed(torch.as_tensor(ids, dtype=torch.int64, device=model.embed.weight.device))
    inp = x.float().cpu().numpy()  # (M, E)
    M = len(ids)
    out: dict[tuple[int, str], np.ndarray] = {}
    for layer in range(model.cfg.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}").detach().float().cpu().numpy()
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        pre_in = inp @ w_ih.T + b_ih  # (M, G*H)
        w_hh_t = np.ascontiguousarray(w_hh.T)
        h = np.zeros(H, dtype=np.float32)
        kinds = {k: np.empty((M, H), dtype=np.float32) for k in KINDS[cell]}
        if cell == "lstm":
            c = np.zeros(H, dtype=np.float32)
            gates = np.empty((M, 4 * H), dtype=np.float32)
            pre_in += b_hh
            for t in range(M):
                g = pre_in[t] + h @ w_hh_t
                g[: 2 * H] = _sigmoid(g[: 2 * H])  # i, f
                g[2 * H : 3 * H] = np.tanh(g[2 * H : 3 * H])  # g
                g[3 * H :] = _sigmoid(g[3 * H :])  # o
                c = g[H : 2 * H] * c + g[: H] * g[2 * H : 3 * H]
                h = g[3 * H :] * np.tanh(c)
                gates[t] = g
                kinds["c"][t] = c
                kinds["h"][t] = h
            for j, k in enumerate("ifgo"):
                kinds[k][:] = gates[:, j * H : (j + 1) * H]
        elif cell == "gru":
            for t in range(M):
                gh = h @ w_hh_t + b_hh
                gi = pre_in[t]
                rz = _sigmoid(gi[: 2 * H] + gh[: 2 * H])
                r, z = rz[:H], rz[H:]
                n = np.tanh(gi[2 * H :] + r * gh[2 * H :])
                h = (1.0 - z) * n + z * h
                kinds["r"][t], kinds["z"][t], kinds["n"][t], kinds["h"][t] = r, z, n, h
        else:
            act = np.tanh if rnn.nonlinearity == "tanh" else (lambda v: np.maximum(v, 0.0))
            pre_in += b_hh
            for t in range(M):
                h = act(pre_in[t] + h @ w_hh_t).astype(np.float32)
                kinds["h"][t] = h
        for k, v in kinds.items():
            out[(layer, k)] = v
        inp = kinds["h"]  # the next layer reads this layer's h (dropout is off in eval)
    return out


# --- the whole inspection -----------------------------------------------------------------------


def inspect_text(lm: CharLM, text: str, source: str = "", max_chars: int = DEFAULT_CHARS) -> Inspection:
    """Score the first `max_chars` characters of `text`, trace every unit, and find the
    units that track text properties."""
    cfg = lm.model.cfg
    total = len(text)
    text = text[:max_chars]
    scores = score(lm.model, lm.vocab, text, lm.device)
    states = trace_states(lm.model, scores.ids)
    props = {k: v[scores.known] for k, v in text_properties(text).items()}
    units, status = find_units(states, props)
    info = lm.info()
    meta = {
        "checkpoint": str(lm.path),
        "corpus": ", ".join(info["corpus"]["sources"] or []),
        "step": info["step"],
        "val_bpc": info["best_val_bpc"],
        "source": source,
        "chars_total": total,
        "model": f"{cfg.num_layers}x{cfg.hidden_size} {cfg.cell.upper()}",
    }
    return Inspection(scores, states, units, status, cfg.cell, cfg.num_layers, cfg.hidden_size,
                      lm.vocab.chars, meta, getattr(lm.model.rnn, "nonlinearity", "tanh"))


def by_char(lm: CharLM, text: str, source: str) -> dict[str, Any]:
    """Per-character bits of `text` (what `charlm eval --by-char` prints as JSON).

    `bits[p]` is null where a character was not scored (the first known one, and those
    outside the vocabulary); `bpc` is the mean of the others.
    """
    scores = score(lm.model, lm.vocab, text, lm.device)
    info = lm.info()
    return {
        "bpc": scores.bpc,
        "chars": scores.scored,
        "skipped_chars": scores.skipped,
        "corpus": [source],
        "checkpoint": str(lm.path),
        "step": info["step"],
        "characters": list(text),
        "bits": [None if math.isnan(b) else round(float(b), 6) for b in scores.bits],
    }


def write_npz(path: Path, ins: Inspection) -> Path:
    """Save the per-character arrays (.npz, float32) for LSTMVis or your own analysis.

    `chars` (N,) and `known` (N,) describe the text; every other per-character array has
    one row per known character (`chars[known]`): `ids`, `probs` (M, V) the softmax after
    that character, `bits` (N,) (NaN where unscored), and the states `h0`, `c0`, `i0`, ...
    (M, H): kind then layer number.
    """
    s = ins.scores
    arrays: dict[str, np.ndarray] = {
        "chars": np.array(list(s.text), dtype="<U1"),
        "known": s.known,
        "ids": s.ids,
        "bits": s.bits.astype(np.float32),
        "probs": s.probs.astype(np.float32),
        "vocab": np.array(list(ins.vocab), dtype="<U1"),
        "bpc": np.asarray(s.bpc, dtype=np.float64),
    }
    for (layer, kind), values in ins.states.items():
        arrays[f"{kind}{layer}"] = values
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # Uncompressed: float noise deflates by under 10 %, at seconds per file.
            np.savez(fh, **arrays)  # type: ignore[arg-type]
    except OSError as exc:
        raise CharLMError(f"--npz {path}: cannot write: {exc.strerror}") from None
    return path
