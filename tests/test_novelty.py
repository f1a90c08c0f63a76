"""Novelty: the suffix array, matching statistics and the report on texts whose answers are
known; the index cached beside the corpus, reused and rebuilt; `charlm novelty` and
`charlm sample --novelty`; bad input."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, one_line_error
from typer.testing import CliRunner

from charlm.analysis.novelty import exact_records, format_report, matching_statistics, novelty_report, record_report
from charlm.analysis.suffix import TrainingIndex, open_index, suffix_array
from charlm.cli import app
from charlm.data.cache import encode_corpus
from charlm.data.sources import DOC_SEPARATOR
from charlm.data.streams import split
from charlm.data.vocab import Vocab
from charlm.storage import checkpoint

ALPHABET = "abcdefgh ."


def random_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def brute_longest(train: str, text: str) -> list[int]:
    """Matching statistics the slow way: the longest prefix of text[i:] found in train."""
    out = []
    for i in range(len(text)):
        length = 0
        while i + length < len(text) and text[i:i + length + 1] in train:
            length += 1
        out.append(length)
    return out


def index_of(tmp_path: Path, docs: dict[str, str], n_train: int | None = None) -> TrainingIndex:
    folder = tmp_path / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    corpus = encode_corpus([str(folder)], cache_dir=tmp_path / "cache")
    return open_index(corpus, len(corpus.ids) if n_train is None else n_train)


# --- the suffix array and matching statistics ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_suffix_array_matches_a_brute_force_sort(dtype):
    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(0, 50))
        ids = rng.integers(0, int(rng.integers(1, 5)), n)
        if dtype != np.uint8 and trial % 2:
            # Ids above 255 (and above 65535), so the big-endian byte order is what sorts.
            ids = ids * (257 if dtype == np.uint16 else 65_537) + 3
        ids = ids.astype(dtype)
        sa = suffix_array(ids)
        assert sa.tolist() == sorted(range(n), key=lambda i: ids[i:].tolist()), ids
        assert sa.dtype == np.int32


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_matching_statistics_match_brute_force(dtype):
    rng = np.random.default_rng(11)
    chars = "abc"
    for trial in range(120):
        train = "".join(rng.choice(list(chars), int(rng.integers(1, 60))))
        text = "".join(rng.choice(list(chars + "z"), int(rng.integers(0, 40))))  # z: unknown
        if trial % 3 == 0:
            a = int(rng.integers(0, len(train)))
            text = text[:5] + train[a:a + int(rng.integers(1, 30))] + text[5:]
        vocab = Vocab(chars)
        ids = np.array([chars.index(c) for c in train], dtype=dtype)
        index = TrainingIndex(ids, suffix_array(ids), vocab, ["doc"], np.array([0]), Path("x"), True, 0.0)
        texts = [text, text[::-1], train[:3]]  # several samples: no match runs across two
        for text, (length, where) in zip(texts, matching_statistics(index, texts), strict=True):
            assert length.tolist() == brute_longest(train, text), (train, text)
            for i, (n, at) in enumerate(zip(length.tolist(), where.tolist(), strict=True)):
                assert train[at:at + n] == text[i:i + n] if n else at == -1


# --- the report on constructed texts ----------------------------------------------------------


def test_a_copied_40_character_span_is_found_at_its_document_and_offset(tmp_path):
    docs = {"a.txt": random_text(1, 3000), "b.txt": random_text(2, 3000), "c.txt": random_text(3, 3000)}
    index = index_of(tmp_path, docs)
    span = docs["b.txt"][1234:1274]
    generated = "zz" + span + "zz"  # 'z' never occurs in the training text
    report = novelty_report(index, ["x" * 5, generated])
    longest = report["longest_span"]
    assert longest["length"] == 40
    assert longest["sample"] == 2 and longest["sample_offset"] == 2
    assert longest["document"] == str((tmp_path / "docs" / "b.txt").resolve())
    assert longest["document_offset"] == 1234
    assert longest["training_offset"] == 3000 + len(DOC_SEPARATOR) + 1234
    assert longest["excerpt"] == span
    assert report["unknown_chars"] == 4 + 5 and report["chars"] == 49 and report["samples"] == 2
    # The 40-character span holds 33 8-grams, 25 16-grams and 9 32-grams that occur in the
    # training text; every other n-gram touches a 'z' or an 'x' and occurs nowhere.
    assert report["ngrams"]["8"] == {"total": 37, "novel": 4, "novel_share": round(4 / 37, 6)}
    assert report["ngrams"]["16"] == {"total": 29, "novel": 4, "novel_share": round(4 / 29, 6)}
    assert report["ngrams"]["32"] == {"total": 13, "novel": 4, "novel_share": round(4 / 13, 6)}
    text = format_report(report)
    where = f'from {longest["document"]} at character 1,234'
    assert f'longest copied span: 40 characters (sample 2), {where}: "{span}"' in text


def test_characters_arranged_never_to_occur_are_all_novel(tmp_path):
    # The training text alternates a and b, so "aa" (and every n-gram of "aaa...") never occurs.
    index = index_of(tmp_path, {"ab.txt": "ab" * 500})
    report = novelty_report(index, ["a" * 100, "b" * 50])
    assert report["longest_span"]["length"] == 1
    for n, total in (("8", 93 + 43), ("16", 85 + 35), ("32", 69 + 19)):
        assert report["ngrams"][n] == {"total": total, "novel": total, "novel_share": 1.0}
    assert "novel 8-grams: 100.0% (136 of 136)" in format_report(report)


def test_exact_counts_for_a_hand_case(tmp_path):
    # Training text "abcabd" (the corpus's last two characters are held out).
    index = index_of(tmp_path, {"t.txt": "abcabdXY"}, n_train=6)
    [(length, where)] = matching_statistics(index, ["abcabc"])
    assert length.tolist() == [5, 4, 3, 3, 2, 1]
    assert where.tolist()[:3] == [0, 1, 2]
    report = novelty_report(index, ["abcabc"], ngram_sizes=(3, 5))
    assert report["ngrams"] == {"3": {"total": 4, "novel": 0, "novel_share": 0.0},
                                "5": {"total": 2, "novel": 1, "novel_share": 0.5}}
    assert report["longest_span"]["length"] == 5 and report["longest_span"]["training_offset"] == 0
    # The held-out tail is not training text: "dX" is new.
    [(length, _)] = matching_statistics(index, ["dXY"])
    assert length.tolist() == [1, 0, 0]
    empty = novelty_report(index, [""])
    assert empty["longest_span"] == {"length": 0} and empty["ngrams"]["8"]["novel_share"] is None


def test_the_held_out_tail_is_not_training_text(tmp_path):
    text = random_text(5, 4000)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "t.txt").write_text(text, encoding="utf-8")
    corpus = encode_corpus([str(folder)], cache_dir=tmp_path / "cache")
    n_train = len(split(corpus.ids, 0.1).train)
    index = open_index(corpus, n_train)
    tail = text[-300:]
    [(length, _)] = matching_statistics(index, [tail])
    assert length.tolist() == brute_longest(text[:n_train], tail)
    assert max(length) < 12  # random text: only short pieces of the tail recur earlier


def test_exact_training_records(tmp_path):
    index = index_of(tmp_path, {"r.txt": "apple\nbanana\ncherry pie\nfig"})
    records = ["banana", "apple", "cherry pie", "fig", "nana", "cherry", "grape", "banana\ncherry pie", "", "fi"]
    assert exact_records(index, records).tolist() == [True, True, True, True, False, False, False, False, False, False]
    assert record_report(index, records) == {"records": 10, "exact": 4, "novel": 6, "exact_share": 0.4}
    assert record_report(index, []) == {"records": 0, "exact": 0, "novel": 0, "exact_share": None}
    only = index_of(tmp_path / "one", {"r.txt": "single"})
    assert exact_records(only, ["single", "singl"]).tolist() == [True, False]


# --- the cached index -------------------------------------------------------------------------


def test_the_index_is_kept_beside_the_corpus_and_reused(tmp_path):
    index = index_of(tmp_path, {"a.txt": random_text(1, 2000)})
    assert index.built and index.path.parent == tmp_path / "cache"
    key = next((tmp_path / "cache").glob("*.ids")).stem
    assert index.path.name == f"{key}.train2000.sa"
    stat = index.path.stat()
    corpus = encode_corpus([str(tmp_path / "docs")], cache_dir=tmp_path / "cache")
    again = open_index(corpus, 2000)
    assert not again.built
    assert (index.path.stat().st_ino, index.path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [f"{key}.ids", f"{key}.json", f"{key}.train2000.sa", f"{key}.train2000.sa.json"])
    # Another training length (another --val-fraction) is another index.
    assert open_index(corpus, 1500).built


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(path.stat().st_size)))


def _one_entry(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[400:404] = (123).to_bytes(4, "little")  # a small change the spot check may miss
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, as in life


@pytest.mark.parametrize("damage", [
    lambda p: p.unlink(),
    lambda p: p.write_bytes(p.read_bytes()[:-4]),
    _garbage,
    _one_entry,
    lambda p: p.with_name(p.name + ".json").write_text("{not json", encoding="utf-8"),
    lambda p: p.with_name(p.name + ".json").unlink(),
], ids=["missing", "truncated", "overwritten", "one-entry", "bad-description", "no-description"])
def test_a_damaged_index_is_rebuilt(tmp_path, damage):
    docs = {"a.txt": random_text(1, 2000), "b.txt": random_text(2, 2000)}
    index = index_of(tmp_path, docs)
    good = np.array(index.sa)
    damage(index.path)
    corpus = encode_corpus([str(tmp_path / "docs")], cache_dir=tmp_path / "cache")
    again = open_index(corpus, len(corpus.ids))
    assert again.built
    assert np.array_equal(np.array(again.sa), good)
    assert not open_index(corpus, len(corpus.ids)).built
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


def test_a_copied_index_with_a_new_time_is_checked_and_kept(tmp_path):
    index = index_of(tmp_path, {"a.txt": random_text(1, 2000)})
    st = index.path.stat()
    os.utime(index.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new time
    corpus = encode_corpus([str(tmp_path / "docs")], cache_dir=tmp_path / "cache")
    assert not open_index(corpus, len(corpus.ids)).built  # its checksums hold: nothing to rebuild


def test_bit_rot_under_an_unchanged_time_is_found_and_the_index_rebuilt(tmp_path):
    """Damage that leaves the file's time as it was (a failing disk): the index's blocks are
    checked by their checksums, not trusted by their time."""
    docs = {"a.txt": random_text(1, 2000), "b.txt": random_text(2, 2000)}
    index = index_of(tmp_path, docs)
    good = np.array(index.sa)
    st = index.path.stat()
    data = bytearray(index.path.read_bytes())
    data[400] ^= 1  # one bit of one entry
    index.path.write_bytes(bytes(data))
    os.utime(index.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    corpus = encode_corpus([str(tmp_path / "docs")], cache_dir=tmp_path / "cache")
    again = open_index(corpus, len(corpus.ids))
    assert again.built and np.array_equal(np.array(again.sa), good)


def test_an_old_corpus_cache_entry_reports_only_the_offset(tmp_path):
    docs = {"a.txt": random_text(1, 1000), "b.txt": random_text(2, 1000)}
    index_of(tmp_path, docs)
    meta_path = next((tmp_path / "cache").glob("*.json"))
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["doc_starts"]  # as written before document boundaries were recorded
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    corpus = encode_corpus([str(tmp_path / "docs")], cache_dir=tmp_path / "cache")
    assert not corpus.encoded  # the ids are still used as they are
    report = novelty_report(open_index(corpus, len(corpus.ids)), [docs["b.txt"][100:150]])
    span = report["longest_span"]
    assert (span["length"], span["document"], span["document_offset"]) == (50, None, None)
    assert span["training_offset"] == 1000 + len(DOC_SEPARATOR) + 100
    assert "from training character 1,102:" in format_report(report)


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def novelty_run(tmp_path_factory, _one_thread) -> tuple[Path, dict[str, str]]:
    """A tiny run on two documents of random letters (every 40-character span is unique)."""
    base = tmp_path_factory.mktemp("novelty")
    docs = {"a.txt": random_text(1, 3000), "b.txt": random_text(2, 3000)}
    folder = base / "docs"
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    out = base / "run"
    res = CliRunner().invoke(app, ["train", str(folder), "--out", str(out), "--max-steps", "5", *TINY])
    assert res.exit_code == 0, res.output
    return out / "latest.pt", docs


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_novelty_command_finds_a_copied_passage(novelty_run, tmp_path):
    ckpt, docs = novelty_run
    sample = tmp_path / "sample.txt"
    sample.write_text(docs["a.txt"][500:540], encoding="utf-8")
    res = invoke("novelty", ckpt, sample)
    assert res.exit_code == 0, res.output
    where = str((ckpt.parent.parent / "docs" / "a.txt").resolve())
    assert res.stdout.splitlines() == [
        "novelty: 40 characters in 1 sample checked against 5,702 training characters",
        f'  longest copied span: 40 characters, from {where} at character 500: "{docs["a.txt"][500:540]}"',
        "  novel 8-grams: 0.0% (0 of 33)",
        "  novel 16-grams: 0.0% (0 of 25)",
        "  novel 32-grams: 0.0% (0 of 9)",
    ]
    data = json.loads(invoke("novelty", ckpt, sample, "--json").stdout)
    assert data["longest_span"]["length"] == 40 and data["longest_span"]["document"] == where
    assert data["longest_span"]["document_offset"] == 500 and data["training_chars"] == 5702
    assert data["index"]["built"] is False  # the first call built it; this one reused it


def test_novelty_command_on_the_held_out_tail(novelty_run, tmp_path):
    ckpt, docs = novelty_run
    sample = tmp_path / "tail.txt"
    tail = docs["b.txt"][-200:]  # inside the held-out 5 %
    sample.write_text(tail, encoding="utf-8")
    data = json.loads(invoke("novelty", ckpt, sample, "--json").stdout)
    train = docs["a.txt"] + DOC_SEPARATOR + docs["b.txt"]
    assert data["longest_span"]["length"] == max(brute_longest(train[:5702], tail))


def test_sample_novelty_prints_the_report_on_stderr(novelty_run):
    ckpt, _ = novelty_run
    res = invoke("sample", "-c", ckpt, "--length", "300", "--seed", "3", "--no-echo", "--novelty")
    assert res.exit_code == 0, res.output
    text = res.stdout[:-1]
    assert len(text) == 300
    from charlm.analysis.novelty import training_index
    from charlm.api import load

    expected = format_report(novelty_report(training_index(load(ckpt)), [text]))
    assert res.stderr.strip().splitlines()[-5:] == expected.splitlines()
    assert expected.startswith("novelty: 300 characters in 1 sample checked against 5,702")


def test_sample_novelty_json(novelty_run):
    ckpt, _ = novelty_run
    res = invoke("sample", "-c", ckpt, "--length", "80", "--seed", "4", "--num-samples", "2",
                 "--temperature", "0.5,1", "--prime", "ab", "--novelty", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["prime"] == "ab"
    assert [s["temperature"] for s in data["samples"]] == [0.5, 0.5, 1.0, 1.0]
    assert all(len(s["text"]) == 80 for s in data["samples"])
    assert data["novelty"]["samples"] == 4 and data["novelty"]["chars"] == 320
    assert data["novelty"]["ngrams"]["8"]["total"] == 4 * 73
    plain = invoke("sample", "-c", ckpt, "--length", "80", "--seed", "4", "--num-samples", "2",
                   "--temperature", "0.5,1", "--prime", "ab", "--json")
    assert json.loads(plain.stdout) == {k: v for k, v in data.items() if k != "novelty"}


@pytest.mark.parametrize("case", ["missing", "not-utf8", "empty", "folder"])
def test_novelty_bad_file(novelty_run, tmp_path, case):
    ckpt, _ = novelty_run
    path = tmp_path / "f.txt"
    if case == "not-utf8":
        path.write_bytes(b"abc\xff\xfe")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    res = invoke("novelty", ckpt, path)
    one_line_error(res, str(path), {"missing": "no such file", "not-utf8": "not valid UTF-8 at byte 3",
                                     "empty": "empty", "folder": "folder"}[case])
    assert res.stdout == ""


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_novelty_bad_checkpoint(tmp_path, case):
    sample = tmp_path / "s.txt"
    sample.write_text("abc", encoding="utf-8")
    ckpt = tmp_path / "model.pt"
    if case == "corrupt":
        ckpt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    one_line_error(invoke("novelty", ckpt, sample), str(ckpt))


@pytest.mark.parametrize("case", ["changed", "gone"])
def test_training_text_changed_or_gone(tmp_path, case):
    corpus = tmp_path / "speech.txt"
    corpus.write_text(random_text(9, 2000), encoding="utf-8")
    res = invoke("train", corpus, "--out", tmp_path / "run", "--max-steps", "3", *TINY)
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "run" / "latest.pt"
    sample = tmp_path / "s.txt"
    sample.write_text("abcdefgh", encoding="utf-8")
    assert invoke("novelty", ckpt, sample).exit_code == 0
    cache = Path(os.environ["CHARLM_CACHE_DIR"])
    if case == "changed":
        corpus.write_text(random_text(10, 2000), encoding="utf-8")
    else:
        corpus.unlink()
        # With the text's ids still in the cache, the report goes on from them, and says so.
        res = invoke("novelty", ckpt, sample)
        assert res.exit_code == 0 and res.stderr.startswith(f"charlm: warning: {corpus}: no such file")
        key = checkpoint.load(ckpt).corpus["sha256"]
        for p in cache.glob(f"{key}.*"):
            p.unlink()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
    needle = "corpus changed" if case == "changed" else "no such file"
    one_line_error(invoke("novelty", ckpt, sample), str(corpus) if case == "gone" else str(ckpt), needle)
    res = invoke("sample", "-c", ckpt, "--length", "20", "--novelty")
    one_line_error(res, needle)
    assert res.stdout == ""  # refused before sampling
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == before
