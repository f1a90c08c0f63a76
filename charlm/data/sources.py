"""Text sources: files, directories, globs and `nltk:NAME[/FILEID]`.

Every source is resolved to a list of documents first (so bad input is found before any
text is read or any file written), then read in chunks (`iter_text`); `charlm.data.cache` joins
the documents of a corpus with `DOC_SEPARATOR` as it turns them into ids.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from charlm.errors import CharLMError

DEFAULT_SOURCE = "nltk:state_union"
# Documents are separated by a blank line so the model sees where one speech ends.
DOC_SEPARATOR = "\n\n"
_GLOB_CHARS = set("*?[")
CHUNK_BYTES = 1 << 22  # files are read and decoded 4 MiB at a time


@dataclass(frozen=True)
class Document:
    """One readable unit: a file on disk, or a file inside an NLTK corpus."""

    source: str  # absolute path, or "nltk:NAME/FILEID"
    path: Path | None = None
    nltk_corpus: str | None = None
    nltk_fileid: str | None = None


def check_encoding(encoding: str | None) -> None:
    """Refuse an `--encoding` Python does not know, before anything is read."""
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise CharLMError(f"--encoding: unknown encoding {encoding!r}") from None


def resolve_all(specs: list[str] | None) -> tuple[list[str], list[Document]]:
    """The CORPUS arguments (none means `nltk:state_union`) and their documents, in order."""
    specs = list(specs) if specs else [DEFAULT_SOURCE]
    return specs, [doc for spec in specs for doc in resolve(spec)]


def resolve(spec: str) -> list[Document]:
    """Turn one CORPUS argument into its documents, in a stable (sorted) order."""
    if spec.startswith("nltk:"):
        return _resolve_nltk(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CharLMError(f"{spec}: folder holds no .txt files")
        return [Document(str(p.resolve()), path=p) for p in files]
    if path.is_file():
        return [Document(str(path.resolve()), path=path)]
    if _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise CharLMError(f"{spec}: pattern matches no files")
        return [Document(str(p.resolve()), path=p) for p in files]
    if path.exists():
        raise CharLMError(f"{spec}: not a regular file or folder")
    raise CharLMError(f"{spec}: no such file or folder")


def iter_text(doc: Document, encoding: str | None,
              on_read: Callable[[int], None] | None = None) -> Iterator[str]:
    """The decoded text of one document, in chunks of about `CHUNK_BYTES`; `on_read` is
    told how many bytes each chunk read (for a progress bar).

    Raises `CharLMError` (naming the file) for an empty, binary or undecodable document.
    """
    if doc.nltk_corpus is not None:
        text = _read_nltk(doc)  # NLTK reads a whole file; its corpora are small
        if on_read is not None:
            on_read(len(text))
        yield text
        return
    assert doc.path is not None
    try:
        fh = open(doc.path, "rb")  # noqa: SIM115 - the generator closes it
    except OSError as exc:
        raise CharLMError(f"{doc.path}: cannot read: {exc.strerror}") from None
    # utf-8-sig is strict UTF-8 that drops a leading BOM; the incremental decoder keeps a
    # character split across two chunks whole.
    decoder = codecs.getincrementaldecoder(encoding or "utf-8-sig")("strict")
    offset = 0  # bytes read before this chunk
    produced = False
    with fh:
        while True:
            try:
                data = fh.read(CHUNK_BYTES)
            except OSError as exc:
                raise CharLMError(f"{doc.path}: cannot read: {exc.strerror}") from None
            if offset == 0:
                if not data:
                    raise CharLMError(f"{doc.path}: file is empty")
                if encoding is None and b"\x00" in data[:8192]:
                    # NUL bytes never occur in UTF-8 text: an image, archive, checkpoint...
                    raise CharLMError(
                        f"{doc.path}: looks like a binary file (contains NUL bytes), not text")
            pending = len(getattr(decoder, "buffer", b""))  # undecoded bytes of the last chunk
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise CharLMError(
                    f"{doc.path}: not valid {encoding or 'UTF-8'} at byte "
                    f"{offset - pending + exc.start} (try --encoding latin-1)"
                ) from None
            offset += len(data)
            if on_read is not None:
                on_read(len(data))
            if text:
                produced = True
                yield text
            if not data:
                break
    if not produced:
        raise CharLMError(f"{doc.path}: file is empty")


# --- NLTK ---------------------------------------------------------------------------------


def _nltk_reader(name: str):  # -> nltk CorpusReader
    """The corpus reader NLTK itself defines for `name` (it knows the corpus's encoding),
    downloading the corpus with NLTK's downloader when it is missing."""
    try:
        import nltk
        import nltk.corpus
        from nltk.corpus.reader import PlaintextCorpusReader
    except ImportError:
        raise CharLMError("nltk is not installed: pip install nltk") from None

    if not name or "/" in name or name.startswith(("_", ".")):
        raise CharLMError(f"nltk:{name}: not a corpus name")
    from nltk.corpus.reader import CorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    reader = getattr(nltk.corpus, name, None)
    if isinstance(reader, CorpusReader) and hasattr(reader, "raw"):
        # A predefined corpus NLTK has already loaded: its lazy loader turned itself into the
        # reader (with NLTK's encoding), so it is no longer a LazyCorpusLoader.
        return reader
    if not isinstance(reader, LazyCorpusLoader):
        # Not one of NLTK's predefined corpora: read corpora/NAME as plain UTF-8 text files.
        try:
            # The trailing slash lets NLTK find a zipped corpus (corpora/NAME.zip/NAME/) too.
            root = nltk.data.find(f"corpora/{name}/")
        except LookupError:
            raise CharLMError(
                f"nltk:{name}: unknown NLTK corpus (not predefined by NLTK and no "
                f"corpora/{name} under NLTK_DATA)"
            ) from None
        return PlaintextCorpusReader(root, r"(?!\.).*\.txt", encoding="utf8")
    try:
        reader.fileids  # noqa: B018 - attribute access makes the lazy loader find the corpus
    except LookupError:
        _download(name)
        try:
            reader.fileids  # noqa: B018
        except LookupError:
            raise _missing(name) from None
    if not hasattr(reader, "raw"):
        raise CharLMError(f"nltk:{name}: not a plaintext corpus (it has no raw text)")
    return reader


def _missing(name: str) -> CharLMError:
    return CharLMError(
        f"nltk:{name}: NLTK corpus not found and could not be downloaded; get it with "
        f"`python -m nltk.downloader {name}`, or set NLTK_DATA to a folder that has "
        f"corpora/{name}.zip"
    )


def _download(name: str) -> None:
    """Fetch a missing corpus with NLTK's own downloader; failures are reported by the caller."""
    import nltk

    if os.environ.get("CHARLM_NO_DOWNLOAD"):
        return
    # The downloader prints progress and errors on stdout; keep both streams clean (a
    # failure is reported by the caller in one line that says how to get the corpus).
    # Any network failure means "could not download".
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.suppress(Exception):
        nltk.download(name, quiet=True, raise_on_error=False, print_error_to=io.StringIO())


def _resolve_nltk(spec: str) -> list[Document]:
    name, _, fileid = spec[len("nltk:"):].partition("/")
    reader = _nltk_reader(name)
    try:
        fileids = list(reader.fileids())
    except LookupError:
        raise _missing(name) from None
    if fileid:
        if fileid not in fileids:
            raise CharLMError(f"{spec}: corpus {name} has no file {fileid!r}")
        fileids = [fileid]
    if not fileids:
        raise CharLMError(f"{spec}: corpus holds no files")
    return [Document(f"nltk:{name}/{f}", nltk_corpus=name, nltk_fileid=f) for f in fileids]


def _read_nltk(doc: Document) -> str:
    assert doc.nltk_corpus is not None and doc.nltk_fileid is not None
    reader = _nltk_reader(doc.nltk_corpus)
    try:
        text = reader.raw(doc.nltk_fileid)
    except UnicodeDecodeError as exc:
        raise CharLMError(f"{doc.source}: not valid in the corpus's encoding: {exc.reason}") from None
    except (LookupError, OSError) as exc:
        raise CharLMError(f"{doc.source}: cannot read: {exc}") from None
    if not text:
        raise CharLMError(f"{doc.source}: file is empty")
    return text


def iter_bytes(doc: Document) -> Iterator[bytes]:
    """The raw content of one document in chunks (what the corpus cache key hashes)."""
    if doc.nltk_corpus is not None:
        yield _read_nltk(doc).encode("utf-8", "surrogatepass")
        return
    assert doc.path is not None
    try:
        with open(doc.path, "rb") as fh:
            while data := fh.read(CHUNK_BYTES):
                yield data
    except OSError as exc:
        raise CharLMError(f"{doc.path}: cannot read: {exc.strerror}") from None


def size_of(doc: Document) -> int:
    """Bytes in a file document (0 for NLTK documents, whose size is known only once read)."""
    if doc.path is None:
        return 0
    try:
        return doc.path.stat().st_size
    except OSError:
        return 0
