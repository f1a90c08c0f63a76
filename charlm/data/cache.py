"""Streaming corpus encoding into a memory-mapped cache, keyed by a hash of the sources.

A corpus of gigabytes is never held as one string: documents are read and decoded in
chunks (`corpus.iter_text`), each chunk becomes character ids that are appended to a file,
and the vocabulary is found in the same pass. Ids are first given in order of first
appearance; once the pass is over they are renumbered in place to the code-point order a
`Vocab` uses. The result is a flat array of the smallest unsigned type that holds every id
(uint8 for up to 256 distinct characters, else uint16, else uint32), opened with
`numpy.memmap`, so training touches only the pages it reads.

The cache file is named after a SHA-256 of the sources' bytes (and the text encoding), so
a second run or a resume on the same text skips encoding after one fast hashing pass, and a
changed source gets a new file. Its contents are checked too: a CRC-32 per block of ids,
each checked the first time it is read (`charlm.data.checked`); a damaged entry is rebuilt
from the sources when they are there, else refused naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from charlm.data.checked import CheckedIds, block_crcs
from charlm.data.sources import (
    DOC_SEPARATOR,
    Document,
    check_encoding,
    iter_bytes,
    iter_text,
    resolve,
    resolve_all,
    size_of,
)
from charlm.data.vocab import Vocab, codepoints
from charlm.errors import CharLMError, CharLMWarning
from charlm.fs import atomic_path, free_bytes, human, write_atomic

FORMAT = 2  # bump when the cache layout changes (2: block checksums)
# Part of every key, and of every checkpoint's corpus SHA-256: a change would orphan every run.
KEY_VERSION = 1
UNCHECKED_FORMAT = 1  # entries without checksums: used only when their sources are gone
CACHE_ENV = "CHARLM_CACHE_DIR"
_MAX_CODEPOINT = 0x110000

# stage ("hashing" / "encoding"), bytes done, bytes in all (0 when not known in advance)
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class EncodedCorpus:
    """A corpus as character ids in a memory-mapped cache file."""

    ids: CheckedIds | np.ndarray  # (N,) uint8 / uint16 / uint32, memory-mapped, checked as read
    vocab: Vocab
    desc: dict[str, Any]  # specs, documents, sha256 (of the sources), chars, encoding
    path: Path  # the cache file behind `ids`
    encoded: bool  # False when the cache already held it
    seconds: float  # time spent hashing (and encoding, when it was not cached)
    sources_gone: bool = False  # reopened from the cache alone: the files are no longer there
    doc_starts: list[int] | None = None  # where each document starts in `ids` (None: not recorded)


def default_cache_dir() -> Path:
    """$CHARLM_CACHE_DIR, else $XDG_CACHE_HOME/charlm/corpora, else ~/.cache/charlm/corpora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charlm" / "corpora"


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned type that holds ids 0..vocab_size-1."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def encode_corpus(specs: list[str] | None, encoding: str | None = None, *,
                  progress: Progress | None = None, cache_dir: Path | None = None) -> EncodedCorpus:
    """Resolve CORPUS arguments and return them encoded (from the cache when it has them)."""
    check_encoding(encoding)
    specs, docs = resolve_all(specs)
    return _encode(docs, specs, encoding, progress or _no_progress, cache_dir, expect=None)


def reopen_corpus(desc: dict[str, Any], checkpoint: Path, vocab: str, *,
                  progress: Progress | None = None, cache_dir: Path | None = None) -> EncodedCorpus:
    """The corpus a run trained on (`desc`, as its checkpoint recorded it), checked against the
    recorded hash and vocabulary `vocab`. When its files are gone but the cache still holds
    their ids under that hash, those are used (evaluation and resume need only the ids)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        docs = [doc for source in desc["documents"] for doc in resolve(source)]
    except CharLMError as gone:
        corpus = _open(folder, desc["sha256"], desc, encoded=False, seconds=0.0, repair=None)
        if corpus is None:
            raise
        corpus.sources_gone = True
        warnings.warn(f"{gone}; using the run's corpus ids from the cache ({corpus.path})", CharLMWarning,
                      stacklevel=2)
    else:
        corpus = _encode(docs, list(desc["specs"]), desc.get("encoding") or None,
                         progress or _no_progress, folder, expect=(desc["sha256"], checkpoint))
    # The checkpoint's may be larger (record markers, a fine-tuned run's merged vocabulary).
    if not set(corpus.vocab.chars) <= set(vocab):
        raise CharLMError(f"{checkpoint}: the corpus's vocabulary differs from the checkpoint's")
    return corpus


def source_key(docs: list[Document], encoding: str | None, progress: Progress = _no_progress) -> str:
    """SHA-256 over every document's bytes (each hashed on its own, so boundaries count)."""
    total = sum(size_of(d) for d in docs)
    outer = hashlib.sha256(f"charlm corpus {KEY_VERSION}\0{encoding or 'utf-8-sig'}\0".encode())
    done = 0
    for doc in docs:
        inner = hashlib.sha256()
        for data in iter_bytes(doc):
            inner.update(data)
            done += len(data)
            progress("hashing", done, total)
        outer.update(inner.digest())
    return outer.hexdigest()


def _encode(docs: list[Document], specs: list[str], encoding: str | None, progress: Progress,
            cache_dir: Path | None, expect: tuple[str, Path] | None) -> EncodedCorpus:
    t0 = time.perf_counter()
    key = source_key(docs, encoding, progress)
    if expect is not None and key != expect[0]:
        raise CharLMError(
            f"{expect[1]}: the corpus changed since this checkpoint was written "
            f"({', '.join(specs)}); resume needs the same text"
        )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    desc = {"specs": specs, "documents": [d.source for d in docs], "sha256": key, "encoding": encoding or ""}
    ids_path, meta_path = folder / f"{key}.ids", folder / f"{key}.json"

    def repair() -> tuple[np.ndarray, list[int]]:
        """Rebuild the entry from the sources (a block of it was damaged)."""
        meta = _build(docs, encoding, folder, ids_path, meta_path, _no_progress)
        return _memmap(ids_path, meta), meta["crc32"]

    corpus = _open(folder, key, desc, encoded=False, seconds=time.perf_counter() - t0, repair=repair)
    if corpus is None:
        _build(docs, encoding, folder, ids_path, meta_path, progress)
        corpus = _open(folder, key, desc, encoded=True, seconds=time.perf_counter() - t0, repair=repair)
        assert corpus is not None
    return corpus


def _memmap(path: Path, meta: dict[str, Any]) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["chars"],))


def _open(folder: Path, key: str, desc: dict[str, Any], encoded: bool, seconds: float,
          repair: Callable[[], tuple[np.ndarray, list[int]]] | None) -> EncodedCorpus | None:
    """The cache entry `key` as an `EncodedCorpus` described by `desc`; None when it is missing,
    foreign or incomplete. `repair` rebuilds it from its sources (None: they are gone, and
    an entry older than checksums is used after a check that its ids are in its vocabulary)."""
    path = folder / f"{key}.ids"
    meta = _read_meta(folder / f"{key}.json", path, old_too=repair is None)
    if meta is None:
        return None
    raw = _memmap(path, meta)
    ids: CheckedIds | np.ndarray
    if meta["format"] == FORMAT:
        ids = CheckedIds.of(raw, meta["crc32"], path, repair)
    else:
        ids = raw
        if len(raw) and int(raw.max()) >= len(meta["vocab"]):
            raise CharLMError(f"corpus cache entry {path}: damaged (ids outside its vocabulary), and the "
                              "corpus's files cannot be read, so it cannot be rebuilt: restore them")
    starts = meta.get("doc_starts")  # not recorded by older cache entries (still valid ids)
    if not isinstance(starts, list) or len(starts) != len(desc["documents"]):
        starts = None
    return EncodedCorpus(ids, Vocab(meta["vocab"]), {**desc, "chars": meta["chars"]}, path, encoded, seconds,
                         doc_starts=starts)


def _read_meta(meta_path: Path, path: Path, old_too: bool = False) -> dict[str, Any] | None:
    """The cache entry's description, or None when it is missing, foreign or incomplete (or,
    unless `old_too`, older than block checksums)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = path.stat().st_size
        formats = (FORMAT, UNCHECKED_FORMAT) if old_too else (FORMAT,)
        if meta.get("format") not in formats or size != meta["chars"] * np.dtype(meta["dtype"]).itemsize:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(docs: list[Document], encoding: str | None, folder: Path, path: Path, meta_path: Path,
           progress: Progress) -> dict[str, Any]:
    """Encode the documents into `path` (atomically) and describe them in `meta_path`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharLMError(
            f"corpus cache {folder}: {exc.strerror}; set {CACHE_ENV} to a writable folder") from None
    total = sum(size_of(d) for d in docs)
    done = 0

    def read(n: int) -> None:
        nonlocal done
        done += n
        progress("encoding", done, total)

    writer: _IdWriter | None = None
    try:
        with atomic_path(path) as tmp:
            writer = _IdWriter(open(tmp, "w+b"))  # noqa: SIM115 - closed below
            try:
                starts: list[int] = []  # where each document begins in the ids
                for i, doc in enumerate(docs):
                    if i:
                        writer.add(DOC_SEPARATOR)
                    starts.append(writer.count)
                    for text in iter_text(doc, encoding, on_read=read):
                        writer.add(text)
                vocab = writer.finish()
            finally:
                writer.fh.close()
                Path(f"{tmp}.w").unlink(missing_ok=True)  # a widening rewrite cut short
        meta = {"format": FORMAT, "chars": writer.count, "dtype": writer.dtype.name, "vocab": vocab,
                "doc_starts": starts}
        meta["crc32"] = block_crcs(_memmap(path, meta)) if writer.count else []
        # The description last: an entry without one is incomplete and is rebuilt.
        write_atomic(meta_path, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        return meta
    except OSError as exc:
        if not meta_path.exists():  # ids without their description are no entry: reclaim the space
            path.unlink(missing_ok=True)
        if writer is None:
            raise CharLMError(
                f"corpus cache {folder}: {exc.strerror}; set {CACHE_ENV} to a writable folder") from None
        # Ids take 1-4 bytes per character, and a character is at least one byte of text.
        need = total * writer.dtype.itemsize
        room = free_bytes(folder)
        space = f" (the ids need about {human(need)}; {human(room)} free there)" if room is not None else ""
        raise CharLMError(f"corpus cache {folder}: cannot write: {exc.strerror}{space}; free some space or "
                          f"set {CACHE_ENV} to a folder with room") from None


class _IdWriter:
    """Appends the ids of text chunks to a file, finding the vocabulary as it goes."""

    CHUNK = 1 << 24  # ids renumbered / widened per read-modify-write

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        # code point -> provisional id (order of first appearance); -1 = not seen yet
        self.lut = np.full(_MAX_CODEPOINT, -1, dtype=np.int32)
        self.codes: list[int] = []  # provisional id -> code point
        self.dtype = np.dtype(np.uint8)
        self.count = 0

    def add(self, text: str) -> None:
        cp = codepoints(text)
        ids = self.lut[cp]
        if ids.min() < 0:
            new = np.unique(cp[ids < 0])
            self.lut[new] = np.arange(len(self.codes), len(self.codes) + len(new), dtype=np.int32)
            self.codes.extend(new.tolist())
            wider = id_dtype(len(self.codes))
            if wider != self.dtype:
                self._rewrite(lambda old: old.astype(wider), wider)
            ids = self.lut[cp]
        self.fh.write(ids.astype(self.dtype).data)
        self.count += len(cp)

    def finish(self) -> str:
        """Renumber the ids to code-point order; returns the vocabulary's characters."""
        order = np.argsort(np.array(self.codes, dtype=np.int64), kind="stable")
        if np.any(order != np.arange(len(order))):
            final = np.empty(len(order), dtype=self.dtype)
            final[order] = np.arange(len(order))  # provisional id -> final id
            self._rewrite(lambda old: final[old], self.dtype)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return "".join(chr(self.codes[i]) for i in order)

    def _rewrite(self, fn: Callable[[np.ndarray], np.ndarray], dtype: np.dtype) -> None:
        """Apply `fn` to every id written so far, chunk by chunk (a wider type grows the file,
        so then the results go to a second file that replaces the first)."""
        self.fh.flush()
        src = self.fh
        dst = src if dtype == self.dtype else open(src.name + ".w", "w+b")  # noqa: SIM115
        step = self.CHUNK * self.dtype.itemsize
        offset = 0
        while True:
            src.seek(offset)
            raw = src.read(step)
            if not raw:
                break
            out = fn(np.frombuffer(raw, dtype=self.dtype)).astype(dtype)
            dst.seek(offset // self.dtype.itemsize * dtype.itemsize)
            dst.write(out.data)
            offset += len(raw)
        if dst is not src:
            src.close()
            os.replace(dst.name, src.name)
            self.fh = dst
        self.fh.seek(0, os.SEEK_END)
        self.dtype = dtype
