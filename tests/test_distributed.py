"""Training in several processes with `torchrun` (gloo on the CPU), as a user launches it.

Checks that the ranks' weights stay identical, that rank 0 alone writes one set of files,
that the result matches one process training the same streams, that a checkpoint resumes
in one process and, exactly, in the same number of processes, and that SIGTERM sent to one
rank stops them all with one saved checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXT, charlm_cmd, subprocess_env, tiny_flags

from charlm.storage import checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers in /proc")

MODEL = [*tiny_flags(num_layers=2, device="cpu", precision="fp32"), "--no-planner", "--no-preview"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "charlm", *args]


def run(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "speech.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def five_steps(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process run of 5 steps (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("five") / "run"
    run([*charlm_cmd(), "train", str(corpus), "--out", str(out), "--max-steps", "5", *MODEL, "--quiet"])
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path).model


def test_two_processes_train_one_model_and_it_resumes_in_one(corpus: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    proc = run(torchrun("train", str(corpus), "--out", str(out), "--max-steps", "20",
                        "--eval-interval", "10", *MODEL))
    ck = checkpoint.load(out / "latest.pt")
    assert ck.progress.step == 20 and ck.trained_on.world_size == 2
    # Every rank hashed its own weights when the checkpoint was saved: all the same.
    digests = [r.weights_sha256 for r in ck.ranks]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Rank 0 alone wrote: one set of files, one metrics line per evaluation, one report.
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        "README.md", "best.pt", "config.toml", "latest.pt", "metrics.jsonl", "report.html", "step-0000010.pt",
        "step-0000020.pt"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert proc.stderr.count("charlm: training:") == 1 and "x 2 processes" in proc.stderr
    assert proc.stderr.count("charlm: finished") == 1
    # 2 ranks x 4 streams: the hidden state of all 8 streams is in the checkpoint.
    assert [tuple(t.shape) for t in ck.hidden] == [(2, 8, 32), (2, 8, 32)]

    # DDP averages the two ranks' gradients: the same as one process training all 8 streams.
    single = tmp_path / "single"
    flags = list(MODEL)
    flags[flags.index("--batch-size") + 1] = "8"
    run([*charlm_cmd(), "train", str(corpus), "--out", str(single), "--max-steps", "20",
         "--eval-interval", "10", *flags, "--quiet"])
    a, b = weights(out / "latest.pt"), weights(single / "latest.pt")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-4), key

    # A two-process checkpoint samples, evaluates and describes itself in one process ...
    text = run([*charlm_cmd(), "sample", "-c", str(out / "latest.pt"), "-n", "40", "--seed", "1"]).stdout
    assert len(text) >= 40
    assert "bpc" in run([*charlm_cmd(), "eval", str(out / "latest.pt")]).stdout
    assert "cpu (fp32) x 2 processes" in run([*charlm_cmd(), "info", str(out / "latest.pt")]).stdout
    # ... and one process continues the run (all 8 streams).
    res = run([*charlm_cmd(), "resume", str(out / "latest.pt"), "--max-steps", "30"])
    assert "continuing in 1 with --batch-size 8" in res.stderr
    after = checkpoint.load(out / "latest.pt")
    assert after.progress.step == 30 and after.trained_on.world_size == 1


def _workers(parent: int) -> list[int]:
    """PIDs of torchrun's charlm worker processes (its direct children running charlm)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"charlm" in cmd:
            found.append(int(entry.name))
    return sorted(found)


def test_sigterm_to_one_rank_stops_all_and_resumes_exactly(corpus: Path, tmp_path: Path):
    total = ["--max-steps", "800", "--eval-interval", "40", "--dropout", "0.3"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun("train", str(corpus), "--out", str(out), *MODEL, *total),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)  # one rank only (rank order is not known; either works)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = checkpoint.load(out / "latest.pt").progress.step
    assert 40 <= step < 800, stderr[-2000:]
    assert stderr.count(f"SIGTERM at step {step}: saved {out / 'latest.pt'}") == 1, stderr[-2000:]
    # torchrun itself exits 1 when a worker fails, and reports each worker's own exit code.
    assert proc.returncode == 1 and re.search(r"exitcode\s*:\s*143\b", stderr), stderr[-2000:]
    assert not list(out.glob("*.tmp*"))

    # The same two processes continue it to the end: bit-identical to an uninterrupted run.
    run(torchrun("resume", str(out / "latest.pt"), "--quiet"))
    full = tmp_path / "full"
    run(torchrun("train", str(corpus), "--out", str(full), *MODEL, *total, "--quiet"))
    a, b = checkpoint.load(out / "latest.pt"), checkpoint.load(full / "latest.pt")
    assert a.progress.step == b.progress.step == 800
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert [r.weights_sha256 for r in a.ranks] == [r.weights_sha256 for r in b.ranks]
    strip = [{k: v for k, v in json.loads(x).items() if k != "elapsed"}
             for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in json.loads(x).items() if k != "elapsed"}
            for x in (out / "metrics.jsonl").read_text().splitlines()] == strip
    shutil.rmtree(full)


def test_resume_in_a_process_count_that_cannot_share_the_streams(five_steps: Path, tmp_path: Path):
    from charlm.errors import CharLMError
    from charlm.training.resuming import resume_settings

    out = shutil.copytree(five_steps, tmp_path / "run")
    ck = checkpoint.load(out / "latest.pt")
    # As if torchrun had started 3 processes: 4 streams cannot be split 3 ways ...
    with pytest.raises(CharLMError, match=r"4 streams \(4 per process x 1\).*3 processes"):
        resume_settings(ck, "latest.pt", {"max_steps": 10}, world_size=3)
    # ... but 2 can: 2 streams each.
    plan = resume_settings(ck, "latest.pt", {"max_steps": 10}, world_size=2)
    assert plan.cfg.train.batch_size == 2 and "continuing in 2 with --batch-size 2" in plan.notes[0]


@pytest.mark.parametrize("case", ["missing corpus", "folder holds a run", "resume behind its step"])
def test_bad_input_in_two_processes_is_one_line_and_exit_2(case: str, corpus: Path, five_steps: Path,
                                                          tmp_path: Path):
    # Only one rank finds the problem (rank 0 encodes the corpus and checks --out); the other
    # must stop with it instead of dying in its next collective with a gloo traceback.
    out = tmp_path / "run"
    if case == "missing corpus":
        args = ["train", str(tmp_path / "nosuch.txt"), "--out", str(out), *MODEL]
        expected = "nosuch.txt: no such file or folder"
    else:
        shutil.copytree(five_steps, out)
        if case == "folder holds a run":
            args = ["train", str(corpus), "--out", str(out), "--max-steps", "5", *MODEL]
            expected = "already holds a run"
        else:
            args = ["resume", str(out / "latest.pt"), "--max-steps", "3"]
            expected = "the run is already at step 5"
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    proc = subprocess.run(torchrun(*args), capture_output=True, text=True, env=subprocess_env(), timeout=180)
    assert proc.returncode == 1  # torchrun's own code; the worker's (2) is checked below
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("charlm:", "charlm["))]
    assert len(ours) == 1 and ours[0].startswith("charlm: error: ") and expected in ours[0], proc.stderr
    assert "[rank" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr
    # torchrun's own report: the failing worker exited 2 (never 1, a bug).
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr) and not re.search(r"exitcode\s*:\s*1\b", proc.stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before if before else not out.exists()


def test_ctrl_c_before_training_is_reported_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    # Ctrl-C while the corpus is encoded reaches every torchrun process: rank 0 alone says so.
    import typer

    from charlm.cli import handle_errors

    @handle_errors
    def encoding() -> None:
        raise KeyboardInterrupt

    for rank, said in (("0", "charlm: interrupted\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(typer.Exit) as exc:
            encoding()
        assert exc.value.exit_code == 130 and capsys.readouterr().err == said
