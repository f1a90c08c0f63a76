"""A loaded checkpoint as a Python object: sample, stream, evaluate, describe.

`CharLM` is what every reader of a checkpoint works with: `charlm sample`, `eval`, `info`,
`inspect`, `novelty`, `chat`, `serve` and `export`, and Python callers (`charlm.load`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from charlm.config.sampling import SampleOptions
from charlm.data.cache import EncodedCorpus, encode_corpus, reopen_corpus
from charlm.data.records import RecordSet, RecordSplit, known_records, record_set
from charlm.data.streams import Array, Split, split_data, training_data, translate
from charlm.data.vocab import Vocab
from charlm.device import resolve_device
from charlm.errors import CharLMError
from charlm.generation.sampler import Sampler
from charlm.model.network import CharRNN
from charlm.model.scoring import evaluate, evaluate_records
from charlm.storage import checkpoint as ckpt_io


class CharLM:
    """A trained model with its vocabulary, ready to sample from or evaluate."""

    def __init__(self, ck: ckpt_io.Checkpoint, path: Path, device: str = "cpu") -> None:
        self.path = path
        self.checkpoint = ck
        self.config = ck.config
        self.vocab = Vocab(ck.vocab)
        self.device = resolve_device(device)
        self.model = CharRNN(self.config.model, len(self.vocab))
        try:
            self.model.load_state_dict(ck.model)
        except RuntimeError:
            raise CharLMError(f"{path}: weights do not match the checkpoint's own config") from None
        self.model.to(self.device).eval()
        self.sampler = Sampler(self.model, self.vocab, self.device)
        self.adaptation: dict[str, Any] | None = None  # set on a copy made by `adapted`

    @property
    def records(self) -> str:
        """The model's records mode ("lines", "blank-lines"), or "" for a stream of text."""
        return self.config.train.records

    def stream(self, **options: Any) -> Iterator[str]:
        """Yield one sample's characters as they are generated (options: `SampleOptions`)."""
        if self.records:
            return (chars[0] for chars in self.stream_batch(SampleOptions(**options)) if chars[0])
        return self.sampler.generate(SampleOptions(**options))

    def stream_batch(self, opts: SampleOptions) -> Iterator[list[str]]:
        """Yield one character per sample per step, all samples generated as one batch. A
        records model generates whole records: each starts fresh (with the prime) and ends
        at its end marker, which is not yielded ("" once a record has ended)."""
        if opts.adapt:
            return self.adapted(opts.prime, opts.unknown).stream_batch(replace(opts, adapt=False))
        if self.records:
            return self.sampler.generate_records(opts)
        return self.sampler.generate_batch(opts)

    def adapted(self, text: str, unknown: str = "error") -> CharLM:
        """This model with a copy of its network adapted to `text` (a prime: `sample --adapt`),
        by `charlm.model.dynamic.adapted`; a long text adapts on its last `ADAPT_MAX_CHARS`
        characters. This model is not changed. `adaptation` on the copy says what was done:
        characters read, of how many, passes and seconds."""
        from charlm.model.dynamic import ADAPT_MAX_CHARS, ADAPT_PASSES, adapted

        ids = self.sampler.prime_ids(text, unknown)
        if len(ids) < 2:
            raise CharLMError("--adapt: the prime needs at least 2 characters the model knows")
        tail = ids[-ADAPT_MAX_CHARS:].numpy()
        started = time.perf_counter()
        net = adapted(self.model, tail, self.device)
        other = copy.copy(self)
        other.model, other.sampler = net, Sampler(net, self.vocab, self.device)
        other.adaptation = {"chars": len(tail), "prime_chars": len(ids), "passes": ADAPT_PASSES,
                            "seconds": round(time.perf_counter() - started, 3)}
        return other

    def adaptation_summary(self) -> str:
        """What `adapted` did, in one line ("" for a model that was not adapted)."""
        a = self.adaptation
        if not a:
            return ""
        read = f"{a['chars']:,}" if a["chars"] == a["prime_chars"] else f"last {a['chars']:,} of {a['prime_chars']:,}"
        return (f"adapted a copy of the model to the prime's {read} characters "
                f"({a['passes']} passes, {a['seconds']:.1f} s)")

    def sample(self, **options: Any) -> str | list[str]:
        """Generated text (prime not included): a string, or a list when num_samples > 1."""
        opts = SampleOptions(**options)
        parts: list[list[str]] = [[] for _ in range(opts.num_samples)]
        for chars in self.stream_batch(opts):
            for row, ch in enumerate(chars):
                parts[row].append(ch)
        rows = ["".join(p) for p in parts]
        return rows[0] if opts.num_samples == 1 else rows

    def run_corpus(self) -> EncodedCorpus:
        """The corpus the run trained on (checked against the hash and vocabulary it recorded)."""
        return reopen_corpus(self.checkpoint.corpus, self.path, self.checkpoint.vocab)

    def evaluate(self, specs: list[str] | None = None, encoding: str | None = None) -> dict[str, Any]:
        """Bits per character on CORPUS specs, or on the run's own held-out part without them.

        Characters outside the vocabulary cannot be scored: they are left out and counted
        (for a records model, the records that hold them). A records model reads the text as
        records and scores whole ones, their end markers included.
        """
        ids, skipped, source, max_chars = self._scored_text(specs, encoding)
        if isinstance(ids, RecordSet):
            if not ids.count:
                raise CharLMError("nothing to evaluate: no record with only known characters")
            bpc, chars = evaluate_records(self.model, ids, self.device, max_chars=max_chars)
        else:
            if len(ids) < 2:
                raise CharLMError("nothing to evaluate: fewer than 2 known characters")
            bpc, chars = evaluate(self.model, ids, self.device, max_chars=max_chars)
        return {"bpc": bpc, "chars": chars, "skipped_chars": skipped, "corpus": source,
                "checkpoint": str(self.path), "step": self.checkpoint.progress.step}

    def evaluate_dynamic(self, specs: list[str] | None = None, encoding: str | None = None,
                         lr: float | None = None, decay: float | None = None) -> dict[str, Any]:
        """Static and dynamic bits per character (`charlm.model.dynamic`) on CORPUS specs, or on
        the run's own held-out part: its first part tunes the step size and decay (unless
        given), the rest is scored both ways. The loaded model is not changed."""
        from charlm.model.dynamic import dynamic_evaluate

        ids, skipped, source, max_chars = self._scored_text(specs, encoding)
        if isinstance(ids, RecordSet):
            raise CharLMError("--dynamic reads a stream of text; this model was trained on records")
        if max_chars and len(ids) > max_chars:
            ids = ids[:max_chars]  # a long held-out text: its first eval_chars, read in order
        r = dynamic_evaluate(self.model, ids, self.device, lr=lr, decay=decay)
        return {"static_bpc": r.static_bpc, "dynamic_bpc": r.dynamic_bpc, "chars": r.chars,
                "tune_chars": r.tune_chars, "lr": r.lr, "decay": r.decay, "segment": r.segment,
                "seconds": round(r.seconds, 2), "skipped_chars": skipped, "corpus": source,
                "checkpoint": str(self.path), "step": self.checkpoint.progress.step}

    def _scored_text(self, specs: list[str] | None,
                     encoding: str | None) -> tuple[Array | RecordSet, int, list[str], int | None]:
        """The text `evaluate` scores: CORPUS specs, or the run's held-out part; with the
        characters (or records) left out for holding unknown characters, a description of
        the source, and the cap on characters scored."""
        ids: Array | RecordSet
        if specs:
            corpus = encode_corpus(specs, encoding)
            source = list(specs)
            max_chars = None
            if self.records:
                ids, skipped = known_records(record_set(corpus.ids, corpus.vocab, self.vocab, self.records))
            else:
                ids, skipped = translate(corpus.ids, self.vocab.table_from(corpus.vocab))
        else:
            corpus = self.run_corpus()
            ids = self.run_split(corpus).val
            skipped = 0
            source = ["held-out part of " + ", ".join(corpus.desc["specs"])]
            # Scored as training scored it, so the number matches the run's val bpc.
            max_chars = self.config.train.eval_chars
        return ids, skipped, source, max_chars

    def run_split(self, corpus: EncodedCorpus) -> Split | RecordSplit:
        """The run's training and held-out parts of `corpus` (its own corpus), split as
        training split them (`charlm.data.streams.split_data`)."""
        data = training_data(corpus, self.vocab, self.records)
        return split_data(data, self.config.train.val_fraction)

    def held_out_text(self, max_chars: int) -> str:
        """Up to `max_chars` characters of the run's own held-out text (the text `charlm
        eval` scores by default). A stream's passage starts at the first line break of its
        first 1,000 characters, so that it opens at the start of a line; a records model's at
        its first held-out record."""
        corpus = self.run_corpus()
        held = self.run_split(corpus)
        head = corpus.vocab.decode(corpus.ids[held.val_start: held.val_start + max_chars + 1000].tolist())
        newline = head.find("\n", 0, 1000) if not self.records else -1
        start = newline + 1 if 0 <= newline < len(head) - 1 else 0
        return head[start : start + max_chars]

    def info(self) -> dict[str, Any]:
        """What the checkpoint holds: config, sizes, progress and corpus."""
        ck = self.checkpoint
        p, corpus = ck.progress, ck.corpus
        return {
            "checkpoint": str(self.path),
            "format_version": ck.file_version,
            "verified": ck.verified,  # its checksums were checked (False: a file older than them)
            "step": p.step,
            "total_steps": ck.budget.total_steps,
            "chars_seen": p.chars_seen,
            "elapsed_s": round(p.elapsed, 1),
            "best_val_bpc": p.best_val_bpc,
            "last_val_bpc": p.last_val_bpc,
            "vocab_size": len(self.vocab),
            "parameters": self.model.num_parameters(),
            "device_trained": ck.trained_on.device,
            "precision": ck.trained_on.precision,
            "processes": ck.trained_on.world_size,
            "machine": ck.trained_on.machine,
            "plan": ck.planner["summary"] if ck.planner else None,
            "corpus": {"sources": corpus.get("specs"), "documents": len(corpus.get("documents", [])),
                       "chars": corpus.get("chars"), "sha256": corpus.get("sha256")},
            "config": self.config.to_dict(),
            "init_from": ck.init or None,
        }


def load(path: str | Path, device: str = "cpu") -> CharLM:
    """Load a checkpoint safely (`weights_only=True`) as a `CharLM`."""
    path = Path(path)
    return CharLM(ckpt_io.load(path), path, device)
