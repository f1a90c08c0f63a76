"""The streaming encoder and its memory-mapped cache: same ids as the in-memory path,
compact dtypes, reuse on a second run, rebuild when a source changes, clean failures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXT, TINY, charlm_cmd, subprocess_env

from charlm.data import sources as corpus_mod
from charlm.data.cache import _IdWriter, encode_corpus, reopen_corpus
from charlm.data.checked import CheckedIds
from charlm.data.sources import DOC_SEPARATOR
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError, CharLMWarning


def decode(enc) -> str:
    return "".join(enc.vocab.chars[i] for i in enc.ids.tolist())


def test_ids_match_the_in_memory_vocabulary(tmp_path: Path):
    (tmp_path / "a.txt").write_text("Grüße 🎉 and a tab\t\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second ÿ document", encoding="utf-8")
    enc = encode_corpus([str(tmp_path)], cache_dir=tmp_path / "cache")
    text = "Grüße 🎉 and a tab\t\n" + DOC_SEPARATOR + "second ÿ document"
    vocab = Vocab("".join(sorted(set(text))))
    assert enc.vocab.chars == vocab.chars  # code-point order, as Vocab uses
    assert enc.ids.dtype == np.uint8 and isinstance(enc.ids, CheckedIds) and enc.ids.memory_mapped
    assert enc.ids.tolist() == vocab.encode(text).tolist()
    assert enc.desc["chars"] == len(text) and enc.encoded
    assert decode(enc) == "Grüße 🎉 and a tab\t\n" + DOC_SEPARATOR + "second ÿ document"


def test_chunk_boundaries_inside_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # 7-byte chunks split most of these 2-4 byte characters between two reads.
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 7)
    text = "\ufeffé🎉ü中x" * 50
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    enc = encode_corpus([str(path)], cache_dir=tmp_path / "cache")
    # Only the leading BOM goes; the 49 later ones are text (zero-width no-break spaces).
    assert decode(enc) == text[1:] and decode(enc).count("\ufeff") == 49
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok" * 20 + b"\xff" + b"more")
    with pytest.raises(CharLMError, match="not valid UTF-8 at byte 40"):
        encode_corpus([str(bad)], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("distinct, dtype", [(256, np.uint8), (257, np.uint16), (70_000, np.uint32)])
def test_the_smallest_dtype_that_holds_the_vocabulary(tmp_path: Path, distinct: int, dtype):
    # Characters arrive in reverse code-point order, so ids are renumbered at the end; the
    # array widens mid-stream once the vocabulary outgrows its type.
    chars = [chr(c) for c in range(0x20, 0x20 + distinct + 2048) if not 0xD800 <= c < 0xE000][:distinct]
    text = "".join(reversed(chars)) + "".join(chars)
    path = tmp_path / "v.txt"
    path.write_text(text, encoding="utf-8")
    enc = encode_corpus([str(path)], cache_dir=tmp_path / "cache")
    assert enc.ids.dtype == dtype and len(enc.vocab) == distinct
    assert decode(enc) == text


def test_writer_widens_and_renumbers_across_its_own_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_IdWriter, "CHUNK", 3)  # read-modify-write in many small pieces
    with open(tmp_path / "ids", "w+b") as fh:
        writer = _IdWriter(fh)
        parts = ["zyx" * 5, "".join(chr(0x100 + i) for i in range(300)), "abc"]
        for part in parts:
            writer.add(part)
        chars = writer.finish()
        ids = np.fromfile(tmp_path / "ids", dtype=writer.dtype)
    assert writer.dtype == np.uint16 and chars == "".join(sorted(set("".join(parts))))
    assert "".join(chars[i] for i in ids) == "".join(parts)


def test_second_run_reuses_the_cache_and_a_changed_source_rebuilds(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    cache = tmp_path / "cache"
    first = encode_corpus([str(path)], cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert first.encoded and len(files) == 2  # ids + description
    second = encode_corpus([str(path)], cache_dir=cache)
    assert not second.encoded and second.path == first.path
    assert second.ids.tolist() == first.ids.tolist()
    # Same size, one character changed: a new key, a new entry; the old one stays valid.
    path.write_text(TEXT.replace("Union", "Onion", 1), encoding="utf-8")
    third = encode_corpus([str(path)], cache_dir=cache)
    assert third.encoded and third.path != first.path
    assert decode(third) == TEXT.replace("Union", "Onion", 1)
    assert third.desc["sha256"] != first.desc["sha256"]
    # The cache key is the content, not the path: a copy elsewhere hits the same entry.
    copy = tmp_path / "elsewhere.txt"
    copy.write_text(TEXT, encoding="utf-8")
    assert not encode_corpus([str(copy)], cache_dir=cache).encoded
    # The encoding is part of the key.
    assert encode_corpus([str(copy)], "latin-1", cache_dir=cache).encoded


def test_an_incomplete_or_damaged_entry_is_rebuilt(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    cache = tmp_path / "cache"
    enc = encode_corpus([str(path)], cache_dir=cache)
    meta = enc.path.with_suffix(".json")
    enc.path.write_bytes(enc.path.read_bytes()[:-5])  # truncated ids
    again = encode_corpus([str(path)], cache_dir=cache)
    assert again.encoded and decode(again) == TEXT
    meta.unlink()  # ids without a description: a writer killed before it finished
    assert encode_corpus([str(path)], cache_dir=cache).encoded
    meta.write_text("{not json", encoding="utf-8")
    assert encode_corpus([str(path)], cache_dir=cache).encoded
    assert json.loads(meta.read_text(encoding="utf-8"))["chars"] == len(TEXT)
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_reopen_checks_the_recorded_hash_and_vocabulary(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    enc = encode_corpus([str(path)], cache_dir=tmp_path / "cache")
    again = reopen_corpus(enc.desc, tmp_path / "latest.pt", enc.vocab.chars, cache_dir=tmp_path / "cache")
    assert not again.encoded and again.desc == enc.desc and not again.sources_gone
    with pytest.raises(CharLMError, match="vocabulary differs"):  # a corpus character the model lacks
        reopen_corpus(enc.desc, tmp_path / "latest.pt", enc.vocab.chars[1:], cache_dir=tmp_path / "cache")
    # A larger vocabulary is a records model's (markers) or a fine-tuned one's (merged): fine.
    assert reopen_corpus(enc.desc, tmp_path / "latest.pt", "\x02\x03" + enc.vocab.chars,
                         cache_dir=tmp_path / "cache").vocab.chars == enc.vocab.chars
    path.write_text(TEXT + "!", encoding="utf-8")
    with pytest.raises(CharLMError, match="corpus changed"):
        reopen_corpus(enc.desc, tmp_path / "latest.pt", enc.vocab.chars, cache_dir=tmp_path / "cache")


def test_reopen_uses_the_cache_when_the_files_are_gone(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    enc = encode_corpus([str(path)], cache_dir=tmp_path / "cache")
    path.unlink()
    with pytest.warns(CharLMWarning, match="c.txt: no such file.*from the cache"):
        again = reopen_corpus(enc.desc, tmp_path / "latest.pt", enc.vocab.chars, cache_dir=tmp_path / "cache")
    assert again.sources_gone and decode(again) == TEXT
    # Neither the files nor the cache: the missing file is named.
    with pytest.raises(CharLMError, match="no such file"):
        reopen_corpus(enc.desc, tmp_path / "latest.pt", enc.vocab.chars, cache_dir=tmp_path / "other-cache")


def test_unusable_cache_folder_is_one_clear_error(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(CharLMError, match="corpus cache .*CHARLM_CACHE_DIR"):
        encode_corpus([str(path)], cache_dir=blocker / "cache")


def test_cli_second_run_says_it_used_the_cache(tmp_path: Path, corpus_file: Path):
    cache = tmp_path / "cache"
    env = subprocess_env(CHARLM_CACHE_DIR=str(cache))
    flags = [f for f in TINY if f != "--quiet"]
    outs = []
    for run in ("one", "two"):
        proc = subprocess.run([*charlm_cmd(), "train", str(corpus_file), "--out", str(tmp_path / run),
                               "--max-steps", "5", *flags], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stderr)
    assert "encoded in" in outs[0] and "cached in" in outs[0]
    assert "from the cache" in outs[1]
    assert len(list(cache.glob("*.ids"))) == 1


def test_the_source_key_never_changes_with_the_cache_layout(tmp_path, monkeypatch):
    """Every checkpoint records its corpus's key: a layout change (the cache's FORMAT) must not
    change it, or no earlier run could resume. The version-1 fixture's corpus still hashes to
    the key its checkpoint recorded in 2026-11."""
    import torch
    from conftest import ROOT

    fixture = ROOT / "tests" / "fixtures" / "v1"
    recorded = torch.load(fixture / "run-v1.pt", weights_only=True)["corpus"]["sha256"]
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    assert encode_corpus([str(fixture / "corpus.txt")]).desc["sha256"] == recorded
