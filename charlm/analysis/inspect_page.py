"""`charlm inspect`'s HTML page: one self-contained file (no network, no CDN).

The page template (`templates/inspect.html`: markup, style and script) gets one JSON
object. Small per-character arrays (surprisal, the top-5 predictions) are plain base64;
the states of every unit (h, c, gates) are quantized to `levels` values and deflated,
because they are most of the bytes: for a 5,000-character passage on a 2x256 LSTM they are
15.4 M numbers, 15 MB even as int8. The page inflates them with the browser's own
`DecompressionStream`. Exact values go to `--npz`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from charlm.analysis.inspection import KINDS, Inspection, check_levels, top_k
from charlm.analysis.unit_finder import PROPERTIES
from charlm.errors import CharLMError
from charlm.fs import write_atomic

DEFAULT_LEVELS = 16  # quantization levels of the embedded activations (4 bits of colour)
# Kinds bounded in [0, 1] (gates) or [-1, 1] (tanh outputs); the others are scaled per unit.
UNIT_RANGE = {"i": (0.0, 1.0), "f": (0.0, 1.0), "o": (0.0, 1.0), "r": (0.0, 1.0), "z": (0.0, 1.0),
              "g": (-1.0, 1.0), "n": (-1.0, 1.0)}
PLACEHOLDER = "/*__CHARLM_DATA__*/null"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def quantize(values: np.ndarray, kind: str, levels: int, h_range: tuple[float, float] | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map (M, H) activations to integer codes (at most `levels` of them) per unit, with each
    unit's lowest value `lo` and step: value = lo + code * step.

    Gates use [0, 1] and tanh outputs [-1, 1] (`h_range` for h: [-1, 1] for LSTM/GRU/tanh
    RNN), so colours compare across units; c and ReLU states are scaled to each unit's range.
    """
    rng = UNIT_RANGE.get(kind) or (h_range if kind == "h" else None)
    if rng is not None:
        lo = np.full(values.shape[1], rng[0])
        hi = np.full(values.shape[1], rng[1])
    else:
        # Symmetric around 0 so that 0 stays 0 (a white cell on the page).
        mag = np.abs(values).max(axis=0).astype(np.float64)
        mag = np.where(mag > 0, mag, 1.0)
        lo, hi = -mag, mag
    # An odd number of levels on a range symmetric around 0 keeps 0 a level (white).
    n = levels - 1 if levels % 2 == 0 and np.all(lo == -hi) else levels
    step = (hi - lo) / (n - 1)
    codes = np.rint((values - lo) / step).clip(0, n - 1)
    return codes.astype(np.uint8), lo, step


def page_data(ins: Inspection, levels: int = DEFAULT_LEVELS,
              initial: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object the page reads (see the template's `load()`)."""
    check_levels(levels)
    s = ins.scores
    idx, p = top_k(s.probs, 5)
    id_type = np.uint8 if len(ins.vocab) <= 256 else np.uint16
    # rank of the true next character among the predictions (1 = the likeliest)
    true_p = s.probs[np.arange(len(s.ids) - 1), s.ids[1:]]
    rank = 1 + (s.probs[:-1] > true_p[:, None]).sum(axis=1)
    h_range = None if ins.nonlinearity == "relu" else (-1.0, 1.0)
    blob = bytearray()
    kinds = KINDS[ins.cell]
    scale: dict[str, list[list[float]]] = {}
    for layer in range(ins.num_layers):
        for kind in kinds:
            codes, lo, step = quantize(ins.states[(layer, kind)], kind, levels, h_range)
            blob += codes.T.tobytes()  # unit-major: one unit's series is contiguous
            scale[f"{layer}{kind}"] = [[_sig(v) for v in lo], [_sig(v) for v in step]]
    units = {name: [[m.layer, m.kind, m.unit, round(m.r, 3)] for m in found]
             for name, found in ins.units.items()}
    return {
        "meta": ins.meta,
        "text": s.text,
        "vocab": ins.vocab,
        "unknown": np.flatnonzero(~s.known).tolist(),
        # surprisal of each known character (first one: null), rounded to 1/1000 bit
        "bits": [None] + [round(float(b), 3) for b in s.bits[s.known][1:]],
        "bpc": s.bpc,
        "scored": s.scored,
        "skipped": s.skipped,
        # prediction made after known character j, for known character j + 1
        "top_ids": _b64(idx[:-1].astype(id_type)),
        "top_p": _b64(np.rint(p[:-1] * 65535).astype("<u2")),
        "id_bytes": np.dtype(id_type).itemsize,
        "rank": _b64(rank.clip(max=65535).astype("<u2")),
        "cell": ins.cell,
        "layers": ins.num_layers,
        "hidden": ins.hidden_size,
        "kinds": list(kinds),
        "levels": levels,
        # zlib level 6: level 9 is 10x slower on these bytes for 3 % less
        "states": base64.b64encode(zlib.compress(bytes(blob), 6)).decode("ascii"),
        "scale": scale,
        "units": units,
        "properties": {name: [PROPERTIES[name], ins.properties[name]] for name in ins.units},
        "initial": initial or {},
    }


def _sig(v: float) -> float:
    """7 significant digits (float32 precision), not the 17 of repr."""
    return float(f"{float(v):.7g}") if math.isfinite(v) else 0.0


def render(ins: Inspection, levels: int = DEFAULT_LEVELS, initial: dict[str, Any] | None = None) -> str:
    """The whole page as one HTML string."""
    template = resources.files("charlm").joinpath("templates/inspect.html").read_text(encoding="utf-8")
    data = json.dumps(page_data(ins, levels, initial), ensure_ascii=False, separators=(",", ":"))
    # "<" appears only inside JSON strings; escaped, no "</script" or "<!--" can end the
    # data block early.
    data = data.replace("<", "\\u003c")
    title = html.escape(f"charlm inspect: {Path(str(ins.meta.get('checkpoint', ''))).name}")
    return template.replace("__CHARLM_TITLE__", title).replace(PLACEHOLDER, data)


def write_page(path: Path, ins: Inspection, levels: int = DEFAULT_LEVELS,
               initial: dict[str, Any] | None = None) -> Path:
    """Write the page to `path` (UTF-8, atomically) and return it."""
    page = render(ins, levels, initial)
    path = Path(path)
    try:
        write_atomic(path, page.encode("utf-8"))
    except OSError as exc:
        raise CharLMError(f"--html {path}: cannot write: {exc.strerror}") from None
    return path
