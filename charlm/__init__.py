"""charlm: a character-level LSTM / GRU / RNN text generator.

Python API (the CLI uses the same functions)::

    import charlm
    m = charlm.load("checkpoints/best.pt")
    print(m.sample(prime="My fellow Americans", length=200, temperature=0.5, seed=1))
    for ch in m.stream(length=200, temperature=0.8):
        print(ch, end="", flush=True)

    cfg = charlm.RunConfig()                 # defaults; tweak cfg.model / cfg.train / cfg.session
    result = charlm.fit(cfg, ["corpus.txt"], "runs/mine")   # a progress bar (a widget in Jupyter)
    result.metrics, result.best, result.report                # the evaluations, best.pt, report.html
    charlm.resume("runs/mine/latest.pt", {"max_steps": 4000}, quiet=True)

Attributes are imported lazily so that `import charlm` (and `charlm --help`) does not
load PyTorch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "CharLMError",
    "ModelConfig",
    "RunConfig",
    "SessionConfig",
    "TrainConfig",
    "__version__",
    "fit",
    "load",
    "resume",
]

_LAZY = {
    "load": ("charlm.api", "load"),
    "CharLM": ("charlm.api", "CharLM"),
    # With progress (tqdm.auto), the loss plot and the run's report, as `charlm train` shows them.
    "fit": ("charlm.cli.notebook", "fit"),
    "resume": ("charlm.cli.notebook", "resume"),
    "RunConfig": ("charlm.config.run", "RunConfig"),
    "ModelConfig": ("charlm.config.run", "ModelConfig"),
    "TrainConfig": ("charlm.config.run", "TrainConfig"),
    "SessionConfig": ("charlm.config.run", "SessionConfig"),
    "CharLMError": ("charlm.errors", "CharLMError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
