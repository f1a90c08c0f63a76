"""Shared fixtures: a small text corpus, tiny model flags, and a CLI runner.

Everything runs on the CPU in seconds and never touches the network.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

ROOT = Path(__file__).resolve().parents[1]
# The real NLTK State of the Union corpus on the development machines (absent in a user's clone).
SHARED_NLTK = ROOT.parent / "shared" / "data" / "nltk_data"

# A tiny but learnable model: trains a few hundred steps per second on 2 CPU cores.
TINY = ["--hidden-size", "32", "--num-layers", "1", "--embedding-size", "16", "--seq-len", "16",
        "--batch-size", "4", "--eval-interval", "10", "--no-preview", "--quiet"]

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
