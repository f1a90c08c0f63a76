"""Text sources: files, folders, globs, several sources, encodings and `nltk:NAME[/FILEID]`.

NLTK corpora come from small nltk_data trees built in tmp_path (NLTK's own predefined
`state_union` reader reads them), or from the real corpus where the machine has it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from conftest import SHARED_NLTK, TINY, read_corpus

from charlm.cli import app
from charlm.data.sources import DOC_SEPARATOR
from charlm.errors import CharLMError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- files, folders, globs ----------------------------------------------------------------


def test_single_file(tmp_path):
    p = write(tmp_path / "a.txt", "Hello, wörld 🎉\n")
    corpus = read_corpus([str(p)])
    assert corpus.text == "Hello, wörld 🎉\n"
    assert corpus.documents == [str(p.resolve())]
    assert corpus.specs == [str(p)]
    assert len(corpus.sha256) == 64


def test_folder_reads_txt_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "texts"
    write(root / "b.txt", "B")
    write(root / "a.txt", "A")
    write(root / "sub" / "c.txt", "C")
    write(root / "notes.md", "not text")
    write(root / "data.csv", "x,y")
    corpus = read_corpus([str(root)])
    names = [Path(d).relative_to(root.resolve()).as_posix() for d in corpus.documents]
    assert names == ["a.txt", "b.txt", "sub/c.txt"]
    assert corpus.text == DOC_SEPARATOR.join(["A", "B", "C"])


def test_glob(tmp_path):
    write(tmp_path / "x2.txt", "two")
    write(tmp_path / "x1.txt", "one")
    write(tmp_path / "y.txt", "other")
    corpus = read_corpus([str(tmp_path / "x*.txt")])
    assert [Path(d).name for d in corpus.documents] == ["x1.txt", "x2.txt"]
    assert corpus.text == "one" + DOC_SEPARATOR + "two"


def test_several_sources_are_joined_with_the_separator(tmp_path):
    a = write(tmp_path / "a.txt", "first")
    folder = tmp_path / "more"
    write(folder / "b.txt", "second")
    write(folder / "c.txt", "third")
    corpus = read_corpus([str(a), str(folder)])
    assert corpus.text == DOC_SEPARATOR.join(["first", "second", "third"])
    assert len(corpus.documents) == 3
    # Order follows the command line, so the text (and its hash) does too.
    swapped = read_corpus([str(folder), str(a)])
    assert swapped.text == DOC_SEPARATOR.join(["second", "third", "first"])
    assert swapped.sha256 != corpus.sha256
    assert read_corpus([str(a), str(folder)]).sha256 == corpus.sha256


def test_utf8_bom_is_dropped(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfK\xc3\xb6ln\n")
    assert read_corpus([str(p)]).text == "Köln\n"


def test_invalid_utf8_is_an_error_that_suggests_latin1(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(CharLMError) as info:
        read_corpus([str(p)])
    msg = str(info.value)
    assert str(p) in msg and "UTF-8" in msg and "latin-1" in msg


def test_encoding_latin1(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("café crème\n".encode("latin-1"))
    assert read_corpus([str(p)], encoding="latin-1").text == "café crème\n"


def test_unknown_encoding_names_the_flag(tmp_path):
    p = write(tmp_path / "a.txt", "abc")
    with pytest.raises(CharLMError, match="--encoding"):
        read_corpus([str(p)], encoding="no-such-codec")


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda d: d / "missing.txt", "no such file"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no .txt files"),
        (lambda d: ((d / "e.txt").write_bytes(b"") and None) or d / "e.txt", "empty"),
        (lambda d: (d / "b.txt").write_bytes(b"PK\x03\x04\x00\x00ab") and d / "b.txt", "binary"),
        (lambda d: d / "nomatch*.txt", "matches no files"),
    ],
    ids=["missing", "empty-folder", "empty-file", "binary", "glob-no-match"],
)
def test_bad_sources_raise_naming_the_path(tmp_path, setup, needle):
    path = setup(tmp_path)
    with pytest.raises(CharLMError) as info:
        read_corpus([str(path)])
    assert str(path) in str(info.value) and needle in str(info.value)


def test_bad_source_is_found_before_reading_others(tmp_path):
    good = write(tmp_path / "a.txt", "abc")
    with pytest.raises(CharLMError, match="nope.txt"):
        read_corpus([str(good), str(tmp_path / "nope.txt")])


# --- NLTK ---------------------------------------------------------------------------------


def use_nltk_data(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point NLTK at `root` only, and give it a fresh (not yet loaded) state_union loader.

    NLTK reads NLTK_DATA once, at import, so `nltk.data.path` is patched as well; and its
    lazy corpus loaders turn into readers of the first root they find, so the predefined
    `state_union` loader is replaced by a new one that NLTK's own definition would build.
    """
    import nltk
    import nltk.corpus
    from nltk.corpus.reader import PlaintextCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    monkeypatch.setenv("NLTK_DATA", str(root))
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    monkeypatch.setattr(
        nltk.corpus,
        "state_union",
        LazyCorpusLoader("state_union", PlaintextCorpusReader, r"(?!\.).*\.txt", encoding="ISO-8859-2"),
    )


@pytest.fixture
def nltk_home(tmp_path, monkeypatch) -> Path:
    """tmp/nltk_data with a two-file `state_union`, a custom `mycorpus` and a zipped `zipped`."""
    root = tmp_path / "nltk_data"
    su = root / "corpora" / "state_union"
    write(su / "1990-Bush.txt", "The state of our Union is strong.\n")
    write(su / "2001-Clinton.txt", "My fellow Americans, good evening.\n")
    write(su / "README", "not a .txt file")
    my = root / "corpora" / "mycorpus"
    write(my / "a.txt", "Grüße 🎉\n")
    write(my / "b.txt", "second\n")
    with zipfile.ZipFile(root / "corpora" / "zipped.zip", "w") as zf:
        zf.writestr("zipped/", "")
        zf.writestr("zipped/one.txt", "zipped one\n")
        zf.writestr("zipped/two.txt", "zipped two\n")
    use_nltk_data(monkeypatch, root)
    return root


def test_nltk_predefined_corpus(nltk_home):
    corpus = read_corpus(["nltk:state_union"])
    assert corpus.documents == ["nltk:state_union/1990-Bush.txt", "nltk:state_union/2001-Clinton.txt"]
    assert corpus.text == (
        "The state of our Union is strong.\n" + DOC_SEPARATOR + "My fellow Americans, good evening.\n"
    )
    # A second load in the same process (NLTK's loader has turned into a reader by now).
    again = read_corpus(["nltk:state_union"])
    assert again.text == corpus.text and again.sha256 == corpus.sha256


def test_nltk_zipped_predefined_corpus_uses_nltks_encoding(tmp_path, monkeypatch):
    # As NLTK's downloader installs it: corpora/state_union.zip, read with NLTK's encoding
    # (ISO-8859-2 for state_union), every document, twice in one process.
    root = tmp_path / "nltk_data"
    (root / "corpora").mkdir(parents=True)
    with zipfile.ZipFile(root / "corpora" / "state_union.zip", "w") as zf:
        zf.writestr("state_union/", "")
        zf.writestr("state_union/1945-Truman.txt", "Łódź\n".encode("iso-8859-2"))
        zf.writestr("state_union/1946-Truman.txt", b"plain ascii\n")
    use_nltk_data(monkeypatch, root)
    for _ in range(2):
        corpus = read_corpus(["nltk:state_union"])
        assert corpus.text == "Łódź\n" + DOC_SEPARATOR + "plain ascii\n"
        assert corpus.documents == ["nltk:state_union/1945-Truman.txt", "nltk:state_union/1946-Truman.txt"]


def test_default_source_is_state_union(nltk_home):
    assert read_corpus(None).documents == read_corpus(["nltk:state_union"]).documents
    assert read_corpus([]).specs == ["nltk:state_union"]


def test_nltk_single_fileid(nltk_home):
    corpus = read_corpus(["nltk:state_union/2001-Clinton.txt"])
    assert corpus.documents == ["nltk:state_union/2001-Clinton.txt"]
    assert corpus.text == "My fellow Americans, good evening.\n"


def test_nltk_corpus_nltk_does_not_predefine_is_read_as_utf8(nltk_home):
    corpus = read_corpus(["nltk:mycorpus"])
    assert corpus.documents == ["nltk:mycorpus/a.txt", "nltk:mycorpus/b.txt"]
    assert corpus.text == "Grüße 🎉\n" + DOC_SEPARATOR + "second\n"
    assert read_corpus(["nltk:mycorpus/b.txt"]).text == "second\n"


def test_nltk_zipped_custom_corpus(nltk_home):
    corpus = read_corpus(["nltk:zipped"])
    assert corpus.documents == ["nltk:zipped/one.txt", "nltk:zipped/two.txt"]
    assert corpus.text == "zipped one\n" + DOC_SEPARATOR + "zipped two\n"


def test_nltk_mixed_with_files(nltk_home, tmp_path):
    p = write(tmp_path / "extra.txt", "extra")
    corpus = read_corpus(["nltk:mycorpus/b.txt", str(p)])
    assert corpus.text == "second\n" + DOC_SEPARATOR + "extra"


def test_nltk_unknown_corpus(nltk_home):
    with pytest.raises(CharLMError) as info:
        read_corpus(["nltk:no_such_corpus"])
    assert "nltk:no_such_corpus" in str(info.value) and "unknown NLTK corpus" in str(info.value)


def test_nltk_unknown_fileid(nltk_home):
    with pytest.raises(CharLMError) as info:
        read_corpus(["nltk:state_union/1066-Harold.txt"])
    assert "1066-Harold.txt" in str(info.value)


@pytest.mark.parametrize("spec", ["nltk:", "nltk:_private", "nltk:../etc"])
def test_nltk_bad_names(nltk_home, spec):
    with pytest.raises(CharLMError, match="nltk:"):
        read_corpus([spec])


def test_nltk_missing_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    use_nltk_data(monkeypatch, empty)  # conftest sets CHARLM_NO_DOWNLOAD: nothing downloads
    with pytest.raises(CharLMError) as info:
        read_corpus(["nltk:state_union"])
    msg = str(info.value)
    assert "python -m nltk.downloader state_union" in msg and "NLTK_DATA" in msg


def test_nltk_missing_corpus_through_cli(tmp_path, monkeypatch, runner):
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    use_nltk_data(monkeypatch, empty)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--out", str(out), "--max-steps", "2", *TINY])  # default corpus
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "python -m nltk.downloader state_union" in lines[0] and "NLTK_DATA" in lines[0]
    assert not out.exists()  # nothing written before the input was found bad


def test_train_on_nltk_corpus_through_cli(nltk_home, tmp_path, runner):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "nltk:mycorpus", "nltk:state_union", "--out", str(out),
                              "--max-steps", "3", *TINY, "--batch-size", "2", "--seq-len", "8"])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)
    assert info["corpus"]["sources"] == ["nltk:mycorpus", "nltk:state_union"]
    assert info["corpus"]["documents"] == 4
    # eval without CORPUS reads the same NLTK documents again to find the held-out part.
    res = runner.invoke(app, ["eval", str(out / "latest.pt"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["chars"] > 0


def test_latin1_training_run_remembers_its_encoding(tmp_path, runner):
    p = tmp_path / "latin.txt"
    p.write_bytes(("café crème brûlée, s'il vous plaît.\n" * 40).encode("latin-1"))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(p), "--encoding", "latin-1", "--out", str(out),
                              "--max-steps", "3", *TINY])
    assert res.exit_code == 0, res.output
    # eval re-reads the corpus with the run's encoding (strict UTF-8 would fail on it).
    res = runner.invoke(app, ["eval", str(out / "latest.pt"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "-c", str(out / "latest.pt"), "--prime", "é", "--length", "5"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("é")


# --- the real State of the Union corpus ------------------------------------------------------

needs_real = pytest.mark.skipif(not SHARED_NLTK.exists(), reason="no local NLTK data (state_union)")


@needs_real
def test_real_state_union(monkeypatch):
    use_nltk_data(monkeypatch, SHARED_NLTK)
    corpus = read_corpus(["nltk:state_union"])
    assert len(corpus.documents) == 65
    assert corpus.documents[0] == "nltk:state_union/1945-Truman.txt"
    assert corpus.documents == sorted(corpus.documents)
    assert 2_000_000 < len(corpus.text) < 2_150_000  # about 2.07 M characters
    one = read_corpus(["nltk:state_union/1945-Truman.txt"])
    assert corpus.text.startswith(one.text + DOC_SEPARATOR)


@needs_real
def test_real_state_union_short_training_run(monkeypatch, tmp_path, runner):
    use_nltk_data(monkeypatch, SHARED_NLTK)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--out", str(out), "--max-steps", "3", *TINY])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)
    assert info["step"] == 3
    assert info["corpus"]["sources"] == ["nltk:state_union"] and info["corpus"]["documents"] == 65
    assert 2_000_000 < info["corpus"]["chars"] < 2_150_000
