"""safetensors export: the weights a loaded model samples with, in one `.safetensors` file
whose metadata holds everything else a reader needs (model settings, vocabulary, records).

The tensors are `CharRNN`'s state dict under its own names (`embed.weight`,
`rnn.weight_ih_l0`, ..., `head.bias`), so `CharRNN(ModelConfig(**json.loads(meta["model"])),
len(chars)).load_state_dict(load_file(path), strict=True)` rebuilds the model without
charlm's checkpoint code (docs/python-api.md shows it whole). A model trained with weight
drop has the same state dict as one without (`charlm.model.network`), so its file is the
same shape.

safetensors metadata is a str -> str map; what is not a plain string is stored as JSON:

    format          "charlm"
    format_version  "1": this layout
    model           JSON object: the `ModelConfig` fields (cell, num_layers, hidden_size, ...)
    vocab           JSON string: the characters in id order (ASCII-escaped)
    vocab_size      its length
    start_id        the id to feed first without a prime ("\\n" or 0, as `charlm sample`;
                    for records, the start marker)
    records         "" (one stream of text), "lines" or "blank-lines"
    record_start, record_end, record_separator
                    records only, JSON strings: the marker read first from a fresh state, the
                    marker the model predicts to end a record, and how records are joined
    checkpoint, step  where the weights came from
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from charlm.data.records import END, SEPARATORS, START
from charlm.errors import CharLMError, require_extra
from charlm.fs import replace_file
from charlm.serving.onnx import start_id

FORMAT = "charlm"
FORMAT_VERSION = 1


def check_installed() -> None:
    """Raise `CharLMError` with the install command when the safetensors package is missing."""
    require_extra("safetensors export", "safetensors", "safetensors")


def metadata(lm: Any) -> dict[str, str]:
    """The file's metadata for `lm` (a `charlm.api.CharLM`), as the module docstring lists it."""
    chars, records = lm.vocab.chars, lm.records
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": json.dumps(dataclasses.asdict(lm.model.cfg)),
        # ASCII-escaped: the header must be valid UTF-8, and a vocabulary may hold a lone surrogate.
        "vocab": json.dumps(chars),
        "vocab_size": str(len(chars)),
        "start_id": str(chars.index(START) if records else start_id(chars)),
        "records": records,
    }
    if records:
        meta |= {"record_start": json.dumps(START), "record_end": json.dumps(END),
                 "record_separator": json.dumps(SEPARATORS[records])}
    return meta | {"checkpoint": str(lm.path), "step": str(lm.checkpoint.progress.step)}


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict as CPU tensors, each a contiguous copy of its own: safetensors
    refuses tensors that share memory (cuDNN keeps an RNN's weights in one flat buffer)."""
    return {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for name, t in model.state_dict().items()}


def export_safetensors(lm: Any, path: str | Path) -> dict[str, str]:
    """Write the weights `lm` (a `charlm.api.CharLM`) samples with and their `metadata` to
    `path` as safetensors, replacing it only once complete (`charlm.fs.replace_file`);
    returns the metadata written."""
    check_installed()
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise CharLMError(f"{path}: is a folder, not a file to write")
    meta = metadata(lm)
    # In memory first (a character model is megabytes): the file is then written the one way
    # charlm replaces files, and a failure names the file, its size and the free space.
    replace_file(path, save(tensors(lm.model), metadata=meta))
    return meta
