"""Configuration: defaults < --config TOML < flags, validation that names the flag, presets."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from charlm.cli import app
from charlm.config.run import (
    ModelConfig,
    RunConfig,
    SessionConfig,
    TrainConfig,
    build_config,
    load_toml,
    parse_duration,
    to_toml,
)
from charlm.errors import CharLMError

PRESETS = sorted((ROOT / "configs").glob("*.toml"))




def toml_file(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- precedence ---------------------------------------------------------------------------


def test_defaults():
    cfg = build_config(None, {})
    assert cfg == RunConfig()
    assert cfg.model == ModelConfig() and cfg.train == TrainConfig() and cfg.session == SessionConfig()


def test_config_file_overrides_defaults_and_flags_override_the_file(tmp_path):
    path = toml_file(tmp_path, "[model]\ncell = 'gru'\nhidden_size = 48\n\n[train]\nlr = 0.01\nseq_len = 32\n")
    cfg = build_config(path, {"hidden_size": 24, "seq_len": None, "batch_size": 8})
    assert cfg.model.cell == "gru"  # file over default
    assert cfg.model.hidden_size == 24  # flag over file
    assert cfg.train.lr == 0.01 and cfg.train.seq_len == 32  # file; the None flag is unset
    assert cfg.train.batch_size == 8  # flag over default
    assert cfg.model.num_layers == ModelConfig().num_layers  # untouched default


def test_integers_are_accepted_where_floats_are_expected(tmp_path):
    cfg = build_config(toml_file(tmp_path, "[train]\nlr = 1\ngrad_clip = 2\n"), {})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.grad_clip, float)


def test_precedence_through_the_cli(tmp_path, runner, corpus_file):
    path = toml_file(tmp_path, "[model]\nhidden_size = 40\nembedding_size = 8\n\n[train]\nlr = 0.005\nbatch_size = 2\n")
    out = tmp_path / "run"
    # TINY sets --hidden-size 32 and --batch-size 4: the flags win over the file.
    res = runner.invoke(app, ["train", str(corpus_file), "--config", str(path), "--out", str(out),
                              "--max-steps", "3", *TINY, "--embedding-size", "12"])
    assert res.exit_code == 0, res.output
    saved = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["batch_size"] == 4  # flags
    assert saved["model"]["embedding_size"] == 12  # flag
    assert saved["train"]["lr"] == 0.005  # file
    assert saved["model"]["num_layers"] == 1 and saved["session"]["max_steps"] == 3
    assert saved["train"]["warmup_steps"] == TrainConfig().warmup_steps  # default
    # The config.toml in the run folder is the one the checkpoint holds, and it round-trips.
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)
    assert info["config"] == saved
    assert build_config(out / "config.toml", {}) == RunConfig.from_dict(info["config"])
    assert RunConfig.from_dict(saved).validate().to_dict() == saved


# --- TOML round trip ----------------------------------------------------------------------


def test_to_toml_round_trips():
    cfg = RunConfig(
        ModelConfig(cell="rnn", num_layers=3, hidden_size=7, embedding_size=3, dropout=0.25),
        TrainConfig(lr=1e-5, weight_decay=0.0, seed=0),
        SessionConfig(time="1h30m", compile=True, device="cpu", precision="bf16", max_steps=123),
    ).validate()
    text = to_toml(cfg)
    back = RunConfig.from_dict(tomllib.loads(text))
    assert back == cfg
    assert back.validate().to_dict() == cfg.to_dict()
    assert to_toml(back) == text


def test_to_toml_round_trips_defaults():
    assert RunConfig.from_dict(tomllib.loads(to_toml(RunConfig()))) == RunConfig()


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "flag"),
    [
        ("model", "cell", "transformer", "--cell"),
        ("model", "num_layers", 0, "--num-layers"),
        ("model", "hidden_size", -4, "--hidden-size"),
        ("model", "embedding_size", 2.5, "--embedding-size"),
        ("model", "dropout", 1.0, "--dropout"),
        ("model", "dropout", -0.1, "--dropout"),
        ("train", "seq_len", 0, "--seq-len"),
        ("train", "batch_size", 0, "--batch-size"),
        ("train", "lr", -0.001, "--lr"),
        ("train", "lr", 0.0, "--lr"),
        ("train", "lr", math.nan, "--lr"),
        ("train", "lr", math.inf, "--lr"),
        ("train", "lr", True, "--lr"),
        ("train", "lr", "fast", "--lr"),
        ("train", "min_lr_ratio", 1.5, "--min-lr-ratio"),
        ("train", "warmup_steps", -1, "--warmup-steps"),
        ("train", "weight_decay", -1.0, "--weight-decay"),
        ("train", "grad_clip", -1.0, "--grad-clip"),
        ("session", "max_steps", -5, "--max-steps"),
        ("session", "time", "soon", "--time"),
        ("session", "time", "0", "--time"),
        ("train", "val_fraction", 0.0, "--val-fraction"),
        ("train", "val_fraction", 0.9, "--val-fraction"),
        ("session", "eval_interval", 0, "--eval-interval"),
        ("session", "keep", -1, "--keep"),
        ("train", "seed", -1, "--seed"),
        ("session", "device", "tpu", "--device"),
        ("session", "precision", "fp8", "--precision"),
        ("session", "preview_length", -1, "--preview-length"),
    ],
)
def test_validation_names_the_flag(section, key, value, flag):
    with pytest.raises(CharLMError) as info:
        RunConfig.from_dict({section: {key: value}}).validate()
    assert str(info.value).startswith(flag + ":")
    with pytest.raises(CharLMError) as info:
        build_config(None, {key: value})  # the same check on a command-line value
    assert str(info.value).startswith(flag + ":")


def test_unknown_key_and_section_are_named(tmp_path):
    path = toml_file(tmp_path, "[model]\nhidden_sise = 3\n")
    with pytest.raises(CharLMError) as info:
        build_config(path, {})
    assert str(path) in str(info.value) and "model.hidden_sise" in str(info.value)
    path = toml_file(tmp_path, "[optimizer]\nlr = 3\n", "sec.toml")
    with pytest.raises(CharLMError) as info:
        build_config(path, {})
    assert str(path) in str(info.value) and "[optimizer]" in str(info.value)
    path = toml_file(tmp_path, "lr = 3\n", "top.toml")  # a key outside any table
    with pytest.raises(CharLMError, match="unknown section"):
        build_config(path, {})


def test_bad_toml_and_missing_file_name_the_flag(tmp_path):
    bad = toml_file(tmp_path, "[model\nhidden_size = \n")
    with pytest.raises(CharLMError) as info:
        load_toml(bad)
    assert str(info.value).startswith("--config:") and str(bad) in str(info.value)
    assert "invalid TOML" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CharLMError, match=r"^--config: .*nope\.toml: no such file"):
        load_toml(tmp_path / "nope.toml")


def test_bad_value_in_config_file_names_the_setting(tmp_path):
    path = toml_file(tmp_path, "[model]\ncell = 'transformer'\n")
    with pytest.raises(CharLMError, match="--cell"):
        build_config(path, {})


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300), ("300s", 300), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), ("1h2m3s", 3723),
     (" 2M ", 120), ("0.5", 0.5)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "m", "1m1h", "-5", "0", "0m", "5 m"])
def test_parse_duration_rejects(text):
    with pytest.raises(CharLMError, match="is not a duration|longer than zero"):
        parse_duration(text)
    if text:  # as a setting it names the flag (an empty --time means no time budget)
        with pytest.raises(CharLMError, match="^--time: "):
            build_config(None, {"time": text})


# --- presets ------------------------------------------------------------------------------


def test_presets_folder_holds_presets():
    files = [p for p in (ROOT / "configs").glob("*") if not p.name.startswith(".")]
    if not files:
        pytest.skip("configs/ holds no presets yet")
    assert PRESETS, f"configs/ holds files but no *.toml preset: {[p.name for p in files]}"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_validates(preset):
    data = load_toml(preset)
    assert data and set(data) <= {"model", "train", "session"}
    cfg = build_config(preset, {})
    assert cfg.validate() is cfg
    # Every key in the file took effect.
    for section, values in data.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{preset.name}: {section}.{key}"
    # Flags still win over a preset.
    assert build_config(preset, {"hidden_size": 8}).model.hidden_size == 8


def test_cpu_preset_is_the_built_in_default():
    """configs/cpu.toml documents the defaults: the two must not drift apart."""
    preset = build_config(ROOT / "configs" / "cpu.toml", {})
    assert preset.model == ModelConfig()
    assert preset.train == TrainConfig()
    assert preset.session == SessionConfig()


def test_files_from_before_the_session_table_still_load(tmp_path):
    """Budgets, device and cadence used to live under [train]: such files still load."""
    path = toml_file(tmp_path, "[train]\nlr = 0.02\nmax_steps = 77\ntime = '5m'\nprecision = 'fp32'\n")
    cfg = build_config(path, {})
    assert cfg.train.lr == 0.02
    assert (cfg.session.max_steps, cfg.session.time, cfg.session.precision) == (77, "5m", "fp32")
    assert build_config(path, {"max_steps": 5}).session.max_steps == 5  # the flag still wins


def test_every_problem_is_named_in_one_line():
    with pytest.raises(CharLMError) as info:
        build_config(None, {"lr": -1.0, "seq_len": 0, "cell": "tree"})
    message = str(info.value)
    assert "\n" not in message
    for flag in ("--lr: ", "--seq-len: ", "--cell: "):
        assert flag in message


def test_every_setting_has_a_flag_with_help_and_a_readme_row(runner):
    """Each setting is declared once (its field); the flag and the row in the command
    reference (docs/commands.md) follow from it."""
    import dataclasses
    import re

    from charlm.config.options import flag

    reference = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    train_section = re.search(r"^### `charlm train.*?(?=^### )", reference, re.S | re.M).group(0)
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    for cls in (ModelConfig, TrainConfig, SessionConfig):
        for field in dataclasses.fields(cls):
            name = flag(field.name)
            assert field.metadata["help"], field.name
            assert name in help_text, f"charlm train has no {name}"
            assert f"`{name}" in train_section or f" {name}" in train_section, f"docs/commands.md: no row for {name}"


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    # On CUDA bf16 bought the LSTM no speed and stalled a wide one (RESULTS, GPU), so auto is fp32.
    import torch

    from charlm import device as dev

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dev.resolve_precision("auto", cuda) == "fp32"
    assert dev.resolve_precision("bf16", cuda) == "bf16"  # an explicit choice stands
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    assert dev.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    assert dev.resolve_precision("auto", cpu) == "fp32"


def test_values_derived_from_settings_are_the_configs_own():
    """Each rule once: the seconds of --time, the streams of a run, what an evaluation scores."""
    from charlm.config.run import scored_chars
    from charlm.model.scoring import eval_rows

    assert SessionConfig(time="1h30m").time_seconds() == 5400.0 and SessionConfig().time_seconds() is None
    assert TrainConfig(batch_size=24).streams() == 24 and TrainConfig(batch_size=24).streams(4) == 96
    t = TrainConfig(eval_chars=1000)
    assert (t.scored_chars(600), t.scored_chars(50_000), TrainConfig(eval_chars=0).scored_chars(50_000)) == (
        600, 1000, 50_000)
    assert scored_chars(50_000, 1) == 2  # a row needs a character to read and one to score
    for n, cap in ((50_000, 1000), (600, 1000), (50_000, 0)):
        starts, length = eval_rows(n, cap)
        assert len(starts) * length <= scored_chars(n, cap) < len(starts) * (length + 1)
