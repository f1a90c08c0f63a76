"""A checkpoint written in format 1 (the flat layout, before the grouped one) still samples,
evaluates and resumes exactly.

tests/fixtures/v1/ holds a real format-1 checkpoint written by the code of that time (see
its make.py): a 2-layer LSTM with dropout, stopped by a signal at step 150 of 200, and what
that code produced from it (expected.json). The same numbers are expected here on the same
kind of machine; on another CPU, float rounding may differ in the last bits, so losses are
compared to 1e-4 and a control shows that a lost RNG state misses by far more than that.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import charlm
from charlm import fs
from charlm.data.cache import encode_corpus
from charlm.errors import TrainingInterrupted
from charlm.storage import checkpoint
from charlm.training import session
from charlm.training.events import Callbacks

# In a fresh clone the fixture's recorded corpus path is gone and the ids come from the cache,
# with a warning that says so (tested in test_encode.py).
pytestmark = pytest.mark.filterwarnings("ignore::charlm.errors.CharLMWarning")

FIXTURE = ROOT / "tests" / "fixtures" / "v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
LOSS_TOLERANCE = 1e-4


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_step(self, stats):
        self.steps.append([stats.step, stats.bpc])


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the format-1 checkpoint in a run folder of its own. The file names its corpus
    by the absolute path it had when it was made; elsewhere (a fresh clone) that path is gone,
    and charlm finds the ids in the cache under the recorded hash: put them there."""
    encode_corpus([str(FIXTURE / "corpus.txt")])
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE / "run-v1.pt", run / "latest.pt")
    return run / "latest.pt"


def test_every_field_of_format_1_lands_in_its_group(v1: Path):
    old = torch.load(v1, weights_only=True)
    assert old["version"] == 1
    ck = checkpoint.load(v1)
    assert ck.file_version == 1
    assert ck.model.keys() == old["model"].keys()
    assert all(torch.equal(ck.model[k], old["model"][k]) for k in ck.model)
    assert ck.vocab == old["vocab"] and ck.corpus == old["corpus"]
    # Settings added since load as "none" (issue 23's regularizers: off).
    assert ck.config.model.__dict__ == {**old["config"]["model"], "weight_drop": 0.0, "locked_dropout": 0.0}
    # The budget settings moved from [train] to [session]; nothing was lost or changed, and the
    # settings that came later have their defaults (which are what format-1 runs did).
    moved = {**ck.config.train.__dict__, **ck.config.session.__dict__}
    later = {k: v for k, v in moved.items() if k not in old["config"]["train"]}
    assert {k: v for k, v in moved.items() if k not in later} == old["config"]["train"]
    # Settings added since take their defaults: a plain run from scratch, as format-1 runs were.
    assert later == {"ema": 0.0, "patience": 0, "records": "", "init_from": "", "schedule": "cosine",
                     "cooldown": 0.2, "tensorboard": False}
    assert ck.init == {} and ck.planner is None and ck.live is None
    p = ck.progress
    assert (p.step, p.chars_seen, p.elapsed, p.best_val_bpc, p.last_val_bpc) == (
        old["step"], old["chars_seen"], old["elapsed"], old["best_val_bpc"], old["last_val_bpc"])
    assert p.loss_window == old["loss_window"] and p.data == old["data"]
    assert (ck.budget.total_steps, ck.budget.steps_fixed, ck.budget.sec_per_step, ck.budget.eval_seconds) == (
        old["total_steps"], old["plan_final"], old["sec_per_step"], old["eval_seconds"])
    assert all(torch.equal(a, b) for a, b in zip(ck.hidden, old["hidden"], strict=True))
    assert len(ck.ranks) == 1 and torch.equal(ck.ranks[0].rng["torch"], old["rng"]["torch"])
    assert ck.ranks[0].rng["python"] == old["rng"]["python"]
    assert (ck.trained_on.device, ck.trained_on.precision, ck.trained_on.world_size) == ("cpu", "fp32", 1)
    assert ck.optimizer["state"].keys() == old["optimizer"]["state"].keys()


def test_format_1_samples_and_evaluates_as_before(v1: Path):
    m = charlm.load(v1)
    assert m.sample(prime="The state ", length=60, temperature=0.0) == EXPECTED["greedy"]
    assert m.sample(prime="The state ", length=60, temperature=1.0, seed=3) == EXPECTED["seeded"]
    result = m.evaluate()
    assert result["chars"] == EXPECTED["eval_chars"]
    assert result["bpc"] == pytest.approx(EXPECTED["eval_bpc"], abs=1e-5)
    assert m.info()["format_version"] == 1


def test_format_1_resumes_as_the_code_that_wrote_it_did(v1: Path):
    rec = Recorder()
    result = session.resume(v1, callbacks=rec)
    assert result.step == EXPECTED["final_step"] == 200 and result.finished
    assert [s for s, _ in rec.steps] == [s for s, _ in EXPECTED["resumed_steps"]]
    for (step, got), (_, want) in zip(rec.steps, EXPECTED["resumed_steps"], strict=True):
        assert abs(got - want) < LOSS_TOLERANCE, (step, got, want)
    rows = [json.loads(line) for line in (v1.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [200]
    assert rows[0]["val_bpc"] == pytest.approx(EXPECTED["metrics"][-1]["val_bpc"], abs=LOSS_TOLERANCE)


def test_control_a_lost_rng_state_misses_by_more_than_the_tolerance(v1: Path):
    ck = checkpoint.load(v1)
    torch.manual_seed(4321)
    ck.ranks[0].rng["torch"] = torch.get_rng_state()
    fs.write_atomic(v1, checkpoint.serialize(ck))
    rec = Recorder()
    session.resume(v1, {"max_steps": 151}, callbacks=rec)
    assert abs(rec.steps[0][1] - EXPECTED["resumed_steps"][0][1]) > 100 * LOSS_TOLERANCE


def test_format_1_resumed_in_two_sessions_equals_one_bit_for_bit(v1: Path, tmp_path: Path):
    straight = v1
    stopped = tmp_path / "stopped" / "latest.pt"
    stopped.parent.mkdir()
    shutil.copy(v1, stopped)
    session.resume(straight)
    rec = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.resume(stopped, callbacks=rec,
                       pending_signal=lambda: signal.SIGINT if rec.steps and rec.steps[-1][0] >= 175 else 0)
    assert checkpoint.load(stopped).file_version == checkpoint.VERSION  # saved in today's format
    session.resume(stopped)
    a, b = checkpoint.load(straight), checkpoint.load(stopped)
    assert a.progress.step == b.progress.step == 200
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.progress.best_val_bpc == b.progress.best_val_bpc
