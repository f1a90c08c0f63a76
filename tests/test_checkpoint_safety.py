"""Safe checkpoints: atomic writes survive SIGKILL, unsafe / broken / foreign / newer files and
files whose weights are NaN or infinite are refused by every command with one line (and never
modified), retention keeps latest, best and the last K step files, an existing run is never
overwritten without --force, and a checkpoint written on CUDA loads, resumes and samples on
the CPU.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_STEPS, TINY, charlm_cmd, snapshot, subprocess_env, tiny_config

from charlm import fs
from charlm.cli import app
from charlm.errors import CharLMError
from charlm.storage import checkpoint
from charlm.storage.rundir import RunDir
from charlm.training import session


def raw(path: Path) -> dict:
    """A checkpoint file's plain dict, as torch.load(weights_only=True) gives it."""
    return torch.load(path, weights_only=True)


def step_of(path: Path) -> int:
    return checkpoint.load(path).progress.step


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(fs.TMP_PREFIX)]


# --- unsafe, broken, foreign and too-new files -------------------------------------------------


class OpenPayload:
    """Unpickling this calls open(path, "w"): a file appears if anything unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class TouchPayload(OpenPayload):
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class SystemPayload(OpenPayload):
    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


PAYLOADS = {"pickle-open": OpenPayload, "pickle-touch": TouchPayload, "pickle-system": SystemPayload}


def make_bad(kind: str, folder: Path, good: Path, marker: Path) -> Path:
    folder.mkdir()
    path = folder / "latest.pt"
    data = good.read_bytes()
    if kind == "pickle-open":  # a bare payload
        torch.save({"weights": torch.ones(2), "x": OpenPayload(marker)}, path)
    elif kind in PAYLOADS:  # a real charlm checkpoint carrying a payload
        ck = raw(good)
        ck["extra"] = PAYLOADS[kind](marker)
        torch.save(ck, path)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(5).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":  # somebody else's PyTorch file
        torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    elif kind in ("nan-weights", "inf-weights"):  # saved by a run that diverged (before charlm refused to)
        ck = raw(good)
        ck["model"]["head.weight"][0, 0] = float("nan") if kind == "nan-weights" else float("inf")
        torch.save(checkpoint.seal(ck), path)  # written so, checksums and all: not damage
    elif kind in ("newer", "version0"):
        ck = raw(good)
        ck["version"] = checkpoint.VERSION + 1 if kind == "newer" else 0
        torch.save(ck, path)
    else:
        raise AssertionError(kind)
    return path


EXPECTED = {
    "pickle-open": "pickled Python objects", "pickle-touch": "pickled Python objects",
    "pickle-system": "pickled Python objects", "truncated": "truncated", "random": "not a checkpoint",
    "empty": "corrupt or truncated", "foreign": "not a charlm checkpoint", "newer": "newer charlm",
    "version0": "invalid format version", "nan-weights": "weights are not finite numbers (NaN or infinite, in "
    "head.weight)", "inf-weights": "saved after training diverged",
}
COMMANDS = {
    "info": lambda p: ["info", str(p)],
    "sample": lambda p: ["sample", "-c", str(p), "--length", "5"],
    "resume": lambda p: ["resume", str(p), "--max-steps", "100"],
    "eval": lambda p: ["eval", str(p), "--json"],
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payloads_are_real(kind, trained_run, tmp_path):
    """Control: each payload does create its file when unpickled the unsafe way."""
    marker = tmp_path / "pwned"
    path = make_bad(kind, tmp_path / "bad", trained_run / "latest.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_checkpoint_is_refused_with_one_line_and_left_alone(runner, trained_run, tmp_path, kind, command):
    marker = tmp_path / "pwned"
    path = make_bad(kind, tmp_path / "bad", trained_run / "latest.pt", marker)
    before = snapshot(path.parent)
    res = runner.invoke(app, COMMANDS[command](path))
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("charlm: error: ") and str(path) in lines[0]
    assert EXPECTED[kind] in lines[0]
    assert res.stdout == ""
    assert not marker.exists()
    assert snapshot(path.parent) == before  # not modified, not deleted, nothing added


def test_installed_command_refuses_a_pickle_payload(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    path = make_bad("pickle-system", tmp_path / "bad", trained_run / "latest.pt", marker)
    proc = subprocess.run([*charlm_cmd(), "info", str(path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"charlm: error: {path}: refused: it holds pickled Python objects, which charlm never "
        "loads (only tensors and plain values)"]
    assert not marker.exists()


def test_loader_accepts_the_current_version_and_rejects_invalid_ones(trained_run, tmp_path):
    ck = raw(trained_run / "latest.pt")
    assert ck["version"] == checkpoint.VERSION and ck["format"] == checkpoint.FORMAT
    for bad in (0, -1, "1", None):
        ck["version"] = bad
        path = tmp_path / f"v{bad}.pt"
        torch.save(ck, path)
        with pytest.raises(CharLMError, match="invalid format version"):
            checkpoint.load(path)
    ck["version"] = checkpoint.VERSION
    del ck["model"]
    torch.save(checkpoint.seal(ck), tmp_path / "incomplete.pt")
    with pytest.raises(CharLMError, match="incomplete.*model"):
        checkpoint.load(tmp_path / "incomplete.pt")
    with pytest.raises(CharLMError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(CharLMError, match="folder"):
        checkpoint.load(tmp_path)


# --- SIGKILL at any moment leaves readable checkpoints ----------------------------------------


def _writer_loop(targets: list[Path], versions: list[bytes]) -> None:
    i = 0
    while True:
        for path in targets:
            fs.write_atomic(path, versions[i % len(versions)])
        i += 1


def test_sigkill_during_atomic_writes_never_leaves_a_broken_checkpoint(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    old = (run / "latest.pt").read_bytes()
    ck = raw(run / "latest.pt")
    ck["pad"] = torch.randn(700_000)  # ~2.8 MB: a write takes long enough to be cut in half
    buf = io.BytesIO()
    torch.save(checkpoint.seal(ck), buf)
    new = buf.getvalue()
    versions = [new, old]
    targets = [run / "latest.pt", run / "best.pt"]
    best_before = (run / "best.pt").read_bytes()
    rng = random.Random(20240611)
    kills = leftovers = 0
    while kills < 20 or (leftovers == 0 and kills < 60):
        pid = os.fork()  # the child only writes files: no torch work after the fork
        if pid == 0:
            try:
                _writer_loop(targets, versions)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # it was still writing
        kills += 1
        for path in targets:
            assert path.read_bytes() in (old, new, best_before), f"{path.name} is neither version"
            assert step_of(path) == RUN_STEPS
        leftovers += bool(tmp_files(run))
    assert leftovers > 0, "no kill landed mid-write; the test proved nothing"

    # The next start in the folder (a resume) removes the dead writers' temporary files.
    assert tmp_files(run)
    result = session.resume(run / "latest.pt", {"max_steps": RUN_STEPS + 2})
    assert result.step == RUN_STEPS + 2
    assert tmp_files(run) == []
    assert step_of(run / "latest.pt") == RUN_STEPS + 2


def _kill_when_writing(cmd: list[str], run: Path, rng: random.Random) -> None:
    """Start `cmd`, wait until it has (re)written latest.pt, SIGKILL it at a random moment."""
    latest = run / "latest.pt"
    before = latest.stat().st_mtime_ns if latest.exists() else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while not (latest.exists() and latest.stat().st_mtime_ns != before):
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_of_a_real_training_run_leaves_loadable_checkpoints(trained_run, tmp_path, runner):
    corpus = trained_run.parent / "speech.txt"
    run = tmp_path / "run"
    rng = random.Random(7)
    flags = [*TINY, "--eval-interval", "1", "--max-steps", "5000"]  # a checkpoint every step
    _kill_when_writing([*charlm_cmd(), "train", str(corpus), "--out", str(run), *flags], run, rng)
    _kill_when_writing([*charlm_cmd(), "resume", str(run / "latest.pt"), "--quiet"], run, rng)
    for path in [run / "latest.pt", run / "best.pt", *RunDir(run).step_files()]:
        assert 0 < step_of(path) < 5000
    step = step_of(run / "latest.pt")
    (run / f"{fs.TMP_PREFIX}99999-latest.pt").write_bytes(b"half a checkpoint")
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--max-steps", str(step + 3), "--quiet"])
    assert res.exit_code == 0, res.output
    assert tmp_files(run) == []
    assert step_of(run / "latest.pt") == step + 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == step + 3  # no line from a lost future


# --- retention ---------------------------------------------------------------------------------


def test_retention_keeps_latest_best_and_last_k_step_files(runner, corpus_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(out), *TINY,
                              "--eval-interval", "5", "--max-steps", "30"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.pt")) == [
        "best.pt", "latest.pt", "step-0000020.pt", "step-0000025.pt", "step-0000030.pt"]  # --keep 3
    assert (out / "config.toml").exists() and (out / "metrics.jsonl").exists()
    for p in RunDir(out).step_files():
        assert step_of(p) == int(p.stem.split("-")[1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda r: r["val_bpc"])
    best_ck = checkpoint.load(out / "best.pt").progress
    assert best_ck.step == best["step"] and best_ck.best_val_bpc == best["val_bpc"]

    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "40", "--keep", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "latest.pt", "step-0000040.pt"]

    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "50", "--keep", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "latest.pt"]
    assert step_of(out / "latest.pt") == 50


# --- an existing run is never overwritten by accident -----------------------------------------


@pytest.mark.parametrize("only", [None, "best.pt", "metrics.jsonl", "step-0000010.pt"])
def test_train_refuses_a_folder_holding_a_run(runner, trained_run, corpus_file, tmp_path, only):
    run = copy_run(trained_run, tmp_path / "run")
    if only:  # even one file of a run is enough to refuse
        for p in run.iterdir():
            if p.name != only:
                p.unlink()
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "5", *TINY])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--force" in lines[0]
    assert "charlm resume" in lines[0]
    assert snapshot(run) == before  # byte for byte, mtimes too


def test_train_force_starts_over_but_keeps_other_files(runner, trained_run, corpus_file, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / f"{fs.TMP_PREFIX}4242-best.pt").write_bytes(b"left by a killed writer")
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "5", *TINY, "--force"])
    assert res.exit_code == 0, res.output
    assert (run / "notes.txt").read_text() == "mine"
    assert tmp_files(run) == []
    assert [p.name for p in RunDir(run).step_files()] == ["step-0000005.pt"]  # old step-10/20/30 gone
    assert step_of(run / "latest.pt") == 5
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [5]


# --- a checkpoint written on CUDA works on a CPU-only machine ------------------------------------


@pytest.mark.parametrize("config_device", ["auto", "cuda"])
def test_checkpoint_from_cuda_resumes_and_samples_on_cpu(runner, trained_run, tmp_path, monkeypatch, config_device):
    run = copy_run(trained_run, tmp_path / "run")
    ck = raw(run / "latest.pt")
    ck["trained_on"]["device"], ck["trained_on"]["precision"] = "cuda", "bf16"
    ck["ranks"][0]["rng"]["cuda"] = torch.get_rng_state()  # a CUDA generator state is also a uint8 tensor
    ck["config"]["session"]["device"] = config_device
    # Save every tensor tagged as living on cuda:0, as a GPU run writes them.
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint.seal(ck), run / "latest.pt")
    if not torch.cuda.is_available():  # control: without map_location this file cannot load here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run / "latest.pt", weights_only=True)

    res = runner.invoke(app, ["info", str(run / "latest.pt"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["device_trained"] == "cuda"
    res = runner.invoke(app, ["sample", "-c", str(run / "latest.pt"), "--length", "30", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.rstrip("\n")) == 30
    extra = ["--device", "cpu"] if config_device == "cuda" else []
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--max-steps", str(RUN_STEPS + 5), "--quiet", *extra])
    assert res.exit_code == 0, res.output
    after = checkpoint.load(run / "latest.pt")
    assert after.progress.step == RUN_STEPS + 5 and after.trained_on.device == "cpu"
    assert "cuda" not in after.ranks[0].rng


class Died(BaseException):
    """Stands in for a SIGKILL between two files of one save."""


def test_a_kill_between_the_files_of_one_save_leaves_best_pt_right(trained_run, tmp_path, monkeypatch):
    """An evaluation that improves writes latest.pt, best.pt and a step file. Whichever file a
    kill lands after, the resumed run must end with best.pt holding its best model."""
    corpus = trained_run.parent / "speech.txt"
    run = tmp_path / "run"
    write = fs.write_atomic

    def dies_after_first_file_of_step_20(path, data):
        write(path, data)
        if path.suffix == ".pt" and torch.load(io.BytesIO(data), weights_only=True)["progress"]["step"] == 20:
            raise Died

    monkeypatch.setattr(fs, "write_atomic", dies_after_first_file_of_step_20)
    with pytest.raises(Died):
        session.fit(tiny_config(max_steps=20), [str(corpus)], run)
    monkeypatch.undo()
    if step_of(run / "latest.pt") < 20:
        session.resume(run / "latest.pt")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[1]["val_bpc"] < rows[0]["val_bpc"]
    latest, best = checkpoint.load(run / "latest.pt"), checkpoint.load(run / "best.pt")
    assert latest.progress.step == 20
    assert best.progress.step == 20
    assert best.progress.best_val_bpc == latest.progress.best_val_bpc == rows[1]["val_bpc"]
    for key in latest.model:
        assert torch.equal(best.model[key], latest.model[key])


def test_a_replace_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    """`charlm.fs.atomic_path`, behind every file charlm writes: the target is replaced whole
    or not at all."""
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fs.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(fs.TMP_PREFIX) and tmp.exists()
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    fs.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    with pytest.raises(OSError), fs.atomic_path(tmp_path / "no" / "such" / "folder.bin"):
        raise AssertionError("an unwritable place fails before the block runs")
