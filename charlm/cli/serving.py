"""`charlm serve` and `charlm export`: a model used from anywhere (an HTTP API with a
playground page, run by uvicorn; an ONNX file for any ONNX runtime)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm.cli.app import CheckpointArg, DeviceOpt, app, derived_options, err, handle_errors
from charlm.config.serving import ServeSettings
from charlm.errors import CharLMError


@app.command()
@handle_errors
@derived_options(ServeSettings, unset=False)
def serve(
    checkpoint: CheckpointArg,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        "--port", help="Port to listen on (0: any free port; the line on stderr says which).")] = 8000,
    device: DeviceOpt = "cpu",
    **limits: Any,
) -> None:
    """HTTP API (POST /generate, GET /info, GET /health) and a playground page at /."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise CharLMError(f"charlm serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'charlm[serve]'") from None

    from charlm.api import load
    from charlm.serving.app import create_app

    settings = ServeSettings(**limits).check()
    lm = load(checkpoint, device=device)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # before the line below: clients that read it are queued, not refused
    except OSError as exc:
        sock.close()
        raise CharLMError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    err(f"charlm: serving {checkpoint} at http://{shown}:{bound}/ (playground at /, "
        f"API: POST /generate, GET /info, GET /health); Ctrl-C stops")
    config = uvicorn.Config(create_app(lm, settings), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


@app.command()
@handle_errors
def export(
    checkpoint: CheckpointArg,
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write: the one-step model.")],
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", help="Vocabulary JSON to write (default: ONNX_FILE.vocab.json).")] = None,
) -> None:
    """Write the one-step model (char id and state in, logits and state out) as ONNX, and its
    vocabulary as JSON, for any ONNX runtime (needs `pip install 'charlm[export]'`)."""
    from charlm.serving.onnx import check_installed, export_onnx, vocab_path

    check_installed()  # before loading: the missing package is the first thing to say
    from charlm.api import load

    meta = export_onnx(load(checkpoint), onnx, vocab)
    err(f"charlm: wrote {onnx} ({meta['cell']} {meta['num_layers']}x{meta['hidden_size']}, "
        f"inputs {meta['input']}, {', '.join(meta['state_inputs'])}) and "
        f"{vocab or vocab_path(onnx)} ({meta['vocab_size']} characters)")
