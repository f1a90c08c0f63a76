"""Character vocabulary: Unicode code points (not bytes), sorted, exact round trips."""

from __future__ import annotations

import pytest
import torch

from charlm.data.vocab import Vocab
from charlm.errors import CharLMError

TEXT = "Grüße aus Köln 🎉 — naïve café, 𝔘nicode!\n"


def vocab_of(text: str) -> Vocab:
    return Vocab("".join(sorted(set(text))))


def test_unicode_characters_not_bytes_and_exact_round_trips():
    vocab = vocab_of(TEXT)
    assert len(vocab) == len(set(TEXT))  # one id per distinct character
    ids = vocab.encode(TEXT)
    assert len(ids) == len(TEXT) and ids.dtype == torch.int64  # one id per character, not per byte
    for ch in ("ö", "🎉", "—", "𝔘"):
        assert ch in vocab
        assert vocab.encode(ch).tolist() == [vocab.chars.index(ch)]
    assert vocab.decode(ids) == TEXT
    assert vocab.decode(ids.tolist()) == TEXT  # plain lists too


def test_table_from_maps_ids_by_character():
    mine, other = vocab_of("abcé"), vocab_of("bcdé🎉")
    table = mine.table_from(other)  # other's ids -> mine, -1 where mine has no such character
    assert table.tolist() == [1, 2, -1, 3, -1]


def test_unknown_characters_raise_naming_them():
    vocab = vocab_of("hello world")
    with pytest.raises(CharLMError) as info:
        vocab.encode("hello wörld 🎉")
    msg = str(info.value)
    assert "'ö'" in msg and "'🎉'" in msg
    assert "'h'" not in msg  # only the unknown ones are named
    assert vocab.unknown("hello wörld 🎉") == sorted(["ö", "🎉"])


def test_unknown_characters_skipped_on_request():
    vocab = vocab_of("hello world")
    ids = vocab.encode("hé🎉llo", unknown="skip")
    assert vocab.decode(ids) == "hllo"
    assert vocab.encode("éè", unknown="skip").tolist() == []


def test_empty_inputs():
    vocab = vocab_of("ab")
    assert vocab.encode("").tolist() == []
    assert vocab.decode([]) == ""
    with pytest.raises(CharLMError, match="empty"):
        Vocab("")


@pytest.mark.parametrize("chars", ["ba", "aab"])
def test_vocab_rejects_unsorted_or_duplicate_chars(chars):
    with pytest.raises(CharLMError):
        Vocab(chars)


def test_text_becomes_ids_one_way_everywhere():
    """Code points, looked up in the vocabulary's sorted code points: the same ids for ASCII
    (read as its bytes) and for any other text, lone surrogates included, and the ids the
    novelty index and the inspector read text with are the vocabulary's."""
    import numpy as np

    from charlm.data.vocab import codepoints

    assert codepoints("Ab").dtype == np.uint8 and codepoints("Äb").dtype == np.dtype("<u4")
    assert codepoints("Ab").tolist() == [65, 98] and codepoints("Ä\ud800b").tolist() == [196, 0xD800, 98]
    vocab = vocab_of(TEXT + "\ud800")
    ids, known = vocab.lookup("xGü🎉\ud800")
    assert known.tolist() == [False, True, True, True, True]
    assert ids[1:].tolist() == vocab.encode("Gü🎉\ud800").tolist() and ids[0] == 0
    assert vocab.encode("Gau").tolist() == vocab.encode("Gau é").tolist()[:3]  # the ASCII path agrees
