"""Character vocabulary: sorted Unicode code points, the id order of every model.

Text becomes ids in one way everywhere: its Unicode code points (`codepoints`, through
UTF-32, no per-character Python loop) looked up in the vocabulary's sorted code points
(`Vocab.lookup`). The corpus cache (`charlm.data.cache`) streams whole corpora through
`codepoints`; primes, evaluation text, inspected passages and novelty queries go through
`Vocab.lookup` / `Vocab.encode`.
"""

from __future__ import annotations

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
        self._codes = codepoints(chars).astype(np.int64)  # sorted: the ids' order

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._index

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, sorted, each once."""
        return sorted(set(text) - self._index.keys())

    def lookup(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """For each character of `text`: its id (int64; 0 where it has none) and whether the
        vocabulary has it (bool)."""
        codes = codepoints(text).astype(np.int64)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self) - 1)
        known = self._codes[pos] == codes
        return np.where(known, pos, 0), known

    def encode(self, text: str, unknown: str = "error") -> torch.Tensor:
        """Ids of `text` (int64). `unknown`: "error" raises naming the characters; "skip"
        drops them."""
        ids, known = self.lookup(text)
        if not known.all():
            if unknown != "skip":
                missing = ", ".join(repr(c) for c in self.unknown(text)[:20])
                raise CharLMError(f"characters not in the model's vocabulary: {missing}")
            ids = ids[known]
        return torch.from_numpy(ids)

    def table_from(self, other: Vocab) -> np.ndarray:
        """For each id of `other`, the id of the same character here (-1 where there is none)."""
        return np.array([self._index.get(c, -1) for c in other.chars], dtype=np.int64)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = self.chars
        return "".join(chars[i] for i in ids)


def codepoints(text: str) -> np.ndarray:
    """Unicode code points of `text` (uint32, a lone surrogate as itself); ASCII text, whose
    bytes are its code points, as uint8 without the UTF-32 copy."""
    if text.isascii():  # O(1) in CPython
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
