"""What a run trains on, in its model's vocabulary.

The corpus cache (`charlm.encode`) holds ids in the corpus's own vocabulary. A model's
vocabulary can be larger: records mode adds its two markers, and fine-tuning keeps every
character the earlier model knew. The ids are then read through a table, a window at a time
(`charlm.data.Translated`, `charlm.records.RecordSet`), never translated into a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charlm.data import Ids, Translated
from charlm.errors import CharLMError
from charlm.records import MARKERS, RecordSet, check_markers, record_set
from charlm.vocab import Vocab

if TYPE_CHECKING:
    from charlm.encode import EncodedCorpus


def model_vocab(corpus_chars: str, records: str = "", base_chars: str = "") -> Vocab:
    """The vocabulary of a new model: the corpus's characters, the record markers in records
    mode, and every character of the model it starts from (`base_chars`), by code point."""
    if records:
        check_markers(corpus_chars, records)
    chars = set(corpus_chars) | set(base_chars) | (set(MARKERS) if records else set())
    return Vocab("".join(sorted(chars)))


def training_data(corpus: EncodedCorpus, vocab: Vocab, records: str = "") -> Ids | RecordSet:
    """The corpus as the Trainer reads it for a model with `vocab`: its ids (read through a
    table when the vocabularies differ), or its records (`records` mode). Raises
    `CharLMError` when a corpus character has no id in `vocab` or records cannot be split."""
    missing = sorted(set(corpus.vocab.chars) - set(vocab.chars))
    if missing:
        raise CharLMError(f"the corpus holds characters the model's vocabulary lacks: "
                          f"{', '.join(repr(c) for c in missing[:20])}")
    if records:
        rs = record_set(corpus.ids, corpus.vocab, vocab, records)
        rs.split(0.0)  # refuses a corpus of fewer than two records, before anything is written
        return rs
    if corpus.vocab.chars == vocab.chars:
        return corpus.ids
    return Translated(corpus.ids, vocab.table_from(corpus.vocab))
