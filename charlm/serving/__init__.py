"""A model used from elsewhere.

    app.py                 `charlm serve`: the FastAPI app, its limits and its playground page
    security.py            closed by default: the Host, Origin and bearer-token checks
    worker.py              the one thread that runs the model: every request a group of one batch
    onnx.py                the one-step model exported for any ONNX runtime
    safetensors_export.py  the weights as safetensors, with settings and vocabulary in its metadata

Imports: `api` and everything below it; never analysis or the CLI.
"""
