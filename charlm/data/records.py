"""Records: a corpus of many short texts (names, one per line; paragraphs) instead of one stream.

`--records lines` makes every non-blank line a record; `--records blank-lines` makes every
paragraph (lines up to one or more blank lines) a record. A line holding only whitespace is
blank; a trailing carriage return (`\\r\\n` files) is not part of a record. Each record is
read by the model from a fresh state after a start marker and ends with an end marker:

    record "Ann":   inputs  START  A  n  n
                    targets   A    n  n  END

so the end marker is a predicted character (it is what ends a record) and the start marker
never is. No state or gradient crosses from one record to the next (`charlm.data.record_batch`);
sampling generates whole records the same way (`charlm.generation.sampler`).
The markers are two characters no text uses (U+0002 STX, U+0003 ETX) added to the model's
vocabulary; a corpus that contains them is refused.

Records are found in the memory-mapped corpus ids (`charlm.data.cache`) without decoding the
text: a record is its start in the ids and its length (16 bytes per record). The model's
ids come from the corpus's through a table, a window at a time. The held-out part is the
last `val_fraction` of the records, whole records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from charlm.data.checked import CheckedIds
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError

START = "\x02"  # STX: read first, from a fresh state; never a target
END = "\x03"  # ETX: the target after a record's last character
MARKERS = START + END
# How records are written one after another (the corpus's own separators).
SEPARATORS = {"lines": "\n", "blank-lines": "\n\n"}
_CHUNK = 1 << 22  # ids scanned at a time while finding records
_WHAT = {"lines": "line breaks", "blank-lines": "blank lines"}


@dataclass
class RecordSet:
    """Records of a corpus: where each starts in the corpus ids and how long it is, and the
    table that turns corpus ids into the model's."""

    ids: np.ndarray | CheckedIds  # (N,) the corpus ids (its own vocabulary), usually the cache's
    table: np.ndarray  # (V_corpus,) corpus id -> model id (int64; -1: not in the model's vocabulary)
    starts: np.ndarray  # (R,) int64, first character of each record in `ids`
    lengths: np.ndarray  # (R,) int64, characters of each record (markers not counted)
    start_id: int
    end_id: int
    mode: str  # "lines" | "blank-lines"

    @property
    def count(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        """Characters a pass scores: every record's characters and its end marker."""
        return int(self.lengths.sum()) + self.count

    def subset(self, index: slice | np.ndarray) -> RecordSet:
        """These records only (a slice, or record numbers in any order)."""
        return replace(self, starts=self.starts[index], lengths=self.lengths[index])

    def split(self, val_fraction: float) -> RecordSplit:
        """The training records and the held-out ones: the last `val_fraction` of the records
        (at least one), whole records."""
        if self.count < 2:
            raise CharLMError(
                f"--records {self.mode}: the corpus holds {self.count} record{'s' if self.count != 1 else ''} "
                f"(no {_WHAT[self.mode]} separate records), and records mode needs many to train and hold "
                "some out; give a corpus with one record per "
                f"{'line' if self.mode == 'lines' else 'paragraph'}, or drop --records to train on one stream")
        n_val = max(1, int(self.count * val_fraction))
        cut = self.count - n_val
        return RecordSplit(self.subset(slice(0, cut)), self.subset(slice(cut, self.count)))

    def text(self, i: int, vocab: Vocab) -> str:
        """Record `i` as text (`vocab`: the corpus's own)."""
        start = int(self.starts[i])
        return vocab.decode(np.asarray(self.ids[start:start + int(self.lengths[i])]).tolist())

    def end_offset(self) -> int:
        """Where the last record ends in the corpus ids (0 without records)."""
        return int(self.starts[-1] + self.lengths[-1]) if self.count else 0


@dataclass
class RecordSplit:
    """The training records and the held-out ones (the last `val_fraction`, whole records)."""

    train: RecordSet
    val: RecordSet

    @property
    def train_end(self) -> int:
        """Where the last training record ends in the corpus ids."""
        return self.train.end_offset()

    @property
    def val_start(self) -> int:
        """Where the first held-out record starts in the corpus ids."""
        return int(self.val.starts[0])


def check_markers(corpus_chars: str, mode: str) -> None:
    """Refuse a corpus that uses a marker character: records could not be told apart."""
    for ch, name in ((START, "start"), (END, "end")):
        if ch in corpus_chars:
            raise CharLMError(
                f"--records {mode}: the corpus contains U+{ord(ch):04X}, which charlm reserves as its "
                f"{name}-of-record marker; remove it from the text, or drop --records")


def record_set(ids: np.ndarray | CheckedIds, corpus_vocab: Vocab, model_vocab: Vocab, mode: str) -> RecordSet:
    """The records of a corpus (its ids in `corpus_vocab`) for a model with `model_vocab`."""
    check_markers(corpus_vocab.chars, mode)
    starts, lengths = find_records(ids, corpus_vocab.chars, mode)
    table = model_vocab.table_from(corpus_vocab)
    return RecordSet(ids, table, starts, lengths, int(model_vocab.encode(START)[0]),
                     int(model_vocab.encode(END)[0]), mode)


def find_records(ids: np.ndarray | CheckedIds, chars: str, mode: str,
                 chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Start and length (int64 arrays) of every record in `ids` (a corpus in the vocabulary
    `chars`): non-blank lines (`lines`) or runs of non-blank lines (`blank-lines`), without a
    trailing carriage return. Read a chunk of ids at a time."""
    if mode not in SEPARATORS:
        raise CharLMError(f"--records: {mode!r} is not one of {', '.join(SEPARATORS)}")
    n = len(ids)
    lookup = {c: i for i, c in enumerate(chars)}
    # Line breaks (global positions), and the non-whitespace characters before each
    # boundary, read from a running count so no array as long as the corpus is made.
    breaks = []
    nl = lookup.get("\n")
    if nl is not None:
        for a in range(0, n, chunk):
            breaks.append(np.flatnonzero(np.asarray(ids[a:a + chunk]) == nl) + a)
    newlines = np.concatenate(breaks) if breaks else np.zeros(0, dtype=np.int64)
    line_starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    line_ends = np.concatenate([newlines, [n]]).astype(np.int64)
    solid = np.ones(len(chars), dtype=np.int64)
    solid[np.array([i for i, c in enumerate(chars) if c.isspace()], dtype=np.int64)] = 0
    filled = _counts_at(ids, solid, line_ends, chunk) - _counts_at(ids, solid, line_starts, chunk)
    cr = lookup.get("\r")
    if cr is not None:  # a \r\n line ends before its \r
        nonempty = line_ends > line_starts
        last = np.asarray(ids[np.maximum(line_ends - 1, 0)]) == cr
        line_ends = line_ends - (nonempty & last)
    full = filled > 0
    if mode == "lines":
        return line_starts[full], line_ends[full] - line_starts[full]
    before = np.concatenate([[False], full[:-1]])
    after = np.concatenate([full[1:], [False]])
    first, last_line = full & ~before, full & ~after  # a paragraph's first and last line
    starts = line_starts[first]
    return starts, line_ends[last_line] - starts


def _counts_at(ids: np.ndarray | CheckedIds, weight: np.ndarray, positions: np.ndarray, chunk: int) -> np.ndarray:
    """For each of the sorted `positions` q: the sum of `weight[ids[i]]` over i < q."""
    out = np.zeros(len(positions), dtype=np.int64)
    total = 0
    n = len(ids)
    for a in range(0, max(n, 1), chunk):
        block = weight[np.asarray(ids[a:a + chunk])]
        running = np.cumsum(block)
        lo, hi = np.searchsorted(positions, [a, a + len(block)], side="right")
        inside = positions[lo:hi]  # a < q <= a + len(block)
        out[lo:hi] = total + running[inside - a - 1]
        total += int(running[-1]) if len(running) else 0
    return out


def split_text(text: str, mode: str) -> list[str]:
    """A text's records as strings, found by the same rules as `find_records`."""
    vocab = Vocab("".join(sorted(set(text)))) if text else None
    if vocab is None:
        return []
    ids = vocab.encode(text).numpy()
    starts, lengths = find_records(ids, vocab.chars, mode)
    return [text[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def known_records(rs: RecordSet, chunk: int = _CHUNK) -> tuple[RecordSet, int]:
    """The records whose every character the model knows, and how many characters the
    others hold (a record is scored whole or not at all)."""
    unknown = np.flatnonzero(rs.table < 0)
    if not len(unknown) or not rs.count:
        return rs, 0
    bad = np.zeros(rs.count, dtype=bool)
    for a in range(0, len(rs.ids), chunk):
        at = np.flatnonzero(np.isin(np.asarray(rs.ids[a:a + chunk]), unknown)) + a
        rec = np.searchsorted(rs.starts, at, side="right") - 1
        inside = (rec >= 0) & (at < rs.starts[np.maximum(rec, 0)] + rs.lengths[np.maximum(rec, 0)])
        bad[rec[inside]] = True
    return rs.subset(np.flatnonzero(~bad)), int(rs.lengths[bad].sum() + bad.sum())
