"""Character vocabulary: sorted Unicode code points, the id order of every model.

Corpora are encoded by `charlm.encode` (streaming, into the memory-mapped cache); this class
maps prime text and evaluation text through UTF-32 code points and `torch.searchsorted`,
without a per-character Python loop.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from charlm.errors import CharLMError


class Vocab:
    """Maps characters to ids 0..V-1 (ordered by code point) and back."""

    def __init__(self, chars: str) -> None:
        if not chars:
            raise CharLMError("vocabulary is empty")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise CharLMError("vocabulary must hold distinct characters in code-point order")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        self._codes = _codepoints(chars).to(torch.int64)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._index

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, sorted, each once."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str, unknown: str = "error") -> torch.Tensor:
        """Ids of `text` (int64). `unknown`: "error" raises naming the characters; "skip"
        drops them."""
        if not text:
            return torch.empty(0, dtype=torch.int64)
        codes = _codepoints(text).to(torch.int64)
        pos = torch.searchsorted(self._codes, codes).clamp_(max=len(self) - 1)
        known = self._codes[pos] == codes
        if not bool(known.all()):
            if unknown != "skip":
                missing = ", ".join(repr(c) for c in self.unknown(text)[:20])
                raise CharLMError(f"characters not in the model's vocabulary: {missing}")
            pos = pos[known]
        return pos

    def table_from(self, other: Vocab) -> np.ndarray:
        """For each id of `other`, the id of the same character here (-1 where there is none)."""
        return np.array([self._index.get(c, -1) for c in other.chars], dtype=np.int64)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = self.chars
        return "".join(chars[i] for i in ids)


def _codepoints(text: str) -> torch.Tensor:
    """Unicode code points of `text` as an int32 tensor (via UTF-32, no Python loop)."""
    data = bytearray(text.encode("utf-32-le" if sys.byteorder == "little" else "utf-32-be",
                                 "surrogatepass"))
    return torch.frombuffer(data, dtype=torch.int32)
