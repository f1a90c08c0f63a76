"""Shared fixtures: a small text corpus, the one tiny model (as flags and as a config), one
trained run, and a CLI runner.

Everything runs on the CPU in seconds and never touches the network.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.config.options import flag
from charlm.config.run import RunConfig, build_config
from charlm.data.cache import encode_corpus

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

ROOT = Path(__file__).resolve().parents[1]
# The real NLTK State of the Union corpus on the development machines (absent in a user's clone).
SHARED_NLTK = ROOT.parent / "shared" / "data" / "nltk_data"

# The tiny but learnable model every test trains: a few hundred steps per second on 2 cores.
TINY_SETTINGS: dict[str, Any] = dict(hidden_size=32, num_layers=1, embedding_size=16, seq_len=16,
                                     batch_size=4, eval_interval=10)


def tiny_flags(**settings: Any) -> list[str]:
    """... as command-line flags; `settings` override or add any setting."""
    return [arg for key, value in {**TINY_SETTINGS, **settings}.items() for arg in (flag(key), str(value))]


# Quiet, no previews, and exactly these settings (no planner: tests of the planner say so).
TINY = [*tiny_flags(), "--no-planner", "--no-preview", "--quiet"]
CHARS_PER_STEP = TINY_SETTINGS["batch_size"] * TINY_SETTINGS["seq_len"]
RUN_STEPS = 30  # the shared run: evaluations at steps 10, 20 and 30


def alone_in_shared_engine(model: Any, vocab: Any, opts: Any, device: Any = "cpu") -> list[str]:
    """The rows' text of one group of `opts` alone in a shared engine (as one request with no
    other beside it in `charlm serve`)."""
    from charlm.generation.batch import BatchSampler

    engine = BatchSampler(model, vocab, device, shared=True)
    group = engine.add(opts)
    rows: list[list[str]] = [[] for _ in range(opts.num_samples)]
    while engine.groups:
        for g, chars in engine.step():
            assert g is group
            for row, ch in enumerate(chars):
                rows[row].append(ch)
    return ["".join(r) for r in rows]


def served_alone(lm: Any, **options: Any) -> str | list[str]:
    """What `charlm serve` writes for one request of these options with no other request
    beside it: its shared engine alone (`lm.sample` is the unshared engine, whose text can
    differ where a rounding difference tips a near tie)."""
    from charlm.config.sampling import SampleOptions

    opts = SampleOptions(**options)
    texts = alone_in_shared_engine(lm.model, lm.vocab, opts, lm.device)
    return texts[0] if opts.num_samples == 1 else texts


def read_corpus(specs: list[str] | None, encoding: str | None = None) -> SimpleNamespace:
    """A corpus read the one way charlm reads corpora (encoded into the cache), with its
    text decoded again: .text, .specs, .documents, .sha256."""
    enc = encode_corpus(specs, encoding)
    return SimpleNamespace(text=enc.vocab.decode(enc.ids.tolist()), specs=enc.desc["specs"],
                           documents=enc.desc["documents"], sha256=enc.desc["sha256"])


def tiny_config(**settings: Any) -> RunConfig:
    """... and as a config (no previews, on the CPU); `settings` override any field."""
    return build_config(None, {**TINY_SETTINGS, "preview_length": 0, "device": "cpu", **settings})

TEXT = (
    "Mr. Speaker, Mr. President, Members of the Congress, my fellow Americans:\n"
    "We meet tonight in a time of great change. The state of our Union is strong.\n"
    "Our economy is growing, our schools are improving, and our people are at work.\n"
) * 30


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test models run fastest on one thread, and two busy-waiting OpenMP pools (pytest
    plus a subprocess, which gets OMP_NUM_THREADS=1) on 2 cores can slow each other down by
    orders of magnitude; one thread also makes in-process float reductions match the
    subprocesses' bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def _corpus_cache(tmp_path_factory: pytest.TempPathFactory):
    """Encoded corpora go to a cache folder of this test session, never to ~/.cache (the
    variable is inherited by the CLI subprocesses too)."""
    old = os.environ.get("CHARLM_CACHE_DIR")
    os.environ["CHARLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("corpus-cache"))
    yield
    if old is None:
        os.environ.pop("CHARLM_CACHE_DIR", None)
    else:
        os.environ["CHARLM_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _speed_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's planner measures its own speeds (or is handed fake ones): a cache of
    this test alone (charlm.training.probe)."""
    monkeypatch.setenv("CHARLM_SPEEDS", str(tmp_path_factory.mktemp("speeds") / "speeds.json"))


@pytest.fixture(autouse=True)
def _restore_rng():
    """Training seeds the global RNGs; put them back so other tests see what they expect."""
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    yield
    torch.set_rng_state(torch_rng)
    random.setstate(py_rng)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: a missing NLTK corpus fails at once, as when offline."""
    monkeypatch.setenv("CHARLM_NO_DOWNLOAD", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "speech.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def charlm_cmd() -> list[str]:
    """The installed console script, or `python -m charlm` where it is not on PATH."""
    script = Path(sys.executable).with_name("charlm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "charlm"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, CHARLM_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1", **ONE_THREAD)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, _one_thread, _corpus_cache) -> Path:
    """One tiny run of RUN_STEPS steps (TINY flags) on TEXT, shared by every test that only
    reads it; a test that changes it works on `run_copy`."""
    base = tmp_path_factory.mktemp("shared-run")
    corpus = base / "speech.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    rng = torch.get_rng_state()
    res = CliRunner().invoke(app, ["train", str(corpus), "--out", str(base / "run"), "--max-steps", str(RUN_STEPS),
                                   *TINY])
    torch.set_rng_state(rng)
    assert res.exit_code == 0, res.output
    return base / "run"


@pytest.fixture(scope="session")
def ckpt(trained_run: Path) -> Path:
    """The shared tiny run's checkpoint (RUN_STEPS steps): it has learned something, yet many
    characters are still plausible at each step (the top-k / top-p checks need that)."""
    return trained_run / "latest.pt"


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> charlm.CharLM:
    """The shared run's model, loaded once per module."""
    return charlm.load(ckpt)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared run, for tests that change it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def one_line_error(res: Any, *needles: str) -> str:
    """A CliRunner result that is a refusal: exit 2, exactly one line on stderr naming every
    one of `needles`, no traceback, nothing on stdout. Returns the line."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not an escaped exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and mtime: a refused command must leave all of them alone."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}
