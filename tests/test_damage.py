"""Damage on purpose: every stored byte is checked before it is used.

Bits flipped in each part of a checkpoint (weights, the weight average, optimizer state,
random-number state, the carried hidden state, metadata), an exponent flipped into a NaN,
truncation at several offsets: each is refused by every reader with one line naming the part
and the newest intact checkpoint beside it, never used and never a traceback; `info
--verify` checks a whole run folder. Where a part lies in the file is found by comparing what
PyTorch itself loads from the damaged copy with the original, not from charlm's own code.
And the crash property: a run killed with SIGKILL and resumed ends where the same run
uninterrupted ends, bit for bit.
"""

from __future__ import annotations

import io
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, charlm_cmd, one_line_error, snapshot
from test_checkpoint_safety import _kill_when_writing

import charlm
from charlm.cli import app
from charlm.errors import CharLMError
from charlm.storage import checkpoint

PARTS = ["weights", "training weights", "optimizer state", "random-number state", "carried hidden state"]
KEY = {"weights": "model", "training weights": "live", "optimizer state": "optimizer",
       "random-number state": "ranks", "carried hidden state": "hidden"}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, trained_run) -> Path:
    """A tiny run with a weight average (so it has every part), 30 steps, a file every 10."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("ema") / "run"
    res = CliRunner().invoke(app, ["train", str(trained_run.parent / "speech.txt"), "--out", str(out),
                                   "--max-steps", "30", "--ema", "0.9", *TINY])
    assert res.exit_code == 0, res.output
    return out


def _entries(data: bytes) -> list[tuple[str, int, int]]:
    """(name, offset of its bytes, size) of each member of a PyTorch zip file (stored, not deflated)."""
    z = zipfile.ZipFile(io.BytesIO(data))
    out = []
    for info in z.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        out.append((info.filename, start, info.file_size))
    return out


def _changed_keys(original: dict, damaged_bytes: bytes) -> set[str]:
    """Which top-level groups PyTorch loads differently from the damaged bytes."""
    other = torch.load(io.BytesIO(damaged_bytes), weights_only=True)

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                                      b.view(-1).view(torch.uint8))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple):
            return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    return {k for k in original if not same(original[k], other[k])}


def damage(path: Path, part: str, bit: int = 0) -> None:
    """Flip bit `bit` of one byte inside `part` of the checkpoint at `path` (in place)."""
    data = path.read_bytes()
    original = torch.load(io.BytesIO(data), weights_only=True)
    for name, start, size in _entries(data):
        if "/data/" not in name or size < 4:
            continue
        bad = bytearray(data)
        bad[start + size // 2 // 4 * 4 + (3 if bit >= 7 else 0)] ^= 1 << (bit % 8)
        if _changed_keys(original, bytes(bad)) == {KEY[part]}:
            path.write_bytes(bytes(bad))
            return
    raise AssertionError(f"no storage of {part} in {path}")


def damage_metadata(path: Path) -> None:
    """Change one hex digit of the corpus's SHA-256 inside the pickle: still a valid file."""
    data = bytearray(path.read_bytes())
    sha = torch.load(path, weights_only=True)["corpus"]["sha256"].encode()
    at = bytes(data).index(sha)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("*.lock")))


@pytest.mark.parametrize("part", [*PARTS, "metadata"])
def test_a_flipped_bit_in_each_part_is_named_and_the_intact_file_beside_it(runner, ema_run, tmp_path, part):
    run = _copy(ema_run, tmp_path)
    target = run / "latest.pt"
    if part == "metadata":
        damage_metadata(target)
    else:
        damage(target, part)
    before = snapshot(run)
    line = one_line_error(runner.invoke(app, ["sample", "--checkpoint", str(target), "--length", "5"]),
                          f"{target}: damaged: its {part} do not match", "failing disk")
    intact = run / "step-0000030.pt"
    assert f"the newest intact checkpoint beside it is {intact} (step 30): charlm resume {intact}" in line
    checkpoint.load(intact)  # and it is intact
    assert snapshot(run) == before  # nothing written, nothing "repaired"


def test_low_bits_of_many_weights_are_caught(runner, ema_run, tmp_path):
    """The damage a sync tool or a bad copy leaves: low-order bits of a thousand weight bytes,
    which loaded, sampled and scored before with no warning."""
    run = _copy(ema_run, tmp_path)
    target = run / "best.pt"
    data = bytearray(target.read_bytes())
    rng = random.Random(3)
    weights = [(s, n) for name, s, n in _entries(bytes(data)) if "/data/" in name and n > 4000]
    for _ in range(1000):
        start, size = rng.choice(weights)
        data[start + rng.randrange(0, size, 4)] ^= 1  # the lowest mantissa bit of a float32
    target.write_bytes(bytes(data))
    with pytest.raises(CharLMError, match="damaged: its"):
        charlm.load(target)


def test_an_exponent_flipped_to_nan_is_damage_not_divergence(runner, ema_run, tmp_path):
    run = _copy(ema_run, tmp_path)
    target = run / "latest.pt"
    damage(target, "weights", bit=30)  # the top exponent bit of a float32: 1e-1 becomes ~1e37 or NaN
    line = one_line_error(runner.invoke(app, ["eval", str(target)]), "damaged: its weights")
    assert "diverged" not in line and "not finite" not in line


@pytest.mark.parametrize("command", ["sample", "eval", "info", "resume", "export", "init-from", "inspect", "report"])
def test_every_reader_refuses_a_damaged_checkpoint(runner, ema_run, tmp_path, command):
    run = _copy(ema_run, tmp_path)
    target = run / "latest.pt"
    damage(target, "optimizer state")
    corpus = ROOT / "tests" / "fixtures" / "v1" / "corpus.txt"
    args = {"sample": ["sample", "--checkpoint", str(target)], "eval": ["eval", str(target)],
            "info": ["info", str(target)], "resume": ["resume", str(target), "--max-steps", "40"],
            "export": ["export", str(target), "--safetensors", str(tmp_path / "m.safetensors")],
            "init-from": ["train", str(corpus), "--init-from", str(target), "--out", str(tmp_path / "ft"),
                          "--max-steps", "5", "--quiet"],
            "inspect": ["inspect", str(target), "--text", "The state", "--html", str(tmp_path / "p.html")],
            "report": ["report", str(run)]}[command]
    one_line_error(runner.invoke(app, args), "damaged: its optimizer state")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "p.html").exists()


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_truncation_anywhere_is_one_line(runner, ema_run, tmp_path, fraction):
    run = _copy(ema_run, tmp_path)
    target = run / "latest.pt"
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    line = one_line_error(runner.invoke(app, ["sample", "--checkpoint", str(target)]), str(target))
    assert "corrupt or truncated" in line or "damaged" in line or "not a checkpoint" in line


def test_info_verify_checks_every_file_of_a_run(runner, ema_run, tmp_path):
    run = _copy(ema_run, tmp_path)
    res = runner.invoke(app, ["info", "--verify", str(run)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == len(list(run.glob("*.pt"))) and all(line.startswith("ok ") for line in lines)
    damage(run / "step-0000020.pt", "random-number state")
    res = runner.invoke(app, ["info", "--verify", str(run)])
    assert res.exit_code == 2
    assert [line.split()[0] for line in res.stdout.splitlines() if not line.startswith(" ")].count("DAMAGED") == 1
    assert "its random-number state do not match" in res.stdout
    count = len(list(run.glob("*.pt")))
    assert res.stderr.strip() == (f"charlm: error: 1 of {count} checkpoints in {run} are damaged or unreadable: "
                                  "step-0000020.pt")


def test_a_file_older_than_checksums_loads_and_says_it_is_not_verified(runner):
    v1 = ROOT / "tests" / "fixtures" / "v1" / "run-v1.pt"
    ck = checkpoint.load(v1)
    assert ck.file_version == 1 and not ck.verified
    res = runner.invoke(app, ["info", str(v1)])
    assert res.exit_code == 0 and "not verified (format 1" in res.stdout
    res = runner.invoke(app, ["info", "--verify", str(v1)])
    assert res.exit_code == 0 and res.stdout.startswith("ok, not verified")


def test_a_newly_written_checkpoint_verifies_and_says_so(runner, ema_run):
    res = runner.invoke(app, ["info", str(ema_run / "latest.pt")])
    assert res.exit_code == 0 and "checksums" in res.stdout and "verified" in res.stdout
    assert charlm.load(ema_run / "latest.pt").checkpoint.verified


def test_sigkill_twice_then_resume_ends_where_the_uninterrupted_run_ends(trained_run, tmp_path, runner):
    corpus = trained_run.parent / "speech.txt"
    flags = [*TINY, "--eval-interval", "5", "--max-steps", "400"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(whole), *flags]).exit_code == 0
    run = tmp_path / "run"
    rng = random.Random(11)
    _kill_when_writing([*charlm_cmd(), "train", str(corpus), "--out", str(run), *flags], run, rng)
    _kill_when_writing([*charlm_cmd(), "resume", str(run / "latest.pt"), "--quiet"], run, rng)
    assert checkpoint.load(run / "latest.pt").progress.step < 400  # it was cut short
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    a, b = checkpoint.load(run / "latest.pt"), checkpoint.load(whole / "latest.pt")
    assert a.progress.step == b.progress.step == 400
    assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden, strict=True))


# --- the corpus cache ------------------------------------------------------------------------------


def _entry(corpus: Path) -> Path:
    from charlm.data.cache import encode_corpus

    return encode_corpus([str(corpus)]).path


@pytest.mark.parametrize("value", ["inside", "outside"])
def test_a_damaged_cache_entry_is_rebuilt_and_training_reads_the_true_text(runner, trained_run, tmp_path,
                                                                           monkeypatch, value):
    """Ids overwritten with another character of the vocabulary (text the user never wrote) or
    with an id outside it (once an IndexError traceback): one warning, the entry rebuilt from
    the sources, and the run the same, bit for bit, as one on an intact cache."""
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "speech.txt"
    shutil.copy(trained_run.parent / "speech.txt", corpus)
    flags = [*TINY, "--max-steps", "20"]
    assert runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "a"), *flags]).exit_code == 0
    entry = _entry(corpus)
    data = bytearray(entry.read_bytes())
    for i in range(100, 600, 7):
        data[i] = (data[i] + 1) % 20 if value == "inside" else 250
    entry.write_bytes(bytes(data))
    res = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "b"), *flags])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "damaged" in line]
    assert len(warned) == 1 and f"corpus cache entry {entry}: damaged" in warned[0] and "rebuilding" in warned[0]
    a, b = checkpoint.load(tmp_path / "a" / "latest.pt"), checkpoint.load(tmp_path / "b" / "latest.pt")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert entry.read_bytes() != bytes(data)  # and the entry is whole again


def test_a_damaged_cache_entry_whose_sources_are_gone_is_one_line_naming_it(runner, trained_run, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "speech.txt"
    shutil.copy(trained_run.parent / "speech.txt", corpus)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(run), *TINY, "--max-steps", "10"]).exit_code == 0
    entry = _entry(corpus)
    corpus.unlink()
    data = bytearray(entry.read_bytes())
    data[-5] = (data[-5] + 1) % 10  # in the held-out part, which eval reads
    entry.write_bytes(bytes(data))
    res = runner.invoke(app, ["eval", str(run / "latest.pt")])
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("charlm: error:")]
    assert len(errors) == 1 and f"corpus cache entry {entry}: damaged" in errors[0] and "cannot be read" in errors[0]
    assert "Traceback" not in res.output


def test_blocks_are_checked_as_they_are_first_read_not_all_at_once(tmp_path):
    from charlm.data.checked import BLOCK_BYTES, CheckedIds, block_crcs

    n = 3 * BLOCK_BYTES + 100
    path = tmp_path / "ids"
    np_ids = torch.randint(0, 50, (n,), dtype=torch.uint8).numpy()
    path.write_bytes(np_ids.tobytes())
    crcs = block_crcs(np_ids)
    data = bytearray(path.read_bytes())
    data[2 * BLOCK_BYTES + 5] ^= 1  # damage block 3 of 4
    path.write_bytes(bytes(data))
    import numpy as np

    ids = CheckedIds.of(np.memmap(path, dtype=np.uint8, mode="r", shape=(n,)), crcs, path)
    assert np.array_equal(np.asarray(ids[10:20]), np_ids[10:20])  # block 1 only
    assert ids._entry.checked.tolist() == [True, False, False, False]
    assert ids[BLOCK_BYTES + 3] == np_ids[BLOCK_BYTES + 3]
    assert int((ids[3 * BLOCK_BYTES:] == np_ids[3 * BLOCK_BYTES:]).sum()) == 100  # comparisons read too
    assert ids._entry.checked.tolist() == [True, True, False, True]
    with pytest.raises(CharLMError, match="block 3 of 4 does not match"):
        ids[np.array([2 * BLOCK_BYTES + 9])]  # a batch's gather from the damaged block
