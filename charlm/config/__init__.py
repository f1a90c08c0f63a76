"""Settings, declared once and free of PyTorch, FastAPI and Typer (the CLI builds its flags
from them without loading any of those; a test keeps it so).

    options.py   the declared-option machinery: a field's default, help text and rule
    run.py       a run's settings: ModelConfig and TrainConfig (fixed for the run),
                 SessionConfig (may change on every resume), RunConfig, TOML, Choices
    sampling.py  SampleOptions: what a sample asks for
    serving.py   ServeSettings: what `charlm serve` allows

Imports: the leaves (`errors`) only.
"""
