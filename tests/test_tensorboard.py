"""`--tensorboard`: a run's metrics and live samples, read back with TensorBoard's own reader.

The scalars are the numbers metrics.jsonl holds, at the same steps; previews are text, one
tag per temperature; a resumed run continues the events and a reader drops what a session
wrote after the checkpoint the run resumed from (checked against the reader with its purge
turned off, which still sees them); `--force` starts the events over; only rank 0 writes;
without the tensorboard package `--tensorboard` is refused before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import TINY, one_line_error, snapshot, tiny_config

from charlm.cli import app
from charlm.errors import TrainingInterrupted
from charlm.storage.rundir import RunDir
from charlm.training import session, tensorboard_log
from charlm.training.events import Callbacks, EvalRecord, StepStats

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCALARS = {"train/bpc", "train/lr", "train/chars_per_s", "eval/val_bpc", "eval/train_bpc"}


def _events(run: Path, purge: bool = True) -> EventAccumulator:
    """Every event of the run's tensorboard/ folder, none sampled away; `purge=False` keeps
    the ones a later session's purge step hides."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0},
                              purge_orphaned_data=purge)
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    found = events.Scalars(tag)
    return [e.step for e in found], [e.value for e in found]


def _metrics(run: Path, key: str) -> tuple[list[int], list[float]]:
    """metrics.jsonl's steps and `key`, as TensorBoard keeps a scalar (float32)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["step"] for r in rows], [float(np.float32(r[key])) for r in rows]


def _train(runner: Any, corpus: Path, out: Path, steps: int, *extra: str) -> None:
    res = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--max-steps", str(steps), *TINY, *extra])
    assert res.exit_code == 0, res.output


def _next_second() -> None:
    """Event files are named by the second they were opened in (then the process and a
    counter) and read in name order: two sessions of one process within the same second
    could sort either way. Sessions in new processes are always seconds apart."""
    time.sleep(1.01 - time.time() % 1)


def test_train_writes_the_run_s_metrics_at_their_steps(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    _train(runner, corpus_file, run, 25, "--tensorboard")  # evaluations at 10, 20 and 25
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = _events(run)
    assert set(events.Tags()["scalars"]) == SCALARS
    assert events.Tags()["tensors"] == []  # --no-preview: no samples
    for tag, key in (("eval/val_bpc", "val_bpc"), ("eval/train_bpc", "train_bpc")):
        assert _scalars(events, tag) == _metrics(run, key), tag
    # Every 10th step and the last: each point the mean of the steps since the one before,
    # which here are the evaluations' windows too; the rate at a step is the one the
    # evaluation at that step records.
    assert _scalars(events, "train/bpc") == _metrics(run, "train_bpc")
    assert _scalars(events, "train/lr") == _metrics(run, "lr")
    steps, speeds = _scalars(events, "train/chars_per_s")
    assert steps == [10, 20, 25] and all(s > 0 for s in speeds)


class _Recorder(Callbacks):
    def __init__(self) -> None:
        self.evals: list[tuple[EvalRecord, list[tuple[float, str]]]] = []
        self.step = 0

    def on_step(self, stats: StepStats) -> None:
        self.step = stats.step

    def on_eval(self, record: EvalRecord, previews: list[tuple[float, str]]) -> None:
        self.evals.append((record, previews))


def _text(events: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """A text tag's (step, text), its Markdown code block undone."""
    out = []
    for e in events.Tensors(tag):
        text = e.tensor_proto.string_val[0].decode("utf-8")
        out.append((e.step, "\n".join(line.removeprefix("    ") for line in text.split("\n"))))
    return out


def test_previews_are_text_one_tag_per_temperature(corpus_file, tmp_path):
    run, seen = tmp_path / "run", _Recorder()
    session.fit(tiny_config(max_steps=20, preview_length=60, tensorboard=True), [str(corpus_file)], run,
                callbacks=seen)
    events = _events(run)
    temperatures = [t for t, _ in seen.evals[0][1]]
    assert len(temperatures) == 3
    assert sorted(events.Tags()["tensors"]) == sorted(f"preview/temperature_{t:g}/text_summary" for t in temperatures)
    for i, t in enumerate(temperatures):
        expected = [(record.step, previews[i][1]) for record, previews in seen.evals]
        assert [step for step, _ in expected] == [10, 20]
        assert _text(events, f"preview/temperature_{t:g}/text_summary") == expected


def test_an_interrupted_session_still_closes_its_events(corpus_file, tmp_path):
    run, seen = tmp_path / "run", _Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(tiny_config(max_steps=100, tensorboard=True), [str(corpus_file)], run, callbacks=seen,
                    pending_signal=lambda: signal.SIGINT if seen.step >= 15 else 0)
    events = _events(run)
    assert _scalars(events, "train/bpc")[0] == [10, 15]  # the steps after the last point, written on close
    assert _scalars(events, "eval/val_bpc")[0] == [10]
    assert not [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]


def test_a_resume_continues_the_events_and_drops_the_steps_it_trains_again(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    _train(runner, corpus_file, run, 20, "--tensorboard")
    _next_second()
    # From step 10, as after a crash at step 20 whose last save was step 10: steps 11-20 again.
    res = runner.invoke(app, ["resume", str(run / "step-0000010.pt"), "--max-steps", "40", "--tensorboard",
                              "--quiet", "--no-preview"])
    assert res.exit_code == 0, res.output
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = _events(run)
    assert _scalars(events, "eval/val_bpc") == _metrics(run, "val_bpc")
    assert _scalars(events, "eval/val_bpc")[0] == [10, 20, 30, 40]
    assert _scalars(events, "train/bpc")[0] == [10, 20, 30, 40]
    # Control: the first session's step 20 is still in its file; the purge step hides it.
    assert _scalars(_events(run, purge=False), "eval/val_bpc")[0] == [10, 20, 20, 30, 40]


def test_without_the_flag_no_folder_and_a_resume_can_turn_it_on(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    _train(runner, corpus_file, run, 20)
    assert not (run / "tensorboard").exists()
    res = runner.invoke(app, ["resume", str(run / "latest.pt"), "--max-steps", "30", "--tensorboard", "--quiet"])
    assert res.exit_code == 0, res.output
    events = _events(run)
    assert _scalars(events, "eval/val_bpc")[0] == [30] and _scalars(events, "train/bpc")[0] == [30]


def test_force_starts_the_events_over(runner, corpus_file, tmp_path):
    run, preset = tmp_path / "run", tmp_path / "preset.toml"
    _train(runner, corpus_file, run, 20, "--tensorboard")
    _next_second()
    preset.write_text("[session]\ntensorboard = true\n", encoding="utf-8")  # the setting in a --config file
    _train(runner, corpus_file, run, 10, "--config", str(preset), "--force")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert _scalars(_events(run, purge=False), "eval/val_bpc") == _metrics(run, "val_bpc")
    assert _metrics(run, "val_bpc")[0] == [10]


def _without_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real(name, *args))


def test_without_the_package_train_is_refused_before_anything_is_written(runner, corpus_file, tmp_path,
                                                                         monkeypatch):
    _without_tensorboard(monkeypatch)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(out), "--max-steps", "10", *TINY,
                              "--tensorboard"])
    one_line_error(res, "--tensorboard", "pip install 'charlm[tensorboard]'")
    assert not out.exists()


def test_without_the_package_resume_is_refused_and_the_run_is_untouched(runner, run_copy, monkeypatch):
    _without_tensorboard(monkeypatch)
    before = snapshot(run_copy)
    res = runner.invoke(app, ["resume", str(run_copy / "latest.pt"), "--max-steps", "40", "--tensorboard", "--quiet"])
    one_line_error(res, "--tensorboard", "pip install 'charlm[tensorboard]'")
    assert snapshot(run_copy) == before


def test_only_rank_0_writes(tmp_path):
    cfg = tiny_config(tensorboard=True)
    assert session._board(cfg, RunDir(tmp_path), SimpleNamespace(is_main=False)) is None
    assert isinstance(session._board(cfg, RunDir(tmp_path), SimpleNamespace(is_main=True)),
                      tensorboard_log.TensorBoardLog)
    assert session._board(tiny_config(), RunDir(tmp_path), SimpleNamespace(is_main=True)) is None


def test_an_event_file_that_cannot_be_written_costs_a_warning_not_the_run(runner, corpus_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder", encoding="utf-8")
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(run), "--max-steps", "10", *TINY,
                              "--tensorboard"])
    assert res.exit_code == 0, res.output
    [warning] = [line for line in res.stderr.splitlines() if "TensorBoard" in line]
    assert warning.startswith("charlm: warning:") and "training goes on" in warning
    assert (run / "latest.pt").exists()
