"""Typed run configuration: defaults < TOML --config file < command-line flags.

A config file has two tables, `[model]` and `[train]`, whose keys are the flag names with
underscores (`hidden_size = 512`). Unknown keys and bad values raise `CharLMError` naming
the key, so the CLI can say exactly which setting is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.errors import CharLMError

CELLS = ("lstm", "gru", "rnn")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """Shape of the network; `vocab_size` is not here because it always comes from the data."""

    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0

    def validate(self) -> None:
        _check_choice("cell", self.cell, CELLS)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("embedding_size", self.embedding_size, 1)
        _check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class TrainConfig:
    """How to train: batch layout, optimizer, schedule, budgets and checkpoint cadence."""

    # Chosen by benchmarks/quality.py (see benchmarks/RESULTS.md): on a CPU, small batches
    # run as fast per character as big ones and give many more updates in minutes.
    seq_len: int = 32
    batch_size: int = 32
    lr: float = 1e-2
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 0  # 0: no step limit (2000 steps when --time is not given either)
    time: str = ""  # DURATION; empty means no time budget
    val_fraction: float = 0.05
    eval_interval: int = 200
    # Held-out characters scored per evaluation (0: all). A gigabyte corpus holds out tens of
    # megabytes, too many to score every few hundred steps; rows are spread over all of it.
    eval_chars: int = 250_000
    keep: int = 3
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    preview_length: int = 200

    def validate(self) -> None:
        _check_int("seq_len", self.seq_len, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, 0.0, math.inf, lo_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_float("grad_clip", self.grad_clip, 0.0, math.inf)
        _check_int("max_steps", self.max_steps, 0)
        if self.time:
            parse_duration(self.time)
        _check_float("val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        _check_int("eval_interval", self.eval_interval, 1)
        _check_int("eval_chars", self.eval_chars, 0)
        _check_int("keep", self.keep, 0)
        _check_int("seed", self.seed, 0)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_int("preview_length", self.preview_length, 0)


@dataclass
class RunConfig:
    """Everything a training run was started with; saved as `config.toml` and in checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> "RunConfig":
        cfg = cls()
        apply_overrides(cfg, data, origin)
        return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CharLMError(f"{_flag(name)}: {value!r} is not one of {', '.join(choices)}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CharLMError(f"{_flag(name)}: must be an integer >= {lo}, got {value!r}")


def _check_float(
    name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = f"{'(' if lo_open else '['}{lo:g}"
        hi_s = f"{hi:g}{')' if hi_open else ']'}"
        raise CharLMError(f"{_flag(name)}: must be a number in {lo_s}, {hi_s}, got {value!r}")


def apply_overrides(cfg: RunConfig, data: dict[str, Any], origin: str) -> None:
    """Set `[model]` / `[train]` values from a nested dict, rejecting unknown keys by name."""
    sections = {"model": cfg.model, "train": cfg.train}
    for section, values in data.items():
        target = sections.get(section)
        if target is None or not isinstance(values, dict):
            raise CharLMError(f"{origin}: unknown section [{section}] (expected [model] or [train])")
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            f = known.get(key)
            if f is None:
                raise CharLMError(f"{origin}: unknown key {section}.{key}")
            # TOML writes 3 for 3.0; accept ints where floats are expected.
            if f.type in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            setattr(target, key, value)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file, turning I/O and syntax errors into one-line `CharLMError`s."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CharLMError(f"--config: {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise CharLMError(f"--config: {path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise CharLMError(f"--config: {path}: {exc.strerror}") from None


def build_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Resolve defaults < config file < flags (`None` flags are unset) and validate."""
    cfg = RunConfig()
    if config_file is not None:
        apply_overrides(cfg, load_toml(config_file), str(config_file))
    model_keys = {f.name for f in fields(ModelConfig)}
    nested: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in flags.items():
        if value is not None:
            nested["model" if key in model_keys else "train"][key] = value
    apply_overrides(cfg, nested, "command line")
    return cfg.validate()


def to_toml(cfg: RunConfig) -> str:
    """Serialize a config as TOML (only str/int/float/bool values occur)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """Seconds in a DURATION: `300`, `300s`, `5m`, `1h30m`, `1.5h`."""
    m = _DURATION.match(text.strip().lower())
    if not text.strip() or m is None or not any(m.groups()):
        raise CharLMError(f"--time: {text!r} is not a duration (examples: 300, 300s, 5m, 1h30m)")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mnt * 60 + s
    if seconds <= 0:
        raise CharLMError(f"--time: {text!r} must be longer than zero")
    return seconds
