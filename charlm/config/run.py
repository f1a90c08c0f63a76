"""Typed configuration: what defines a run, and what a session of it may change.

`ModelConfig` (the network) and `TrainConfig` (data layout, optimizer, schedule, seed) define
a run: they are fixed once it starts, and a resume that would change them is refused.
`SessionConfig` (budgets, device, precision, compile, evaluation cadence, retention,
previews) may differ in every session, so `charlm resume` accepts exactly its fields.

Precedence: defaults < TOML `--config` file < command-line flags. A config file has the
tables `[model]`, `[train]` and `[session]`, keyed by the flag names with underscores
(`hidden_size = 512`); files written before `[session]` existed kept those keys under
`[train]`, and still load. Every field declares its help text and its rule (`opt`), so the
CLI's flags and the validation follow from this file alone; values derived from settings
are methods of their config (`TrainConfig.streams`, `SessionConfig.time_seconds`), so each
such rule is written once.

What the user chose (a --config file and flags, read once) is a `Choices`: it makes the
run's config and tells a planner which settings to keep.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.config.options import coerce, opt, validate
from charlm.errors import CharLMError

CELLS = ("lstm", "gru", "rnn")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")  # charlm.training.budget.lr_at
RECORD_MODES = ("lines", "blank-lines")  # --records: one record per line, or per paragraph
DEFAULT_MAX_STEPS = 2000  # a run's length when neither --max-steps nor --time is given


def _check_duration(text: str) -> None:
    if text:
        parse_duration(text)


def _check_records(mode: str) -> None:
    if mode not in ("", *RECORD_MODES):
        raise CharLMError(f"{mode!r} is not one of {', '.join(RECORD_MODES)} (or empty: one stream of text)")


@dataclass
class ModelConfig:
    """Shape of the network; its vocabulary size always comes from the data."""

    cell: str = opt("lstm", "Recurrent cell: lstm | gru | rnn.", choices=CELLS)
    num_layers: int = opt(2, "Recurrent layers.", at_least=1)
    hidden_size: int = opt(256, "Units per recurrent layer.", at_least=1)
    embedding_size: int = opt(64, "Character embedding size.", at_least=1)
    dropout: float = opt(0.0, "Dropout between layers and before the head.", at_least=0.0, below=1.0)
    # AWD-LSTM's regularizers (charlm.model.network): the fused kernel still runs with them.
    weight_drop: float = opt(0.0, "DropConnect on the recurrent (hidden-to-hidden) weights: a new mask each "
                             "batch, the same at every time step (AWD-LSTM's weight drop).", at_least=0.0, below=1.0)
    locked_dropout: float = opt(0.0, "Variational dropout: one mask per sequence, the same at every time step, "
                                "on the inputs, between layers and before the head.", at_least=0.0, below=1.0)

    def regularized(self) -> bool:
        """Whether training runs weight drop or locked dropout (each layer in its own call)."""
        return self.weight_drop > 0 or self.locked_dropout > 0


@dataclass
class TrainConfig:
    """How a run learns: batch layout, optimizer, schedule, held-out split and seed.

    The defaults were chosen by benchmarks/quality.py (see benchmarks/RESULTS.md): on a CPU,
    small batches run as fast per character as big ones and give many more updates in minutes.
    """

    seq_len: int = opt(32, "Characters per truncated-BPTT window.", at_least=1)
    batch_size: int = opt(32, "Parallel streams per batch (per process under torchrun).", at_least=1)
    lr: float = opt(1e-2, "Peak learning rate (AdamW).", above=0.0)
    # Hägele et al. 2024: a constant rate with a short cooldown matches cosine; with a time
    # budget the cooldown is placed in the planned steps. The quality panel decides the default.
    schedule: str = opt("cosine", "Learning rate after warmup: cosine (decays over the whole run) | constant "
                        "(held, then a 1-sqrt cooldown over the last --cooldown of the run).", choices=SCHEDULES)
    cooldown: float = opt(0.2, "Share of the run's steps the constant schedule cools down over.",
                          above=0.0, at_most=1.0)
    min_lr_ratio: float = opt(0.1, "The schedule decays to lr x this.", at_least=0.0, at_most=1.0)
    warmup_steps: int = opt(50, "Linear warmup steps before the decay.", at_least=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only).", at_least=0.0)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this.", at_least=0.0)
    val_fraction: float = opt(0.05, "Fraction of the corpus (its end) held out for validation.",
                              above=0.0, at_most=0.5)
    # A gigabyte corpus holds out tens of megabytes, too many to score every few hundred
    # steps; rows are spread over all of it.
    eval_chars: int = opt(250_000, "Held-out characters scored per evaluation, spread over the "
                          "held-out text (0 = all).", at_least=0)
    seed: int = opt(1337, "Random seed (same seed, same run).", at_least=0)
    # Measured in benchmarks/averaging.py: the average scores better than the live weights,
    # most of all when the run sees its text many times (see benchmarks/RESULTS.md).
    ema: float = opt(0.0, "Keep an exponential moving average of the weights with this decay (0: off); "
                     "evaluation, best.pt and sampling use the average.", at_least=0.0, below=1.0)
    # Records and fine-tuning (charlm.data.records, charlm.training.finetune). A planner may fill the rest
    # of the config (lr, regularization) from these before the run starts.
    records: str = opt("", "Train on records: lines (one per line) or blank-lines (paragraphs); each "
                       "starts from a fresh state (empty: one stream of text).", check=_check_records)
    init_from: str = opt("", "Start from this checkpoint's weights (fine-tuning: a new run, its model "
                         "shape from the checkpoint, vocabularies merged by character).")

    def streams(self, world_size: int = 1) -> int:
        """Streams (batch rows) of the whole run: `batch_size` per process."""
        return self.batch_size * world_size

    def scored_chars(self, held_out: int) -> int:
        """Held-out characters an evaluation scores (see `scored_chars`)."""
        return scored_chars(held_out, self.eval_chars)


def scored_chars(held_out: int, eval_chars: int) -> int:
    """Characters an evaluation of `held_out` characters scores: all of them, or at most
    `eval_chars` (0: all), spread over the held-out text."""
    return held_out if not eval_chars or eval_chars >= held_out else max(2, eval_chars)


@dataclass
class SessionConfig:
    """What one training session may set, at the start of a run or on any resume."""

    max_steps: int = opt(0, "Optimizer steps to train: the schedule's length (0: none set; "
                         f"{DEFAULT_MAX_STEPS} when --time is not given either).", at_least=0)
    time: str = opt("", "Time budget: 300, 300s, 5m, 1h30m (empty: none).", check=_check_duration)
    device: str = opt("auto", "auto | cpu | cuda | mps (auto: CUDA, then MPS, then CPU).", choices=DEVICES)
    precision: str = opt("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on a CPU with native bf16, else fp32).",
                         choices=PRECISIONS)
    compile: bool = opt(False, "Use torch.compile.")
    eval_interval: int = opt(200, "Steps between evaluations and checkpoints (a planned --time run spaces "
                            "them wider, to take at most 3 % of its budget).", at_least=1)
    keep: int = opt(3, "Step-numbered checkpoints to keep (besides latest and best).", at_least=0)
    patience: int = opt(0, "Stop early once held-out bpc has not improved for this many evaluations "
                        "(0: train to the end).", at_least=0)
    preview_length: int = opt(200, "Characters per live sample at each evaluation (0: none).", at_least=0)
    tensorboard: bool = opt(False, "Also write the run's metrics and live samples as TensorBoard event files "
                            "in the run folder's tensorboard/ (needs pip install 'charlm[tensorboard]').")

    def time_seconds(self) -> float | None:
        """The `--time` budget in seconds (None: no time budget)."""
        return parse_duration(self.time) if self.time else None


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "session": SessionConfig}
SESSION_KEYS = frozenset(f.name for f in fields(SessionConfig))


@dataclass
class RunConfig:
    """A run's settings: saved as `config.toml` in its folder and in its checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    session: SessionConfig = field(default_factory=SessionConfig)

    def validate(self) -> RunConfig:
        validate(self.model, self.train, self.session)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def changed(self) -> set[str]:
        """The settings that differ from the built-in defaults."""
        default = RunConfig().to_dict()
        return {key for section, values in self.to_dict().items() for key, value in values.items()
                if value != default[section][key]}

    def updated(self, settings: dict[str, Any]) -> RunConfig:
        """A copy with `settings` ({key: value}, e.g. a planner's choice) set; not validated."""
        cfg = RunConfig.from_dict(self.to_dict())
        apply_overrides(cfg, nest(settings), "settings")
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> RunConfig:
        cfg = cls()
        apply_overrides(cfg, data, origin)
        return cfg


def _by_section() -> dict[str, dict[str, Any]]:
    """{section: {}} for every section: settings to be filled in."""
    return {name: {} for name in SECTIONS}


def sectioned(data: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    """`data` as {section: {key: value}}, with session keys found under the older `[train]`
    placement moved to `[session]`; unknown sections and keys raise, naming them."""
    out = _by_section()
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise CharLMError(f"{origin}: unknown section [{section}] (expected [model], [train] or [session])")
        known = {f.name for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if section == "train" and key in SESSION_KEYS:
                out["session"][key] = value  # written before [session] existed
            elif key in known:
                out[section][key] = value
            else:
                raise CharLMError(f"{origin}: unknown key {section}.{key}")
    return out


def apply_overrides(cfg: RunConfig, data: dict[str, Any], origin: str) -> None:
    """Set values from a nested dict ({section: {key: value}}), rejecting unknown keys."""
    for section, values in sectioned(data, origin).items():
        target = getattr(cfg, section)
        for key, value in values.items():
            setattr(target, key, coerce(SECTIONS[section], key, value))


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


def section_of(key: str) -> str:
    """The section a flag's field belongs to (field names are unique across sections)."""
    for name, cls in SECTIONS.items():
        if any(f.name == key for f in fields(cls)):
            return name
    raise CharLMError(f"{key}: not a setting")


def nest(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat settings ({key: value}; a `None` value is unset) in their sections."""
    nested = _by_section()
    for key, value in settings.items():
        if value is not None:
            nested[section_of(key)][key] = value
    return nested


@dataclass
class Choices:
    """The settings the user chose, in a `--config` file and as flags ({section: {key: value}},
    flags over the file): the file is read once, here."""

    values: dict[str, dict[str, Any]] = field(default_factory=_by_section)

    @classmethod
    def read(cls, config_file: Path | None, flags: dict[str, Any]) -> Choices:
        """The --config file (if any) and the flags that are set (`None`: not given)."""
        values = sectioned(load_toml(config_file), str(config_file)) if config_file is not None else _by_section()
        for section, set_here in nest(flags).items():
            values[section].update(set_here)
        return cls(values)

    @property
    def keys(self) -> set[str]:
        """The names of the settings chosen: a planner keeps them."""
        return {key for section in self.values.values() for key in section}

    def config(self, defaults: dict[str, Any] | None = None) -> RunConfig:
        """Defaults < `defaults` ({section: {key: value}}) < these choices; not validated
        (`RunConfig.validate`, which every session does first)."""
        cfg = RunConfig()
        if defaults:
            apply_overrides(cfg, defaults, "defaults")
        apply_overrides(cfg, self.values, "command line")
        return cfg


def build_config(config_file: Path | None, flags: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < `defaults` < config file < flags (`None` flags are unset) and validate."""
    return Choices.read(config_file, flags).config(defaults).validate()


def to_toml(cfg: RunConfig) -> str:
    """Serialize a config as TOML (only str/int/float/bool values occur)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
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
        raise CharLMError(f"{text!r} is not a duration (examples: 300, 300s, 5m, 1h30m)")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mnt * 60 + s
    if seconds <= 0:
        raise CharLMError(f"{text!r} must be longer than zero")
    return seconds
