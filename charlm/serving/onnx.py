"""ONNX export: the one-step model (a character id and the recurrent state in, logits and
the new state out) plus its vocabulary as JSON, so any ONNX runtime can generate text.

The graph comes from `torch.onnx.export(..., dynamo=True)` (the `torch.export` based
exporter, which needs onnxscript). The legacy TorchScript exporter gives the same numbers
today but warns that it will be removed, so it is not used. Every layer's h (and c for
LSTM) is a separate input and output with a plain name (`h0`, `c0`, `h1`, ... in;
`h0_out`, `c0_out`, ... out), and the batch axis is dynamic.

Generation with the exported files: start from zero state; feed each prime id in turn
(or `start_id` when there is no prime); after each step feed the `*_out` tensors back as
the state; the logits after the last fed id pick the next character, which is fed next.
That is exactly what `charlm sample` does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from charlm.errors import CharLMError, require_extra
from charlm.fs import atomic_path
from charlm.model.network import CharRNN

FORMAT = "charlm-onnx"
FORMAT_VERSION = 1
CHAR_INPUT = "char_id"
LOGITS_OUTPUT = "logits"


def state_names(cell: str, num_layers: int) -> list[str]:
    """Names of the state inputs, layer by layer: h0, c0, h1, c1, ... (no c for GRU/RNN)."""
    kinds = ("h", "c") if cell == "lstm" else ("h",)
    return [f"{k}{layer}" for layer in range(num_layers) for k in kinds]


def vocab_path(onnx_path: Path) -> Path:
    """Where the vocabulary goes by default: beside the model, `model.onnx.vocab.json`."""
    return onnx_path.with_name(onnx_path.name + ".vocab.json")


def start_id(chars: str) -> int:
    """The id generation starts from without a prime (as the sampler: "\\n", else id 0)."""
    return chars.index("\n") if "\n" in chars else 0


class OneStep(nn.Module):
    """CharRNN's own forward for one character: (char_id (B,), *state (B, H)) ->
    (logits (B, V), *new_state), with the state as flat per-layer tensors."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model
        self.lstm = model.cfg.cell == "lstm"

    def forward(self, char_id: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.lstm:  # state is h0, c0, h1, c1, ...: stack to (L, B, H) each
            carried: Any = (torch.stack(state[0::2]), torch.stack(state[1::2]))
        else:
            carried = torch.stack(state)
        logits, new = self.model(char_id[:, None], carried)  # (B, 1, V)
        if self.lstm:
            h, c = new
            flat = [t for layer in range(h.shape[0]) for t in (h[layer], c[layer])]
        else:
            flat = list(new.unbind(0))
        return (logits[:, 0], *flat)


def check_installed() -> None:
    """Raise `CharLMError` with the install command when the exporter's packages are missing."""
    require_extra("ONNX export", "export", "onnx", "onnxscript")


def export_onnx(lm: Any, onnx_path: str | Path, vocab_file: str | Path | None = None) -> dict[str, Any]:
    """Write `lm`'s (a `charlm.api.CharLM`) one-step model to `onnx_path` and its vocabulary
    JSON to `vocab_file` (default `<onnx_path>.vocab.json`); returns the JSON written.

    Both files are written atomically (`charlm.fs.atomic_path`)."""
    check_installed()
    onnx_path = Path(onnx_path)
    json_path = Path(vocab_file) if vocab_file is not None else vocab_path(onnx_path)
    cfg = lm.model.cfg
    names = state_names(cfg.cell, cfg.num_layers)
    chars = lm.vocab.chars
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": onnx_path.name,
        "chars": list(chars),
        "vocab_size": len(chars),
        "start_id": start_id(chars),
        "cell": cfg.cell,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "input": CHAR_INPUT,
        "state_inputs": names,
        "output": LOGITS_OUTPUT,
        "state_outputs": [f"{n}_out" for n in names],
        "checkpoint": str(lm.path),
        "step": int(lm.info()["step"]),
    }
    model = CharRNN(cfg, len(chars))  # a CPU copy in eval mode: dropout off, any device in
    model.load_state_dict({k: v.detach().cpu() for k, v in lm.model.state_dict().items()})
    model.eval()
    for path in (onnx_path, json_path):
        if path.is_dir():
            raise CharLMError(f"{path}: is a folder, not a file to write")
    try:
        with contextlib.ExitStack() as files:
            # Both temporary files exist before the (slow) export: an unwritable path fails first.
            tmp_onnx, tmp_json = (_writing(files, path) for path in (onnx_path, json_path))
            _export(OneStep(model), tmp_onnx, names, cfg.hidden_size)
            tmp_json.write_text(_json(meta), encoding="utf-8")
    except OSError as exc:  # renaming them into place
        raise CharLMError(f"{onnx_path}: cannot write: {exc.strerror or exc}") from None
    return meta


def _writing(files: contextlib.ExitStack, path: Path) -> Path:
    """A temporary file that replaces `path` when `files` closes without an error."""
    try:
        return files.enter_context(atomic_path(path))
    except OSError as exc:
        raise CharLMError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _json(meta: dict[str, Any]) -> str:
    """One key per line (the chars list on one line too), readable and diffable."""
    rows = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items()]
    return "{\n" + ",\n".join(rows) + "\n}\n"


def _export(step: OneStep, path: Path, names: list[str], hidden: int) -> None:
    # Example batch of 2: torch.export specializes a size-1 dimension to the constant 1.
    args = (torch.zeros(2, dtype=torch.int64), *[torch.zeros(2, hidden) for _ in names])
    batch = torch.export.Dim("batch")
    with _quiet():
        torch.onnx.export(
            step, args, str(path), dynamo=True, external_data=False, verbose=False,
            input_names=[CHAR_INPUT, *names], output_names=[LOGITS_OUTPUT, *[f"{n}_out" for n in names]],
            dynamic_shapes=({0: batch}, tuple({0: batch} for _ in names)),
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter reports progress on stdout and deprecation notes through warnings and
    logging; the library prints nothing, and a failure still raises."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                              "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
