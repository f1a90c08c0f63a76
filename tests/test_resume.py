"""Exact resume: N steps + stop + resume (in a new process) + M steps equals N + M steps.

Also: a real SIGINT / SIGTERM / double SIGINT delivered to `charlm train` saves, exits
130 / 143 and the run resumes to the same final weights as an uninterrupted run; resume
refuses changes that would make it a different run, and accepts budget / cadence changes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    RUN_STEPS,
    TEXT,
    TINY,
    charlm_cmd,
    one_line_error,
    snapshot,
    subprocess_env,
    tiny_config,
    tiny_flags,
)

from charlm import fs
from charlm.cli import app
from charlm.config.run import RunConfig
from charlm.errors import CharLMError, TrainingInterrupted
from charlm.storage import checkpoint
from charlm.training import session
from charlm.training.events import Callbacks


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_step(self, stats):
        self.steps.append([stats.step, stats.bpc])


def dropout_config(total: int) -> RunConfig:
    # 2 layers + dropout 0.3: the dropout masks draw from the global torch RNG at every step,
    # so a resume that does not restore the RNG state gives different losses.
    # batch 16 x seq 32 over ~6.5k training chars: 12 windows per pass, so 30 steps cross
    # two pass boundaries (hidden-state reset and data position wrap).
    return tiny_config(num_layers=2, dropout=0.3, seq_len=32, batch_size=16, warmup_steps=5, max_steps=total,
                       eval_interval=5, precision="fp32", preview_length=16, seed=7)


def models_equal(a: Path, b: Path) -> None:
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    assert ca.progress.step == cb.progress.step
    assert ca.model.keys() == cb.model.keys()
    for key in ca.model:
        assert torch.equal(ca.model[key], cb.model[key]), f"{key} differs ({a} vs {b})"


def metrics(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # `elapsed` is wall time; everything else must match exactly.
    return [(r["step"], r["chars"], r["train_bpc"], r["val_bpc"], r["lr"]) for r in rows]


RESUME_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from charlm.training import session
from charlm.training.events import Callbacks

class Recorder(Callbacks):
    def __init__(self):
        self.steps = []
    def on_step(self, stats):
        self.steps.append([stats.step, stats.bpc])

rec = Recorder()
result = session.resume(sys.argv[1], {}, callbacks=rec)
with open(sys.argv[2], "w") as fh:
    json.dump({"steps": rec.steps, "step": result.step, "finished": result.finished}, fh)
"""


def test_stop_then_resume_in_new_process_is_bit_identical_with_dropout(corpus_file, tmp_path):
    n, m = 13, 17  # stop between evaluations (eval every 5) and mid-pass
    stopped, full = tmp_path / "stopped", tmp_path / "full"

    # Process 1 (this one): N+M planned, a stop request once step N is done -> exactly the
    # Ctrl-C path: finish the step, save latest.pt, raise TrainingInterrupted.
    first = Recorder()
    with pytest.raises(TrainingInterrupted) as info:
        session.fit(dropout_config(n + m), [str(corpus_file)], stopped, callbacks=first,
                    pending_signal=lambda: signal.SIGINT if first.steps and first.steps[-1][0] >= n else 0)
    assert info.value.step == n and info.value.signum == signal.SIGINT
    assert Path(info.value.checkpoint) == stopped / "latest.pt"
    assert checkpoint.load(stopped / "latest.pt").progress.step == n

    # Process 2: a fresh interpreter resumes from latest.pt and runs the remaining M steps.
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    log = tmp_path / "resume.json"
    proc = subprocess.run([sys.executable, str(script), str(stopped / "latest.pt"), str(log)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    second = json.loads(log.read_text())
    assert second["step"] == n + m and second["finished"]

    # Process 3 (this one again, fresh Trainer): N+M in one go.
    whole = Recorder()
    session.fit(dropout_config(n + m), [str(corpus_file)], full, callbacks=whole)

    assert [s for s, _ in first.steps] == list(range(1, n + 1))
    assert [s for s, _ in second["steps"]] == list(range(n + 1, n + m + 1))
    # Exact float equality of every step's loss (JSON round-trips floats exactly).
    assert first.steps + second["steps"] == whole.steps
    models_equal(stopped / "latest.pt", full / "latest.pt")
    models_equal(stopped / "best.pt", full / "best.pt")
    a, b = checkpoint.load(stopped / "latest.pt"), checkpoint.load(full / "latest.pt")
    for ga, gb in zip(a.optimizer["state"].values(), b.optimizer["state"].values(), strict=True):
        for key in ga:
            assert torch.equal(torch.as_tensor(ga[key]), torch.as_tensor(gb[key])), key
    assert a.progress.data == b.progress.data and a.progress.chars_seen == b.progress.chars_seen
    assert torch.equal(a.ranks[0].rng["torch"], b.ranks[0].rng["torch"])
    # metrics.jsonl: same evaluation steps, same train / val bpc and learning rates.
    assert metrics(stopped) == metrics(full)
    assert [r[0] for r in metrics(full)] == [5, 10, 15, 20, 25, 30]


def test_resume_without_the_saved_rng_would_differ(corpus_file, tmp_path):
    """Control: the comparison above is sensitive to the RNG state (dropout is really on)."""
    n = 6
    run = tmp_path / "run"
    rec = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(dropout_config(20), [str(corpus_file)], run, callbacks=rec,
                    pending_signal=lambda: signal.SIGINT if rec.steps and rec.steps[-1][0] >= n else 0)
    clobbered = tmp_path / "clobbered"
    shutil.copytree(run, clobbered)
    whole = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(dropout_config(20), [str(corpus_file)], tmp_path / "whole", callbacks=whole,
                    pending_signal=lambda: signal.SIGINT if len(whole.steps) > n else 0)
    expected_next = whole.steps[n][1]

    # The loss of a step is taken before its update, so a 1-step resume shows it.
    good = Recorder()
    session.resume(run / "latest.pt", {"max_steps": n + 1}, callbacks=good)
    assert good.steps == [[n + 1, expected_next]]

    ck = checkpoint.load(clobbered / "latest.pt")
    torch.manual_seed(12345)
    ck.ranks[0].rng["torch"] = torch.get_rng_state()
    fs.write_atomic(clobbered / "latest.pt", checkpoint.serialize(ck))
    bad = Recorder()
    session.resume(clobbered / "latest.pt", {"max_steps": n + 1}, callbacks=bad)
    assert bad.steps[0][0] == n + 1 and bad.steps[0][1] != expected_next


# --- real signals to the installed command -------------------------------------------------

TOTAL = 300
SIGNAL_FLAGS = [*tiny_flags(num_layers=2, dropout=0.3, eval_interval=25, warmup_steps=10, device="cpu",
                            precision="fp32", max_steps=TOTAL), "--no-planner", "--no-preview"]


def _signal_when_evaluating(proc: subprocess.Popen, signals: list[int], delay: float,
                            lines: list[str]) -> None:
    """Read stderr; `delay` s after the first evaluation line (step 25 of 300, so mid-run) send
    the signal; for a double signal, send the second as soon as the handler says it is saving."""
    pending = list(signals)
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if pending and len(pending) == len(signals) and line.startswith("step "):
            time.sleep(delay)  # a few steps past the evaluation: a stop between checkpoints
            proc.send_signal(pending.pop(0))
        elif pending and "finishing the step and saving" in line:
            proc.send_signal(pending.pop(0))


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """Three `charlm train` processes: SIGINT, SIGTERM, and SIGINT twice in quick succession;
    meanwhile an uninterrupted run of the same config in this process."""
    root = tmp_path_factory.mktemp("signals")
    corpus = root / "speech.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    plans = {"sigint": ([signal.SIGINT], 0.05), "sigterm": ([signal.SIGTERM], 0.0),
             "double": ([signal.SIGINT, signal.SIGINT], 0.0)}
    runs = {}
    for name, (sigs, delay) in plans.items():
        out = root / name
        proc = subprocess.Popen([*charlm_cmd(), "train", str(corpus), "--out", str(out), *SIGNAL_FLAGS],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env())
        lines: list[str] = []
        thread = threading.Thread(target=_signal_when_evaluating, args=(proc, sigs, delay, lines), daemon=True)
        thread.start()
        runs[name] = (proc, thread, lines, out)

    from typer.testing import CliRunner

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["train", str(corpus), "--out", str(root / "full"), *SIGNAL_FLAGS, "--quiet"])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert res.exit_code == 0, res.output

    results = {}
    for name, (proc, thread, lines, out) in runs.items():
        rc = proc.wait(timeout=180)
        thread.join(timeout=10)
        results[name] = {"rc": rc, "stderr": "".join(lines), "out": out}
    results["full"] = {"out": root / "full"}
    return results


@pytest.mark.parametrize("name, code, signame", [("sigint", 130, "SIGINT"), ("sigterm", 143, "SIGTERM"),
                                                 ("double", 130, "SIGINT")])
def test_signal_saves_says_how_to_resume_and_exits(signal_runs, name, code, signame):
    run = signal_runs[name]
    out, err = run["out"], run["stderr"]
    assert run["rc"] == code, err
    assert "Traceback" not in err
    latest = out / "latest.pt"
    step = checkpoint.load(latest).progress.step
    assert 25 <= step < TOTAL  # the signal landed mid-run
    assert f"charlm: {signame} at step {step}: saved {latest}" in err
    assert f"charlm: continue with: charlm resume {latest}" in err
    assert err.count("finishing the step and saving") == 1  # a second signal changes nothing
    assert not [p for p in out.iterdir() if p.name.startswith(fs.TMP_PREFIX)]
    # The last evaluation line printed never passes the saved step.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(25, step + 1, 25))


@pytest.mark.parametrize("name", ["sigint", "double"])
def test_resume_after_signal_matches_uninterrupted_run(signal_runs, runner, name):
    out, full = signal_runs[name]["out"], signal_runs["full"]["out"]
    assert signal_runs[name]["rc"] == 130
    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    models_equal(out / "latest.pt", full / "latest.pt")
    assert checkpoint.load(out / "latest.pt").progress.step == TOTAL
    assert metrics(out) == metrics(full)


# --- what a resume may and may not change ----------------------------------------------------


@pytest.mark.parametrize("toml, named", [("[model]\nhidden_size = 64\n", "model.hidden_size"),
                                         ("[train]\nseq_len = 8\n", "train.seq_len"),
                                         ("[model]\ncell = \"gru\"\n", "model.cell")])
def test_resume_refuses_a_config_that_changes_the_run(runner, run_copy, tmp_path, toml, named):
    other = tmp_path / "other.toml"
    other.write_text(toml)
    before = snapshot(run_copy)
    res = runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--config", str(other),
                              "--max-steps", "30"])
    line = one_line_error(res)
    assert named in line and "resume" in line
    assert snapshot(run_copy) == before


def test_resume_refuses_a_changed_corpus(runner, corpus_file, tmp_path):
    run = tmp_path / "run"  # its own run: the shared run's corpus must not change
    assert runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "5", *TINY]).exit_code == 0
    corpus_file.write_text(corpus_file.read_text() + "One more line.\n", encoding="utf-8")
    before = snapshot(run)
    line = one_line_error(runner.invoke(app, ["resume", str(run / "latest.pt"), "--max-steps", "30"]))
    assert "corpus changed" in line
    assert snapshot(run) == before


def test_resume_refuses_fewer_steps_than_done_and_a_run_copy_without_more(runner, run_copy):
    before = snapshot(run_copy)
    line = one_line_error(runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--max-steps", "10"]))
    assert "--max-steps 10" in line and f"step {RUN_STEPS}" in line
    line = one_line_error(runner.invoke(app, ["resume", str(run_copy / "latest.pt")]))
    assert "already finished" in line and "--max-steps" in line
    assert snapshot(run_copy) == before
    with pytest.raises(CharLMError, match="cannot be changed on resume"):
        session.resume(run_copy / "latest.pt", {"max_steps": 40, "lr": 0.1})


def test_resume_accepts_budget_cadence_and_device_changes(runner, run_copy, tmp_path):
    same = tmp_path / "same.toml"  # repeating the run's own settings is allowed
    same.write_text("[model]\nhidden_size = 32\nnum_layers = 1\n[train]\nseq_len = 16\nmax_steps = 999\n")
    res = runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--max-steps", "40",
                              "--eval-interval", "5", "--device", "cpu", "--config", str(same), "--quiet"])
    assert res.exit_code == 0, res.output
    ck = checkpoint.load(run_copy / "latest.pt")
    assert ck.progress.step == 40 and ck.budget.total_steps == 40
    assert ck.config.session.eval_interval == 5
    assert [r[0] for r in metrics(run_copy)] == [10, 20, 30, 35, 40]


def test_a_run_with_a_weight_average_resumes_exactly(corpus_file, tmp_path):
    """--ema: the average is the saved model, the live weights ride along; both resume exactly."""
    cfg = dropout_config(20)
    cfg.train.ema = 0.9
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    rec = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(cfg, [str(corpus_file)], stopped, callbacks=rec,
                    pending_signal=lambda: signal.SIGINT if rec.steps and rec.steps[-1][0] >= 7 else 0)
    session.resume(stopped / "latest.pt")
    session.fit(cfg, [str(corpus_file)], full)
    models_equal(stopped / "latest.pt", full / "latest.pt")
    a, b = checkpoint.load(stopped / "latest.pt"), checkpoint.load(full / "latest.pt")
    assert a.live is not None and all(torch.equal(a.live[k], b.live[k]) for k in a.live)
    assert any(not torch.equal(a.live[k], a.model[k]) for k in a.live)  # the average is not the live weights
    assert metrics(stopped) == metrics(full)
