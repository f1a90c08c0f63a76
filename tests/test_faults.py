"""Ordinary faults that used to lose or corrupt a run, tried as a user meets them:

- two writers in one run folder (`train` twice, `resume` twice): the second exits 2 at once
  naming the first, whose run is intact and equals a run that was alone;
- a diverging run (`--lr 1000`, or a NaN / exploding loss at a chosen step): exit 3, no
  non-finite weights ever written, the last good checkpoint untouched and resumable exactly;
  a checkpoint with non-finite weights is refused (tests/test_checkpoint_safety.py);
- a full disk (a real 1-page-granular tmpfs where this machine allows mounting one, and an
  injected ENOSPC at every write site): one line, every earlier file loadable, nothing
  temporary left, and the run resumes exactly once there is room;
- a batch that cannot fit in memory: refused before anything is allocated, and an
  out-of-memory error that still happens is the same one line;
- a corpus whose files are gone: `eval` and `resume` use the cache and say so.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
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
from charlm.data import cache
from charlm.errors import CharLMError, Diverged
from charlm.model.network import CharRNN
from charlm.model.size import parameter_count
from charlm.storage import checkpoint, rundir
from charlm.storage.runlock import LOCK_FILE, RunLock
from charlm.training import divergence, memory, probe, reads, session
from charlm.training import trainer as train
from charlm.training.events import Callbacks

LINUX = sys.platform.startswith("linux")


# --- helpers --------------------------------------------------------------------------------


def models_equal(a: Path, b: Path) -> None:
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    assert ca.progress.step == cb.progress.step
    for key in ca.model:
        assert torch.equal(ca.model[key], cb.model[key]), f"{key} differs ({a} vs {b})"


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_files_are_whole(run: Path) -> None:
    """Every file of the folder is loadable, and no weights in it are NaN or infinite."""
    assert not [p.name for p in run.iterdir() if p.name.startswith(fs.TMP_PREFIX)]
    for p in run.glob("*.pt"):
        raw = torch.load(p, weights_only=True)  # whole (not cut short) ...
        for name, t in raw["model"].items():  # ... and never broken weights
            assert torch.isfinite(t).all(), f"{p.name}: {name} is not finite"
        checkpoint.load(p)
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)  # no line cut short
    if (run / "config.toml").exists():
        tomllib.loads((run / "config.toml").read_text())


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*charlm_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())


def wait_for_lock(run: Path, proc: subprocess.Popen) -> None:
    """Until `proc` holds the run's lock (its pid is in the lock file)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if (run / LOCK_FILE).read_text().startswith(f"{proc.pid} "):
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.005)


def the_line(stderr: str) -> str:
    """The one error line of a command's stderr (warnings before it aside)."""
    lines = [line for line in stderr.splitlines()
             if line.startswith("charlm") and not line.startswith("charlm: warning:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- one writer per run folder ---------------------------------------------------------------


def test_two_trains_started_0_3_s_apart_one_runs_and_the_other_is_refused(trained_run, tmp_path):
    corpus, run = trained_run.parent / "speech.txt", tmp_path / "run"
    args = ["train", str(corpus), "--out", str(run), "--max-steps", "300", *TINY]
    first = popen(*args)
    time.sleep(0.3)
    second = popen(*args)
    outs = [p.communicate(timeout=180) for p in (first, second)]
    codes = sorted((p.returncode, i) for i, p in enumerate((first, second)))
    assert [c for c, _ in codes] == [0, 2], outs
    winner, loser = (first, second) if first.returncode == 0 else (second, first)
    line = the_line(outs[(first, second).index(loser)][1])
    # Before: both passed the "already holds a run" check and wrote into one folder.
    assert line.startswith(f"charlm: error: --out {run}: another charlm process is writing this run "
                           f"(pid {winner.pid}: charlm train {corpus} --out {run}"), line
    assert "wait for it to finish" in line
    # The winner's run is whole and is exactly what it would have been alone.
    assert metric_steps(run) == list(range(10, 301, 10))
    assert not (run / LOCK_FILE).exists()
    run_files_are_whole(run)
    alone = tmp_path / "alone"
    session.fit(tiny_config(max_steps=300), [str(corpus)], alone)
    models_equal(run / "latest.pt", alone / "latest.pt")
    # ... and resumes exactly.
    for folder in (run, alone):
        assert session.resume(folder / "latest.pt", {"max_steps": 320}).step == 320
    models_equal(run / "latest.pt", alone / "latest.pt")


def test_two_resumes_at_once_the_second_is_refused_and_the_first_is_intact(run_copy, tmp_path):
    twin = Path(shutil.copytree(run_copy, tmp_path / "twin"))
    args = ["resume", str(run_copy / "latest.pt"), "--max-steps", "120", "--quiet"]
    first = popen(*args)
    wait_for_lock(run_copy, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold it there, lock taken, while the second starts
    try:
        second = subprocess.run([*charlm_cmd(), *args], capture_output=True, text=True, env=subprocess_env(),
                                timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and second.stdout == ""
    line = the_line(second.stderr)
    assert line == (f"charlm: error: {run_copy}: another charlm process is writing this run (pid {first.pid}: "
                    f"charlm resume {run_copy / 'latest.pt'} --max-steps 120 --quiet); wait for it to finish "
                    "or stop it (Ctrl-C saves), or choose another folder")
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    # One writer's lines only: before, the two processes' metrics lines were interleaved.
    assert metric_steps(run_copy) == list(range(10, 121, 10))
    run_files_are_whole(run_copy)
    session.resume(twin / "latest.pt", {"max_steps": 120})
    models_equal(run_copy / "latest.pt", twin / "latest.pt")


def test_a_killed_writer_leaves_no_lock_that_blocks_the_next(run_copy, runner):
    first = popen("resume", str(run_copy / "latest.pt"), "--max-steps", "100000", "--quiet")
    wait_for_lock(run_copy, first)
    first.kill()
    first.communicate()
    assert (run_copy / LOCK_FILE).read_text().startswith(f"{first.pid} ")  # its file stays ...
    step = checkpoint.load(run_copy / "latest.pt").progress.step
    res = runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--max-steps", str(step + 5), "--quiet"])
    assert res.exit_code == 0, res.output  # ... but the OS released its lock
    assert checkpoint.load(run_copy / "latest.pt").progress.step == step + 5
    assert not (run_copy / LOCK_FILE).exists()


def test_a_held_lock_refuses_every_writer_and_no_reader(run_copy, runner, corpus_file):
    before = snapshot(run_copy)
    with RunLock(run_copy, command="charlm train speech.txt --out run"):
        held = f"another charlm process is writing this run (pid {os.getpid()}: charlm train speech.txt --out run)"
        for args in (["train", str(corpus_file), "--out", str(run_copy), *TINY],
                     ["train", str(corpus_file), "--out", str(run_copy), "--force", *TINY],
                     ["resume", str(run_copy / "latest.pt"), "--max-steps", "40", "--quiet"]):
            one_line_error(runner.invoke(app, args), held)
        # Readers never need the lock.
        for args in (["sample", "-c", str(run_copy / "best.pt"), "--length", "5"],
                     ["eval", str(run_copy / "latest.pt")], ["info", str(run_copy / "latest.pt")]):
            assert runner.invoke(app, args).exit_code == 0
        assert runner.invoke(app, ["plot", str(run_copy)]).exit_code == 0
    assert {k: v for k, v in snapshot(run_copy).items() if k != "loss.png"} == {
        k: v for k, v in before.items() if k != "loss.png"}
    assert not (run_copy / LOCK_FILE).exists()


def test_the_lock_file_is_not_a_run_and_survives_force(run_copy, corpus_file, tmp_path):
    # A lock file left by a killed writer does not make an empty folder "hold a run".
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_FILE).write_text("99999 charlm train gone.txt\n")
    assert rundir.RunDir(empty).holds_run() is None
    session.fit(tiny_config(max_steps=5), [str(corpus_file)], empty)
    assert checkpoint.load(empty / "latest.pt").progress.step == 5

    class LockSeen(Callbacks):
        def on_start(self, info):  # after --force removed the old run's files
            self.text = (run_copy / LOCK_FILE).read_text()

    seen = LockSeen()
    session.fit(tiny_config(max_steps=5), [str(corpus_file)], run_copy, force=True, callbacks=seen)
    assert seen.text.startswith(f"{os.getpid()} ")
    assert checkpoint.load(run_copy / "latest.pt").progress.step == 5


def test_a_refused_start_leaves_no_folder_behind(tmp_path, runner):
    out = tmp_path / "new" / "run"
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "nosuch.txt"), "--out", str(out), *TINY]),
                   "nosuch.txt")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not LINUX, reason="torchrun workers are found in /proc")
def test_under_torchrun_rank_0_holds_the_lock_and_a_refusal_is_one_line(run_copy):
    with RunLock(run_copy, command="charlm resume run/latest.pt"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "charlm", "resume", str(run_copy / "latest.pt"), "--max-steps", "40"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=180)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("charlm:", "charlm["))]
    assert ours == [f"charlm: error: {run_copy}: another charlm process is writing this run (pid {os.getpid()}: "
                    "charlm resume run/latest.pt); wait for it to finish or stop it (Ctrl-C saves), or choose "
                    "another folder"], proc.stderr
    # torchrun prints a traceback of its own; the workers print none and exit 2.
    assert "[rank" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr) and not re.search(r"exitcode\s*:\s*1\b", proc.stderr)
    assert checkpoint.load(run_copy / "latest.pt").progress.step == RUN_STEPS


# --- divergence ------------------------------------------------------------------------------


def test_the_divergence_rule_known_answers():
    # 32 characters: a uniform guess scores 5 bits; the limit is 2 bits above it, or 3 x the
    # last validation bpc when that is higher (3 x 5 = 15 before the first evaluation).
    assert divergence.loss_limit(32, None) == 15.0
    assert divergence.loss_limit(32, 1.5) == 7.0
    assert divergence.loss_limit(32, 4.0) == 12.0
    assert divergence.loss_limit(32, float("nan")) == 15.0
    v = divergence.verdict
    assert v(6.9, 3.0, 7.0) == divergence.FINE
    assert v(7.1, 3.0, 7.0) == divergence.EXPLODED
    assert v(6.9, float("inf"), 7.0) == divergence.GRAD_NOT_FINITE
    assert v(6.9, float("inf"), 7.0) < v(float("nan"), 1.0, 7.0) == divergence.LOSS_NOT_FINITE
    assert v(6.9, None, 7.0) == divergence.FINE  # fp16: the loss scaler owns infinite gradients


def test_lr_1000_stops_with_exit_3_and_saves_no_broken_weights(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "60", *TINY,
                              "--lr", "1000"])
    assert res.exit_code == 3, res.output
    line = the_line(res.stderr)
    assert line.startswith("charlm: error: training diverged at step ")
    assert "that step was not applied" in line and "no checkpoint of this run was saved" in line
    assert "lower --lr (this run's peak: 1000)" in line
    # Before: it trained on with NaN loss and saved NaN weights as best.pt, exit 0.
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]
    run_files_are_whole(run)


class Poison:
    """The trainer's training loss, except that training step `at` gets the loss `make(loss)`
    (the evaluation's is left alone)."""

    def __init__(self, at: int, make) -> None:
        self.at, self.make, self.calls = at, make, 0
        self.real = train.stream_loss

    def __call__(self, *args, **kwargs):
        loss, state = self.real(*args, **kwargs)
        self.calls += 1
        return (self.make(loss) if self.calls == self.at else loss), state


@pytest.mark.parametrize(("what", "make", "said"), [
    ("nan", lambda loss: loss * float("nan"), "the loss is not a number"),
    ("exploded", lambda loss: loss * 50, "the loss jumped to "),
])
@pytest.mark.parametrize("reads", [1, 8])
def test_a_divergence_after_saves_keeps_the_last_good_checkpoint(runner, corpus_file, tmp_path, monkeypatch,
                                                                what, make, said, reads):
    """Read every step (a CPU) or every 8 (a GPU): step 25 diverges, nothing after step 20 is saved."""
    run = tmp_path / "run"
    monkeypatch.setattr(train, "sync_interval", lambda *_: reads)
    monkeypatch.setattr(train, "stream_loss", Poison(25, make))
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "40", *TINY])
    monkeypatch.undo()
    assert res.exit_code == 3, res.output
    line = the_line(res.stderr)
    assert line.startswith(f"charlm: error: training diverged at step 25: {said}"), line
    assert f"the last good checkpoint is {run / 'latest.pt'} (step 20)" in line
    assert "resuming it would meet the same batch" in line
    run_files_are_whole(run)
    assert metric_steps(run) == [10, 20]
    assert [checkpoint.load(run / n).progress.step for n in ("latest.pt", "best.pt")] == [20, 20]
    # Nothing of step 25 reached the weights: resumed, the run ends as a run that never met it.
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    alone = tmp_path / "alone"
    session.fit(tiny_config(max_steps=40), [str(corpus_file)], alone)
    models_equal(run / "latest.pt", alone / "latest.pt")


def test_a_diverged_step_never_reaches_the_weights(corpus_file, tmp_path, monkeypatch):
    """Library level: the NaN step raises before optimizer.step, and no save writes NaN."""
    seen: list[int] = []

    class Steps(Callbacks):
        def on_step(self, stats):
            seen.append(stats.step)

    monkeypatch.setattr(train, "stream_loss", Poison(3, lambda loss: loss * float("nan")))
    with pytest.raises(Diverged) as info:
        session.fit(tiny_config(max_steps=10), [str(corpus_file)], tmp_path / "run", callbacks=Steps())
    assert info.value.step == 3 and seen == [1, 2]
    assert not list((tmp_path / "run").glob("*.pt"))


# --- the GPU's deferred reads, on the CPU -----------------------------------------------------


def test_the_host_reads_the_losses_every_step_except_on_a_single_gpu():
    assert reads.sync_interval("cpu", False, False) == 1
    assert reads.sync_interval("cuda", False, False) == reads.SYNC_STEPS > 1
    assert reads.sync_interval("cuda", True, False) == 1  # torchrun: the ranks agree every step
    assert reads.sync_interval("cuda", False, True) == 1  # fp16: the loss scaler reads the host


@pytest.fixture
def gpu_reads(monkeypatch):
    """The GPU's path on this CPU: the trainer reads the losses every 4 steps."""
    monkeypatch.setattr(train, "sync_interval", lambda *_: 4)


def test_read_every_few_steps_training_is_the_same_run_bit_for_bit(corpus_file, tmp_path, monkeypatch):
    every = tmp_path / "every"
    session.fit(tiny_config(max_steps=30), [str(corpus_file)], every)
    monkeypatch.setattr(train, "sync_interval", lambda *_: 4)
    forwards, told = Poison(0, lambda loss: loss), []

    class Steps(Callbacks):
        def on_step(self, stats):
            told.append((stats.step, forwards.calls, stats.bpc))

    monkeypatch.setattr(train, "stream_loss", forwards)
    deferred = tmp_path / "deferred"
    session.fit(tiny_config(max_steps=30), [str(corpus_file)], deferred, callbacks=Steps())
    models_equal(every / "latest.pt", deferred / "latest.pt")
    metrics = [(every / "metrics.jsonl").read_text(), (deferred / "metrics.jsonl").read_text()]
    assert [json.loads(line)["train_bpc"] for line in metrics[0].splitlines()] == \
           [json.loads(line)["train_bpc"] for line in metrics[1].splitlines()]
    # Each step is told once, in order, with its loss, after the steps up to the next read
    # (every 4, and at each evaluation: steps 10, 20, 30) have run.
    assert [step for step, _, _ in told] == list(range(1, 31))
    assert told[0][1] == 4 and told[8][1] == 10 and all(math.isfinite(bpc) for _, _, bpc in told)


def test_read_every_few_steps_a_diverged_step_is_skipped_on_the_device(corpus_file, tmp_path, monkeypatch, gpu_reads):
    """The NaN step 3 is not read until step 4; the fused optimizer skipped it on its own, so
    the weights stay finite, and the run stops at step 3 having saved nothing."""
    seen: list[int] = []

    class Steps(Callbacks):
        def on_step(self, stats):
            seen.append(stats.step)

    made: list[train.Trainer] = []
    real = train.Trainer.__init__

    def keep(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(train.Trainer, "__init__", keep)
    monkeypatch.setattr(train, "stream_loss", Poison(3, lambda loss: loss * float("nan")))
    with pytest.raises(Diverged) as info:
        session.fit(tiny_config(max_steps=10), [str(corpus_file)], tmp_path / "run", callbacks=Steps())
    assert info.value.step == 3 and seen == [1, 2]
    assert made[-1].progress.step == 4  # step 4 ran before the host read step 3
    assert all(bool(torch.isfinite(w).all()) for w in made[-1].model.parameters())
    assert not list((tmp_path / "run").glob("*.pt"))


@pytest.mark.skipif(not LINUX, reason="torchrun workers are found in /proc")
def test_under_torchrun_every_rank_stops_on_divergence_with_exit_3(corpus_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "charlm", "train", str(corpus_file), "--out", str(tmp_path / "run"),
                           "--max-steps", "40", *tiny_flags(device="cpu"), "--no-preview", "--quiet",
                           "--lr", "1000"], capture_output=True, text=True, env=subprocess_env(), timeout=180)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("charlm:", "charlm["))]
    assert len(ours) == 1 and ours[0].startswith("charlm: error: training diverged at step "), proc.stderr
    assert "[rank" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr
    assert re.search(r"exitcode\s*:\s*3\b", proc.stderr) and not re.search(r"exitcode\s*:\s*1\b", proc.stderr)
    assert not list((tmp_path / "run").glob("*.pt"))


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of `size` bytes (skips where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="mounting a tmpfs needs root on Linux")
def test_a_real_full_disk_loses_nothing_that_was_saved(trained_run, small_disk, runner, tmp_path):
    corpus, size = trained_run.parent / "speech.txt", (trained_run / "latest.pt").stat().st_size
    # Room for the first evaluation's three checkpoints, not for a fourth: the second save fails.
    disk = small_disk(int(3.4 * size))
    run = disk / "run"
    res = runner.invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "30", *TINY])
    assert res.exit_code == 2, res.output
    line = the_line(res.stderr)
    assert "No space left on device" in line and "free in" in line
    assert line.endswith(f"training stopped at step 20; {run / 'latest.pt'} (step 10) is intact: free some "
                         f"space, then `charlm resume {run / 'latest.pt'}`")
    run_files_are_whole(run)
    assert checkpoint.load(run / "latest.pt").progress.step == 10 and metric_steps(run) == [10]
    # With room again (here: moved to a bigger disk), it resumes exactly.
    moved = Path(shutil.copytree(run, tmp_path / "moved"))
    res = runner.invoke(app, ["resume", str(moved / "latest.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    alone = tmp_path / "alone"
    session.fit(tiny_config(max_steps=30), [str(corpus)], alone)
    models_equal(moved / "latest.pt", alone / "latest.pt")

    # A disk too small for even the first checkpoint: said plainly.
    run = small_disk(int(0.8 * size)) / "run"
    res = runner.invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "30", *TINY])
    assert res.exit_code == 2
    assert the_line(res.stderr).endswith("training stopped at step 10; no checkpoint of this run was saved")
    run_files_are_whole(run)
    assert not list(run.glob("*.pt"))

    # Room for the first save's best.pt only: that is the file to resume from.
    run = small_disk(int(1.5 * size)) / "run"
    res = runner.invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "30", *TINY])
    assert res.exit_code == 2
    assert the_line(res.stderr).endswith(f"training stopped at step 10; only {run / 'best.pt'} (step 10) was "
                                         f"saved: free some space, then `charlm resume {run / 'best.pt'}`")
    run_files_are_whole(run)
    assert [p.name for p in run.glob("*.pt")] == ["best.pt"]


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="mounting a tmpfs needs root on Linux")
def test_a_full_disk_under_the_corpus_cache(small_disk, tmp_path, monkeypatch, runner):
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")  # 138 kB of ids for a 64 kB disk
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(small_disk(64 * 1024)))
    res = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "run"), *TINY])
    line = one_line_error(res, "corpus cache", "No space left on device", "the ids need about 138.0 kB",
                          "CHARLM_CACHE_DIR")
    assert "free there" in line
    assert os.listdir(os.environ["CHARLM_CACHE_DIR"]) == []  # nothing half-written left
    assert not (tmp_path / "run").exists()


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_checkpoint(name: str):
    """The atomic write, failing for checkpoint `name` of step 20."""
    write = fs.write_atomic

    def fake(path, data):
        step = torch.load(io.BytesIO(data), weights_only=True)["progress"]["step"] if path.suffix == ".pt" else 0
        if step == 20 and (path.name == name or (name == "step" and path.name.startswith("step-"))):
            enospc()
        write(path, data)

    return fake


def fail_file(name: str):
    """The atomic write, failing for every file called `name`."""
    write = fs.write_atomic
    return lambda path, data: enospc() if Path(path).name == name else write(path, data)


@pytest.mark.parametrize("site", ["best.pt", "step", "latest.pt", "metrics", "config"])
def test_enospc_at_each_write_site_is_one_line_and_keeps_what_was_saved(site, runner, corpus_file, tmp_path,
                                                                        monkeypatch):
    run = tmp_path / "run"
    if site == "metrics":
        real_write = os.write

        def half_a_line(fd, data):  # a line cut short by the full disk, then the error
            if bytes(data).startswith(b'{"step": 20,'):
                real_write(fd, bytes(data)[:7])
                enospc()
            return real_write(fd, data)

        monkeypatch.setattr(rundir.os, "write", half_a_line)
    elif site == "config":
        monkeypatch.setattr(fs, "write_atomic", fail_file("config.toml"))
    else:
        monkeypatch.setattr(fs, "write_atomic", fail_checkpoint(site))
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "30", *TINY])
    monkeypatch.undo()
    failed = {"metrics": "metrics.jsonl", "config": "config.toml", "step": "step-0000020.pt"}.get(site, site)
    line = one_line_error(res, f"could not write {run / failed} (", "No space left on device")
    if site == "config":  # the first write of a run: its folder, made for it, is gone again
        assert line.endswith("nothing of this run was trained or saved") and not run.exists()
        return
    run_files_are_whole(run)
    if site == "metrics":
        assert line.endswith(f"whose checkpoint was saved: free some space, then `charlm resume {run / 'latest.pt'}`")
        assert metric_steps(run) == [10]  # the half line was taken back
    else:
        assert line.endswith(f"training stopped at step 20; {run / 'latest.pt'} (step 10) is intact: "
                             f"free some space, then `charlm resume {run / 'latest.pt'}`")
    latest = checkpoint.load(run / "latest.pt").progress.step
    assert latest == (20 if site == "metrics" else 10)
    # With room again the run resumes, and ends exactly as a run that never met the full disk.
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    # A metrics line lost to the full disk stays lost (its checkpoint was saved; the line is
    # written after it, so a failure loses a line, never invents one).
    assert metric_steps(run) == ([10, 30] if site == "metrics" else [10, 20, 30])
    alone = tmp_path / "alone"
    session.fit(tiny_config(max_steps=30), [str(corpus_file)], alone)
    models_equal(run / "latest.pt", alone / "latest.pt")


def test_enospc_writing_the_plot_only_warns(runner, corpus_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(fs, "write_atomic", fail_file("loss.png"))
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "10",
                              *tiny_flags(), "--no-preview"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "warning" in line]
    assert warned == [f"charlm: warning: could not draw the loss plot: could not write {run / 'loss.png'} ("
                      + warned[0].split(" (", 1)[1]] and "No space left on device" in warned[0]
    assert not (run / "loss.png").exists() and checkpoint.load(run / "latest.pt").progress.step == 10
    one_line_error(runner.invoke(app, ["plot", str(run)]), f"could not write {run / 'loss.png'}")


def test_enospc_in_the_corpus_cache_leaves_no_entry(runner, corpus_file, tmp_path, monkeypatch):
    folder = Path(os.environ["CHARLM_CACHE_DIR"])
    before = set(os.listdir(folder))
    other = tmp_path / "other.txt"
    other.write_text(TEXT + "a new text, a new cache entry\n", encoding="utf-8")
    monkeypatch.setattr(cache, "write_atomic", lambda path, data: enospc())
    one_line_error(runner.invoke(app, ["train", str(other), "--out", str(tmp_path / "run"), *TINY]),
                   "corpus cache", "cannot write: No space left on device", "the ids need about")
    assert set(os.listdir(folder)) == before
    monkeypatch.undo()
    assert runner.invoke(app, ["train", str(other), "--out", str(tmp_path / "run"), "--max-steps", "2",
                               *TINY]).exit_code == 0


def test_a_short_disk_is_warned_about_at_start(runner, corpus_file, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "run"), "--max-steps", "2",
                              *tiny_flags(), "--no-preview"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"charlm: warning: {tmp_path / 'run'}: 100.0 kB free, but "
                                                     "this run's checkpoints need about ")
    assert "(7 files of " in warned[0] and "--keep 3" in warned[0]


def test_the_checkpoint_size_estimate_is_close_above_the_real_size(trained_run, tmp_path, corpus_file):
    ck = checkpoint.load(trained_run / "latest.pt")
    params = sum(t.numel() for t in ck.model.values())
    hidden = sum(t.numel() for t in ck.hidden)
    real = (trained_run / "latest.pt").stat().st_size
    assert real <= checkpoint.checkpoint_bytes(params, hidden) <= real + checkpoint.CHECKPOINT_MARGIN
    assert rundir.files_at_peak(3) == 7 and rundir.files_at_peak(0) == 3
    # The memory check counts the same file, serialized twice in memory while it is saved.
    from charlm.model.size import state_values

    cfg = ck.config
    assert state_values(cfg.model, cfg.train.streams(ck.trained_on.world_size)) == hidden
    assert memory.estimate(cfg, len(ck.vocab), "fp32").checkpoint == 2 * checkpoint.checkpoint_bytes(params, hidden)


# --- memory ---------------------------------------------------------------------------------


IMPOSSIBLE = ["--batch-size", "100000", "--hidden-size", "4096"]


@pytest.mark.parametrize("planner", [False, True])
def test_an_impossible_batch_is_refused_before_any_allocation(runner, corpus_file, tmp_path, monkeypatch, planner):
    def allocates(*args, **kwargs):
        raise AssertionError("a model was built (the trainer's, or one the planner's probe times)")

    monkeypatch.setattr(session, "Trainer", allocates)
    monkeypatch.setattr(probe, "step_seconds", allocates)
    flags = [*tiny_flags(), "--no-preview", "--quiet"] if planner else TINY
    line = one_line_error(runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "run"),
                                              *flags, *IMPOSSIBLE]),
                          "charlm: error: this run needs about ", "GB of memory (a batch of 100,000 x 16 characters",
                          "is available in RAM; lower --batch-size (now 100000), --seq-len (now 16) or "
                          "--hidden-size (now 4096)")
    assert " TB " in line or " GB " in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not LINUX, reason="ru_maxrss is in kB on Linux")
def test_an_impossible_batch_is_refused_by_the_command_with_little_memory(corpus_file, tmp_path):
    proc = subprocess.Popen([*charlm_cmd(), "train", str(corpus_file), "--out", str(tmp_path / "run"),
                             *TINY, *IMPOSSIBLE], stderr=subprocess.PIPE, text=True, env=subprocess_env())
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert os.waitstatus_to_exitcode(status) == 2, err
    assert "lower --batch-size (now 100000)" in the_line(err)
    # Before: the allocator's RuntimeError traceback. Now: nothing was allocated for the plan
    # (about a terabyte); the process peaked at what importing PyTorch takes.
    assert usage.ru_maxrss * 1024 < 1.5e9


def test_a_resume_that_cannot_fit_here_says_the_settings_are_fixed(runner, run_copy, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: 10_000_000)
    line = one_line_error(runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--max-steps", "40"]),
                          "is available in RAM", "are fixed, so resume it where more memory is free")
    assert "10.0 MB" in line


@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_an_out_of_memory_error_during_training_is_one_line(error, runner, corpus_file, tmp_path, monkeypatch):
    def step(self, budget, started):
        raise error

    monkeypatch.setattr(train.Trainer, "step", step)
    one_line_error(runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "run"), *TINY]),
                   "charlm: error: out of memory (RAM): this run needs about ",
                   "lower --batch-size (now 4), --seq-len (now 16) or --hidden-size (now 32)")


def test_other_runtime_errors_are_not_taken_for_out_of_memory(corpus_file, tmp_path, monkeypatch):
    def step(self, budget, started):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train.Trainer, "step", step)
    with pytest.raises(RuntimeError, match="a bug"):
        session.fit(tiny_config(max_steps=5), [str(corpus_file)], tmp_path / "run")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_parameter_count_is_the_models_and_every_estimate_uses_it(cell):
    from charlm.training.planner import Shape

    cfg = tiny_config(cell=cell, num_layers=3, hidden_size=24, embedding_size=10)
    built = CharRNN(cfg.model, 41).num_parameters()
    assert parameter_count(cfg.model, 41) == built
    assert Shape.of(cfg).params(41) == built  # the planner's
    assert memory.estimate(cfg, 41, "fp32").parameters == built  # the memory check's


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/statm")
def test_the_memory_estimate_against_the_measured_peak_of_real_steps(tmp_path):
    """One shape here (benchmarks/memory_estimate.py measures many): the estimate is above
    the peak RSS growth of two real training steps, and not by more than half."""
    shape = {"hidden_size": 64, "num_layers": 2, "embedding_size": 16, "batch_size": 512, "seq_len": 128,
             "precision": "fp32", "vocab": 96}
    # The benchmark's own measuring process: two real steps and a save's serialization.
    measure = runpy.run_path(str(ROOT / "benchmarks" / "memory_estimate.py"))["CHILD"]
    proc = subprocess.run([sys.executable, "-c", measure, json.dumps(shape), str(tmp_path)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    measured, estimate = got["measured_bytes"], got["estimate_bytes"]
    assert measured > 200e6  # large enough that the allocator's noise does not matter
    assert measured <= estimate <= 1.5 * measured, got


# --- a corpus whose files are gone -------------------------------------------------------------


def test_eval_and_resume_use_the_cache_when_the_corpus_files_are_gone(runner, tmp_path):
    corpus = tmp_path / "gone.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "20", *TINY]).exit_code == 0
    twin = Path(shutil.copytree(run, tmp_path / "twin"))
    with_files = runner.invoke(app, ["eval", str(run / "latest.pt"), "--json"])
    corpus.unlink()
    res = runner.invoke(app, ["eval", str(run / "latest.pt"), "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [f"charlm: warning: {corpus}: no such file or folder; using the run's corpus "
                                       f"ids from the cache ({res.stderr.split('(', 1)[1].split(')')[0]})"]
    assert json.loads(res.stdout)["bpc"] == json.loads(with_files.stdout)["bpc"]
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--max-steps", "30", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "no such file or folder; using the run's corpus ids from the cache" in res.stderr
    corpus.write_text(TEXT, encoding="utf-8")  # the twin resumes with its files: the same run
    session.resume(twin / "latest.pt", {"max_steps": 30})
    models_equal(run / "latest.pt", twin / "latest.pt")


def test_eval_without_the_corpus_or_its_cache_is_one_line(runner, tmp_path):
    corpus = tmp_path / "gone.txt"
    corpus.write_text(TEXT + "unique to this test\n", encoding="utf-8")
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(run), "--max-steps", "2", *TINY]).exit_code == 0
    sha = checkpoint.load(run / "latest.pt").corpus["sha256"]
    corpus.unlink()
    for p in Path(os.environ["CHARLM_CACHE_DIR"]).glob(sha + ".*"):
        p.unlink()
    one_line_error(runner.invoke(app, ["eval", str(run / "latest.pt")]), "gone.txt")


def test_errors_family():
    # Diverged is not bad input: the CLI gives it its own exit code (3), not 2.
    assert not issubclass(Diverged, CharLMError)
