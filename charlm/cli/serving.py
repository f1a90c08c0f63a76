"""`charlm serve` and `charlm export`: a model used from anywhere (an HTTP API with a
playground page, run by uvicorn; an ONNX file for any ONNX runtime; the weights as
safetensors)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm.cli.app import CheckpointArg, DeviceOpt, app, derived_options, err, handle_errors
from charlm.config.serving import TOKEN_ENV, ServeAccess, ServeSettings
from charlm.errors import CharLMError, require_extra


@app.command()
@handle_errors
@derived_options(ServeSettings, unset=False)
def serve(
    checkpoint: CheckpointArg,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (127.0.0.1: this machine only; any other needs a token "
        "or --no-auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        "--port", help="Port to listen on (0: any free port; the line on stderr says which).")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar=TOKEN_ENV, show_envvar=True, show_default=False, metavar="TOKEN",
        help="Require the header Authorization: Bearer TOKEN on every endpoint but the page and "
        f"/health. Given here it is visible to every user of this machine (ps): set {TOKEN_ENV} "
        "instead.")] = None,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="Listen beyond this machine with no token: anyone who can reach the port "
        "can use the server.")] = False,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", metavar="NAME", show_default=False,
        help="Also answer requests for this host name (repeat it, or a comma list; *.example.com: "
        "its subdomains): the name clients or a reverse proxy use. localhost and the address "
        "served are always answered.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        "--cors-origin", metavar="ORIGIN", show_default=False,
        help="Let pages of this origin (https://app.example.com) call the API from a browser "
        "(repeat it, or a comma list); pages of other sites are refused.")] = None,
    device: DeviceOpt = "cpu",
    **limits: Any,
) -> None:
    """HTTP API (POST /generate, GET /info, GET /health) and a playground page at /."""
    settings = ServeSettings(**limits).check()
    # Before anything is loaded or listened on: a server open to other machines is refused here.
    access = ServeAccess.from_flags(host, token, allowed_host, cors_origin).check(no_auth)
    require_extra("charlm serve", "serve", "fastapi", "uvicorn")
    import uvicorn

    from charlm.api import load
    from charlm.serving.app import create_app

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
    guarded = "token required" if access.token else "no token"
    err(f"charlm: serving {checkpoint} at http://{shown}:{bound}/ (playground at /, "
        f"API: POST /generate, GET /info, GET /health; {guarded}); Ctrl-C stops")
    config = uvicorn.Config(create_app(lm, settings, access), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


@app.command()
@handle_errors
def export(
    checkpoint: CheckpointArg,
    onnx: Annotated[Optional[Path], typer.Option(
        "--onnx", help="ONNX file to write: the one-step model, for any ONNX runtime.")] = None,
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", help="Vocabulary JSON to write with --onnx (default: ONNX_FILE.vocab.json).")] = None,
    safetensors: Annotated[Optional[Path], typer.Option(
        "--safetensors", help="safetensors file to write: the weights, with the model's settings "
        "and vocabulary in its metadata.")] = None,
) -> None:
    """Write the model for use outside charlm: --onnx, the one-step model (char id and state in,
    logits and state out) and its vocabulary JSON, for any ONNX runtime (needs `pip install
    'charlm[export]'`); --safetensors, the weights with their settings and vocabulary (needs
    `pip install 'charlm[safetensors]'`). Give either or both."""
    if onnx is None and safetensors is None:
        raise CharLMError("nothing to export: give --onnx FILE, --safetensors FILE or both")
    if vocab is not None and onnx is None:
        raise CharLMError("--vocab: only with --onnx (a safetensors file holds its vocabulary)")
    if onnx is not None and safetensors is not None and onnx.resolve() == safetensors.resolve():
        raise CharLMError(f"--onnx and --safetensors: both name {onnx}; give two files")
    from charlm.serving import onnx as onnx_export
    from charlm.serving import safetensors_export

    # Before loading: a missing package is the first thing to say.
    if onnx is not None:
        onnx_export.check_installed()
    if safetensors is not None:
        safetensors_export.check_installed()
    from charlm.api import load

    lm = load(checkpoint)
    if safetensors is not None:  # first: it takes a moment, the ONNX export seconds
        st = safetensors_export.export_safetensors(lm, safetensors)
        err(f"charlm: wrote {safetensors} ({len(lm.model.state_dict())} tensors, "
            f"{lm.model.num_parameters():,} parameters; {st['vocab_size']} characters in its metadata)")
    if onnx is not None:
        meta = onnx_export.export_onnx(lm, onnx, vocab)
        err(f"charlm: wrote {onnx} ({meta['cell']} {meta['num_layers']}x{meta['hidden_size']}, "
            f"inputs {meta['input']}, {', '.join(meta['state_inputs'])}) and "
            f"{vocab or onnx_export.vocab_path(onnx)} ({meta['vocab_size']} characters)")
