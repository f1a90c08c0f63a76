"""A model used from elsewhere.

    app.py                 `charlm serve`: the FastAPI app, its limits and its playground page
    worker.py              the one thread that runs the model for every request
    onnx.py                the one-step model exported for any ONNX runtime
    safetensors_export.py  the weights as safetensors, with settings and vocabulary in its metadata

Imports: `api` and everything below it; never analysis or the CLI.
"""
