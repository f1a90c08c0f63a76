"""Fine-tuning: a new run that starts from another run's weights (`--init-from CHECKPOINT`).

The new run has its own folder, schedule, optimizer and step count; only the weights come
from the checkpoint, and with them the model's shape (cell, layers, sizes) and, unless the
user chose another, its dropout (`adopt`): a shape setting the user chose that disagrees is
refused, naming it. Vocabularies are merged by
character, never by id: the new model's vocabulary is the union of both, by code point.

- A character both know keeps its trained embedding row and output row (weights and bias).
- A character only the new corpus has gets fresh rows, as a fresh model would have them
  (the model is built as for a run from scratch, with the run's seed, then overwritten).
- A character only the old model knew keeps its rows, so it stays usable in primes and
  samples.

The recurrent layers are copied whole. The checkpoint's own optimizer state is not used.
Every checkpoint of the new run records where it started (`init` group: path, step, corpus
sources and SHA-256, the vocabulary merge), and a resume needs nothing but its own file.
A planner may fill the learning rate and regularization into the config before the run
starts; nothing here chooses them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from charlm.config.options import flag
from charlm.config.run import ModelConfig, RunConfig
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError
from charlm.model.network import CharRNN
from charlm.storage import checkpoint as ckpt_io

SHAPE = ("cell", "num_layers", "hidden_size", "embedding_size")  # fixed by the weights
ROWS = ("embed.weight", "head.weight", "head.bias")  # one row per character: merged by character


def load_base(path: Path | str) -> ckpt_io.Checkpoint:
    """The checkpoint to start from, checked (safe load, weights that fit its own config);
    every problem is one `CharLMError` line naming --init-from."""
    try:
        ck = ckpt_io.load(path)
        model = CharRNN(ck.config.model, len(ck.vocab))
        try:
            model.load_state_dict(ck.model)
        except RuntimeError:
            raise CharLMError(f"{path}: weights do not match the checkpoint's own config") from None
    except CharLMError as exc:
        raise CharLMError(f"--init-from: {exc}") from None
    return ck


def adopt(cfg: RunConfig, base: ckpt_io.Checkpoint, path: Path | str, chosen: set[str]) -> RunConfig:
    """`cfg` with the model settings of the checkpoint it starts from, except those the user
    `chosen` (a setting name): a chosen shape setting must agree with the checkpoint's
    (each that does not is named in one `CharLMError`), a chosen dropout is kept."""
    have = base.config.model
    wrong = [f"{flag(k)} {getattr(cfg.model, k)} (it has {getattr(have, k)})" for k in SHAPE
             if k in chosen and getattr(cfg.model, k) != getattr(have, k)]
    if wrong:
        raise CharLMError(f"--init-from {path}: the model's shape comes from the checkpoint; "
                          f"{', '.join(wrong)} disagree{'s' if len(wrong) == 1 else ''}; leave "
                          f"{'it' if len(wrong) == 1 else 'them'} out")
    taken = {f.name: getattr(have, f.name) for f in fields(ModelConfig) if f.name not in chosen or f.name in SHAPE}
    return replace(cfg, model=replace(cfg.model, **taken))


def init_weights(model: CharRNN, base: ckpt_io.Checkpoint, vocab: Vocab) -> None:
    """Overwrite a freshly built `model` (vocabulary `vocab`, a superset of the checkpoint's)
    with the checkpoint's weights: per-character rows by character, the rest whole. Rows of
    characters the checkpoint lacks keep their fresh values."""
    old = Vocab(base.vocab)
    rows = torch.from_numpy(vocab.table_from(old))  # old id -> new id
    if bool((rows < 0).any()):
        raise CharLMError("--init-from: the new vocabulary lacks characters of the checkpoint's")
    state = model.state_dict()  # the model's own tensors: writing them writes the model
    with torch.no_grad():
        for key, value in base.model.items():
            target = state[key]
            if key in ROWS:
                target[rows.to(target.device)] = value.to(target)
            else:
                target.copy_(value)


def init_record(path: Path | str, base: ckpt_io.Checkpoint, corpus_chars: str, vocab: Vocab) -> dict[str, Any]:
    """What the new run's checkpoints keep about where it started (plain values)."""
    old, seen = set(base.vocab), set(corpus_chars)
    corpus = base.corpus
    return {"path": str(Path(path).resolve()), "step": base.progress.step,
            "best_val_bpc": base.progress.best_val_bpc,
            "corpus": {"sources": list(corpus.get("specs") or []), "sha256": corpus.get("sha256"),
                       "chars": corpus.get("chars")},
            "vocab": {"size": len(vocab), "shared": len(old & seen), "new": len(set(vocab.chars) - old),
                      "old_only": len(old - seen)}}


def describe(init: dict[str, Any]) -> str:
    """One line: where a run started and how its vocabulary was merged."""
    v, c = init["vocab"], init["corpus"]
    return (f"{init['path']} (step {init['step']:,}, trained on {', '.join(c['sources']) or '?'}); "
            f"vocabulary {v['size']}: {v['shared']} shared, {v['new']} new, {v['old_only']} kept from it only")
