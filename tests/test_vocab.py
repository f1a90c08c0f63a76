"""Character vocabulary: Unicode code points (not bytes), sorted, exact round trips."""

from __future__ import annotations

import pytest
import torch

from charlm.errors import CharLMError
from charlm.vocab import Vocab, id_dtype

TEXT = "Grüße aus Köln 🎉 — naïve café, 𝔘nicode!\n"


def test_build_uses_unicode_characters_not_bytes():
    vocab, ids = Vocab.build(TEXT)
    assert len(vocab) == len(set(TEXT))  # one id per distinct character
    assert len(ids) == len(TEXT)  # one id per character, not per UTF-8 byte
    for ch in ("ö", "🎉", "—", "𝔘"):
        assert ch in vocab
        assert vocab.encode(ch).tolist() == [vocab.chars.index(ch)]
    assert vocab.encode("🎉").shape == (1,)


def test_build_is_sorted_by_code_point():
    vocab, _ = Vocab.build("cab🎉öa b")
    assert vocab.chars == "".join(sorted(set("cab🎉öa b")))
    assert list(map(ord, vocab.chars)) == sorted(map(ord, vocab.chars))


def test_build_ids_match_encode_and_round_trip():
    vocab, ids = Vocab.build(TEXT)
    assert ids.dtype == torch.uint8  # small vocabularies store ids as bytes
    assert ids.long().tolist() == vocab.encode(TEXT).tolist()
    assert vocab.decode(ids) == TEXT
    assert vocab.decode(vocab.encode(TEXT)) == TEXT
    assert vocab.decode(vocab.encode(TEXT).tolist()) == TEXT  # plain lists too
    assert vocab.encode(TEXT).dtype == torch.int64


def test_same_text_same_vocab():
    a, ids_a = Vocab.build(TEXT)
    b, ids_b = Vocab.build(TEXT[::-1] * 2)  # order and counts do not matter
    assert a.chars == b.chars
    c = Vocab(a.chars)  # rebuilt from the stored string, as a checkpoint does
    assert c.encode(TEXT).tolist() == ids_a.long().tolist()


def test_unknown_characters_raise_naming_them():
    vocab, _ = Vocab.build("hello world")
    with pytest.raises(CharLMError) as info:
        vocab.encode("hello wörld 🎉")
    msg = str(info.value)
    assert "'ö'" in msg and "'🎉'" in msg
    assert "'h'" not in msg  # only the unknown ones are named
    assert vocab.unknown("hello wörld 🎉") == sorted(["ö", "🎉"])


def test_unknown_characters_skipped_on_request():
    vocab, _ = Vocab.build("hello world")
    ids = vocab.encode("hé🎉llo", unknown="skip")
    assert vocab.decode(ids) == "hllo"
    assert vocab.encode("éè", unknown="skip").tolist() == []


def test_empty_inputs():
    vocab, _ = Vocab.build("ab")
    assert vocab.encode("").tolist() == []
    assert vocab.decode([]) == ""
    with pytest.raises(CharLMError, match="empty"):
        Vocab.build("")
    with pytest.raises(CharLMError, match="empty"):
        Vocab("")


@pytest.mark.parametrize("chars", ["ba", "aab"])
def test_vocab_rejects_unsorted_or_duplicate_chars(chars):
    with pytest.raises(CharLMError):
        Vocab(chars)


@pytest.mark.parametrize(
    ("size", "dtype"),
    [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16), (40000, torch.int32)],
)
def test_id_dtype_is_smallest_that_fits(size, dtype):
    assert id_dtype(size) == dtype


def test_large_vocabulary_uses_wider_ids():
    text = "".join(chr(0x4E00 + i) for i in range(300))  # 300 CJK characters
    vocab, ids = Vocab.build(text)
    assert len(vocab) == 300
    assert ids.dtype == torch.int16
    assert int(ids.max()) == 299
    assert vocab.decode(ids) == text
