"""The command-line contract: every command, its files and streams, exit codes and errors.

Most tests call the Typer app in-process (CliRunner); a few run the installed `charlm`
script, because one-line usage errors and the lazy torch import are properties of the
real entry point.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CHARS_PER_STEP, RUN_STEPS, TEXT, TINY, charlm_cmd, one_line_error, snapshot, subprocess_env
from typer.testing import CliRunner

from charlm import __version__
from charlm.cli import app
from charlm.config.run import ModelConfig
from charlm.model.network import CharRNN
from charlm.storage import checkpoint

METRIC_KEYS = {"step", "chars", "train_bpc", "val_bpc", "lr", "elapsed"}


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# --- train --------------------------------------------------------------------------------


def test_train_writes_the_run_folder(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"latest.pt", "best.pt", "config.toml", "metrics.jsonl"} <= names
    assert {"step-0000010.pt", "step-0000020.pt", "step-0000030.pt"} <= names
    assert not [n for n in names if n.startswith(".tmp-")]  # no temporary files left behind
    metrics = read_metrics(trained_run)
    assert [m["step"] for m in metrics] == [10, 20, 30]  # one line per evaluation
    for m in metrics:
        assert set(m) >= METRIC_KEYS
        assert m["chars"] == m["step"] * CHARS_PER_STEP
        assert 0 < m["train_bpc"] < 10 and 0 < m["val_bpc"] < 10
        assert m["lr"] > 0 and m["elapsed"] >= 0
    assert [m["elapsed"] for m in metrics] == sorted(m["elapsed"] for m in metrics)


def test_best_is_the_lowest_validation_bpc(trained_run):
    best = min(m["val_bpc"] for m in read_metrics(trained_run))
    ck_best = torch.load(trained_run / "best.pt", weights_only=True)
    ck_latest = torch.load(trained_run / "latest.pt", weights_only=True)
    assert ck_best["progress"]["best_val_bpc"] == pytest.approx(best)
    assert ck_latest["progress"]["step"] == RUN_STEPS


def _plain(value: Any, where: str = "checkpoint") -> None:
    """Only tensors and plain Python values (what weights_only loading allows)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
        return
    assert isinstance(value, dict), f"{where}: {type(value).__name__}"
    for k, v in value.items():
        assert isinstance(k, (str, int)), f"{where}: key {k!r}"
        _plain(v, f"{where}[{k!r}]")


@pytest.mark.parametrize("name", ["latest.pt", "best.pt", "step-0000010.pt"])
def test_checkpoints_load_with_weights_only_and_hold_plain_values(trained_run, name):
    ck = torch.load(trained_run / name, map_location="cpu", weights_only=True)
    _plain(ck)
    assert ck["format"] == "charlm" and ck["version"] == checkpoint.VERSION
    assert set(ck) == {"format", "version", "model", "config", "vocab", "corpus", "optimizer", "scaler",
                       "progress", "plan", "hidden", "ranks", "trained_on", "init", "planner", "live", "digest"}
    assert ck["digest"] == {"algorithm": "crc32", "parts": checkpoint.digests(ck)}
    # TINY: trained from scratch, no planner, no weight average.
    assert ck["init"] == {} and ck["planner"] is None and ck["live"] is None
    assert set(ck["progress"]) == {"step", "chars_seen", "elapsed", "best_val_bpc", "last_val_bpc",
                                   "loss_window", "data", "since_best"}
    assert set(ck["ranks"][0]["rng"]) == {"torch", "python"}
    assert ck["vocab"] == "".join(sorted(set(TEXT)))
    assert all(isinstance(v, torch.Tensor) for v in ck["model"].values())


def test_train_prints_progress_on_stderr_only(runner, corpus_file, tmp_path):
    out = tmp_path / "run"
    flags = [f for f in TINY if f not in ("--quiet", "--no-preview")]
    res = invoke(runner, "train", corpus_file, "--out", out, "--max-steps", "10", *flags,
                 "--preview-length", "20")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # stdout is kept for generated text
    assert "step 10" in res.stderr and "charlm sample" in res.stderr


def test_train_several_sources(runner, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "b.txt").write_text(TEXT.upper(), encoding="utf-8")
    (folder / "c.txt").write_text(TEXT[::-1], encoding="utf-8")
    out = tmp_path / "run"
    res = invoke(runner, "train", tmp_path / "a.txt", folder, "--out", out, "--max-steps", "2", *TINY)
    assert res.exit_code == 0, res.output
    info = json.loads(invoke(runner, "info", out / "latest.pt", "--json").stdout)
    assert info["corpus"]["documents"] == 3
    assert info["corpus"]["sources"] == [str(tmp_path / "a.txt"), str(folder)]


# --- bad input: one line on stderr, exit 2, nothing written -----------------------------------


def _bad_train_args(tmp_path: Path, case: str, good: Path) -> tuple[list[Any], list[str]]:
    """CLI arguments for one bad-input case and the strings its error line must hold."""
    if case == "missing-path":
        return [tmp_path / "missing.txt"], [str(tmp_path / "missing.txt")]
    if case == "folder-without-text":
        d = tmp_path / "notes"
        d.mkdir()
        (d / "readme.md").write_text("# not text", encoding="utf-8")
        return [d], [str(d), ".txt"]
    if case == "empty-file":
        (tmp_path / "empty.txt").write_bytes(b"")
        return [tmp_path / "empty.txt"], [str(tmp_path / "empty.txt"), "empty"]
    if case == "binary-file":
        (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        return [tmp_path / "image.txt"], [str(tmp_path / "image.txt"), "binary"]
    if case == "invalid-utf8":
        (tmp_path / "latin.txt").write_bytes("Grüße\n".encode("latin-1"))
        return [tmp_path / "latin.txt"], [str(tmp_path / "latin.txt"), "UTF-8", "--encoding"]
    if case == "unknown-nltk-corpus":
        return ["nltk:no_such_corpus_xyz"], ["nltk:no_such_corpus_xyz"]
    if case == "unknown-encoding":
        return [good, "--encoding", "klingon"], ["--encoding", "klingon"]
    if case == "bad-cell":
        return [good, "--cell", "transformer"], ["--cell", "transformer"]
    if case == "negative-lr":
        return [good, "--lr", "-0.1"], ["--lr"]
    if case == "zero-layers":
        return [good, "--num-layers", "0"], ["--num-layers"]
    if case == "bad-dropout":
        return [good, "--dropout", "1.5"], ["--dropout"]
    if case == "bad-time":
        return [good, "--time", "soon"], ["--time", "soon"]
    if case == "bad-device":
        return [good, "--device", "tpu"], ["--device", "tpu"]
    if case == "bad-toml":
        (tmp_path / "bad.toml").write_text("[model\nhidden_size = 3\n", encoding="utf-8")
        return [good, "--config", tmp_path / "bad.toml"], ["--config", str(tmp_path / "bad.toml")]
    if case == "unknown-config-key":
        (tmp_path / "cfg.toml").write_text("[train]\nlearning_rate = 0.1\n", encoding="utf-8")
        return [good, "--config", tmp_path / "cfg.toml"], [str(tmp_path / "cfg.toml"), "learning_rate"]
    if case == "missing-config":
        return [good, "--config", tmp_path / "nope.toml"], ["--config", str(tmp_path / "nope.toml")]
    if case == "batch-too-big":
        (tmp_path / "short.txt").write_text("abcdefghijklmnop", encoding="utf-8")
        return [tmp_path / "short.txt", "--batch-size", "64"], ["--batch-size"]
    raise AssertionError(case)


BAD_TRAIN = ["missing-path", "folder-without-text", "empty-file", "binary-file", "invalid-utf8",
             "unknown-nltk-corpus", "unknown-encoding", "bad-cell", "negative-lr", "zero-layers",
             "bad-dropout", "bad-time", "bad-device", "bad-toml", "unknown-config-key",
             "missing-config", "batch-too-big"]


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_train_bad_input(runner, corpus_file, tmp_path, case):
    args, needles = _bad_train_args(tmp_path, case, corpus_file)
    out = tmp_path / "run"
    # The case's arguments come last: a repeated option takes its last value.
    res = invoke(runner, "train", "--out", out, "--max-steps", "3", *TINY, *args)
    one_line_error(res, *needles)
    assert not out.exists()  # everything is checked before the first write


def test_train_out_is_a_file(runner, corpus_file, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me", encoding="utf-8")
    res = invoke(runner, "train", corpus_file, "--out", target, "--max-steps", "3", *TINY)
    one_line_error(res, "--out", str(target))
    assert target.read_text(encoding="utf-8") == "keep me"


@pytest.mark.parametrize("command", ["info", "eval", "resume"])
def test_missing_checkpoint(runner, tmp_path, command):
    res = invoke(runner, command, tmp_path / "nope.pt")
    one_line_error(res, str(tmp_path / "nope.pt"))


def test_text_file_is_not_a_checkpoint(runner, corpus_file):
    res = invoke(runner, "info", corpus_file)
    one_line_error(res, str(corpus_file))


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--temperature", "-1"], "--temperature"), (["--temperature", "hot"], "--temperature"),
     (["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"), (["--length", "-5"], "--length"),
     (["--num-samples", "0"], "--num-samples"), (["--unknown", "maybe"], "--unknown"),
     (["--prime", "ü€"], "ü")],
)
def test_sample_bad_options_exit_2(runner, trained_run, args, flag):
    res = invoke(runner, "sample", "-c", trained_run / "latest.pt", *args)
    one_line_error(res, flag)


# --- resume -------------------------------------------------------------------------------


def test_resume_continues_to_max_steps(runner, run_copy):
    res = invoke(runner, "resume", run_copy / "latest.pt", "--max-steps", "32", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    info = json.loads(invoke(runner, "info", run_copy / "latest.pt", "--json").stdout)
    assert info["step"] == 32 and info["total_steps"] == 32
    assert info["chars_seen"] == 32 * CHARS_PER_STEP
    metrics = read_metrics(run_copy)
    assert [m["step"] for m in metrics] == [10, 20, 30, 32]
    assert [m["chars"] for m in metrics] == [m["step"] * CHARS_PER_STEP for m in metrics]


def test_resume_a_finished_run_needs_a_new_budget(runner, run_copy):
    before = snapshot(run_copy)
    res = invoke(runner, "resume", run_copy / "latest.pt")
    one_line_error(res, str(run_copy / "latest.pt"), "--max-steps")
    res = invoke(runner, "resume", run_copy / "latest.pt", "--max-steps", "7")
    one_line_error(res, "--max-steps")
    assert snapshot(run_copy) == before


# --- sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 57])
def test_sample_stdout_is_exactly_the_text(runner, trained_run, length):
    res = invoke(runner, "sample", "-c", trained_run / "best.pt", "--no-echo", "--length", str(length), "--seed", "7")
    assert res.exit_code == 0, res.output
    assert len(res.stdout) == length + 1 and res.stdout.endswith("\n")
    assert set(res.stdout[:-1]) <= set(TEXT)


def test_sample_echoes_the_prime(runner, trained_run):
    res = invoke(runner, "sample", "-c", trained_run / "best.pt", "--prime", "Mr. Speaker", "--length", "20",
                 "--seed", "1")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Mr. Speaker")
    assert len(res.stdout) == len("Mr. Speaker") + 20 + 1


def test_sample_same_seed_same_text(runner, trained_run):
    a = invoke(runner, "sample", "-c", trained_run / "best.pt", "--length", "40", "--seed", "5").stdout
    b = invoke(runner, "sample", "-c", trained_run / "best.pt", "--length", "40", "--seed", "5").stdout
    assert a == b and len(a) == 41


def test_sample_default_checkpoint(runner, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke(runner, "sample", "--length", "10")
    one_line_error(res, "checkpoints")
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    shutil.copy(trained_run / "best.pt", ckdir / "best.pt")
    (ckdir / "latest.pt").write_bytes(b"not a checkpoint")
    res = invoke(runner, "sample", "--length", "10", "--no-echo")
    assert res.exit_code == 0, res.output  # best.pt first
    assert len(res.stdout) == 11
    (ckdir / "best.pt").unlink()
    res = invoke(runner, "sample", "--length", "10")
    one_line_error(res, "checkpoints/latest.pt")  # then latest.pt (corrupt here)
    shutil.copy(trained_run / "latest.pt", ckdir / "latest.pt")
    res = invoke(runner, "sample", "--length", "10", "--no-echo")
    assert res.exit_code == 0, res.output
    assert len(res.stdout) == 11


# --- eval / info / version ----------------------------------------------------------------


def test_eval_json(runner, trained_run):
    res = invoke(runner, "eval", trained_run / "best.pt", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert math.isfinite(data["bpc"]) and 0 < data["bpc"] < 8
    assert data["chars"] > 0 and data["skipped_chars"] == 0
    assert data["step"] in (10, 20, 30)
    # Without --json: a readable table.
    res = invoke(runner, "eval", trained_run / "best.pt")
    assert res.exit_code == 0 and "bpc" in res.stdout


def test_eval_on_text_with_unknown_characters(runner, trained_run, tmp_path):
    text = TEXT[:2000] + "Grüße — €100\n"
    path = tmp_path / "other.txt"
    path.write_text(text, encoding="utf-8")
    unknown = [c for c in text if c not in TEXT]
    assert unknown
    res = invoke(runner, "eval", trained_run / "best.pt", path, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout holds only the JSON; the warning goes to stderr
    assert data["skipped_chars"] == len(unknown)
    assert data["chars"] > 0 and data["corpus"] == [str(path)]
    assert "warning" in res.stderr and str(len(unknown)) in res.stderr


def test_eval_on_text_with_no_known_characters(runner, trained_run, tmp_path):
    path = tmp_path / "greek.txt"
    path.write_text("αβγδ" * 10, encoding="utf-8")
    one_line_error(invoke(runner, "eval", trained_run / "best.pt", path), "nothing to evaluate")


def test_info_json(runner, trained_run):
    res = invoke(runner, "info", trained_run / "latest.pt", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    vocab = len(set(TEXT))
    expected_params = CharRNN(ModelConfig(num_layers=1, hidden_size=32, embedding_size=16), vocab).num_parameters()
    assert data["step"] == RUN_STEPS and data["total_steps"] == RUN_STEPS
    assert data["chars_seen"] == RUN_STEPS * CHARS_PER_STEP
    assert data["vocab_size"] == vocab and data["parameters"] == expected_params
    assert data["format_version"] == checkpoint.VERSION and data["device_trained"] == "cpu"
    assert data["best_val_bpc"] <= data["last_val_bpc"]
    assert data["corpus"]["documents"] == 1 and data["corpus"]["chars"] == len(TEXT)
    assert len(data["corpus"]["sha256"]) == 64
    assert data["config"]["model"] == {"cell": "lstm", "num_layers": 1, "hidden_size": 32,
                                       "embedding_size": 16, "dropout": 0.0, "weight_drop": 0.0,
                                       "locked_dropout": 0.0}
    assert data["config"]["train"]["seq_len"] == 16 and data["config"]["session"]["max_steps"] == RUN_STEPS
    res = invoke(runner, "info", trained_run / "latest.pt")
    assert res.exit_code == 0 and "parameters" in res.stdout and "model.hidden_size" in res.stdout


def test_version(runner):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"charlm {__version__}"


# --- the installed script -----------------------------------------------------------------


def _run(args: list[Any], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: a tiny model gains nothing from more, and a busy machine loses a lot.
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(OMP_NUM_THREADS="1"))


def test_installed_script_trains_and_samples(corpus_file, tmp_path):
    res = _run([*charlm_cmd(), "train", corpus_file, "--out", "run", "--max-steps", "10", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert (tmp_path / "run" / "best.pt").exists()
    res = _run([*charlm_cmd(), "sample", "-c", "run/best.pt", "--no-echo", "--length", "64", "--seed", "2"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout) == 65 and res.stdout.endswith("\n")
    assert set(res.stdout[:-1]) <= set(TEXT)


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["train", "--bogus"], "--bogus"), (["train", "--max-steps", "many"], "--max-steps"),
     (["frobnicate"], "frobnicate")],
    ids=["unknown-option", "bad-int", "unknown-command"],
)
def test_usage_errors_are_one_line(tmp_path, args, needle):
    res = _run([*charlm_cmd(), *args], tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_python_m_charlm_help_and_lazy_torch(tmp_path):
    res = _run([sys.executable, "-m", "charlm", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for command in ("train", "resume", "sample", "eval", "info"):
        assert command in res.stdout
    res = _run([sys.executable, "-c", "import sys, charlm.cli; print('torch' in sys.modules)"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"  # `charlm --help` must not pay for importing torch
