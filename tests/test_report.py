"""The run folder explains itself: `report.html` and `README.md` after training and from
`charlm report`; the commands listed in the order of the work; a bare `charlm` shows the
quick start; `charlm.fit` / `charlm.resume` from Python show progress through `tqdm.auto` and
return the metrics and paths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import tqdm.auto
from browser import CHROMIUM, HEADLESS, needs_chromium
from conftest import TINY, charlm_cmd, one_line_error, snapshot, subprocess_env, tiny_config

import charlm
from charlm.analysis.report import SAMPLE_CHARS, SAMPLE_SEED, TEMPERATURES, TRAIN_COLOUR, VAL_COLOUR
from charlm.cli import app
from charlm.storage import checkpoint as ckpt_io
from charlm.storage.rundir import CARD_MARK, RunDir
from charlm.training.events import EvalRecord


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the commands ----------------------------------------------------------------------------------

def test_help_lists_the_commands_in_the_order_of_the_work(runner):
    res = invoke(runner, "--help")
    assert res.exit_code == 0, res.output
    listed = re.findall(r"^  (\w+)\s{2,}", res.stdout.split("Commands:")[1], flags=re.M)
    assert listed[:7] == ["train", "resume", "sample", "eval", "info", "plot", "report"], listed
    assert set(listed) >= {"novelty", "chat", "inspect", "serve", "export"}


def test_bare_charlm_shows_the_usage_and_the_quick_start_without_torch(tmp_path):
    code = ("import sys; from charlm.cli import main; sys.argv = ['charlm']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=subprocess_env(), timeout=120)
    out = res.stdout
    assert out.startswith("Usage: charlm"), out
    assert "charlm train --time 4m" in out and "charlm sample --temperature 0.5" in out
    assert out.strip().endswith("exit 0 False"), out  # success, and the quick start loads no torch
    assert res.stderr == ""


# --- the report of a run ---------------------------------------------------------------------------

def test_a_run_leaves_a_report_and_a_card_with_its_facts(trained_run):
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    card = (trained_run / "README.md").read_text(encoding="utf-8")
    assert card.startswith(CARD_MARK)
    latest = ckpt_io.load(trained_run / "latest.pt")
    best = f"{latest.progress.best_val_bpc:.4f}"
    assert f"<b>{best}</b>" in page and f"**{best} bits per character**" in card
    rows = metrics(trained_run)
    # One point per evaluation on the held-out curve; the card's table holds each of them.
    assert page.count("class='val-point'") == len(rows)
    for r in rows:
        assert f"| {r['step']:,} | {r['chars']:,} | {r['train_bpc']:.4f} | {r['val_bpc']:.4f} |" in card
    params = charlm.load(trained_run / "best.pt").model.num_parameters()
    assert f"{params:,} parameters" in page and f"{params:,} parameters" in card
    assert latest.trained_on.machine and latest.trained_on.machine in card  # which machine it ran on
    for needle in ("speech.txt", "charlm sample --checkpoint", "charlm resume", "--init-from",
                   f"charlm report {trained_run}"):
        assert needle in card, needle


def test_the_samples_are_the_models_own(trained_run):
    """The page's samples are what `charlm sample` writes from best.pt with the same seed."""
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    lm = charlm.load(trained_run / "best.pt")
    shown = re.findall(r"<pre class='sample' data-temperature='([\d.]+)'>(.*?)</pre>", page, flags=re.S)
    assert [float(t) for t, _ in shown] == list(TEMPERATURES)
    import html

    for t, text in shown:
        assert html.unescape(text) == lm.sample(temperature=float(t), length=SAMPLE_CHARS, seed=SAMPLE_SEED)


def test_charlm_report_rebuilds_the_same_files(runner, run_copy):
    (run_copy / "report.html").unlink()
    (run_copy / "README.md").unlink()
    res = invoke(runner, "report", run_copy)
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [str(run_copy / "report.html"), str(run_copy / "README.md")]
    first = {n: (run_copy / n).read_bytes() for n in ("report.html", "README.md")}
    assert invoke(runner, "report", run_copy).exit_code == 0
    assert {n: (run_copy / n).read_bytes() for n in first} == first  # seeded: the same every time
    assert f"charlm report {run_copy}".encode() in first["README.md"]


def test_a_users_readme_is_never_replaced(runner, run_copy):
    readme = run_copy / "README.md"
    readme.write_text("# my notes on this run\n", encoding="utf-8")
    (run_copy / "report.html").unlink()
    res = invoke(runner, "report", run_copy)
    assert res.exit_code == 0, res.output
    assert readme.read_text(encoding="utf-8") == "# my notes on this run\n"
    assert (run_copy / "report.html").exists()
    assert "is not a charlm run card" in res.stderr and len(res.stderr.splitlines()) == 1
    # --force starts over: it removes charlm's files, never the user's README.
    RunDir(run_copy).create(force=True)
    assert readme.exists() and not (run_copy / "report.html").exists()
    readme.write_text(CARD_MARK + "\nold card\n", encoding="utf-8")
    RunDir(run_copy).create(force=True)
    assert not readme.exists()


@pytest.mark.parametrize("make", ["missing", "empty", "no-metrics"])
def test_report_of_a_folder_without_a_run_is_one_line(runner, run_copy, tmp_path, make):
    target = tmp_path / "nothing"
    if make == "empty":
        target.mkdir()
    elif make == "no-metrics":
        target = run_copy
        (run_copy / "metrics.jsonl").unlink()
    before = snapshot(target) if target.exists() else None
    one_line_error(invoke(runner, "report", target), str(target))
    if before is not None:
        assert snapshot(target) == before  # nothing written


def test_a_records_run_reports_records(runner, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["anna", "bert", "carla", "dirk", "emma", "fritz"] * 40) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    res = invoke(runner, "train", names, "--records", "lines", "--out", out, "--max-steps", 20, *TINY)
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "read as records (lines)" in card
    sample = card.split("Temperature 0.5:")[1].split("```text\n")[1].split("\n```")[0]
    assert len(sample.splitlines()) > 1  # several records, one per line


@needs_chromium
def test_the_page_renders_in_chromium_with_its_curves_and_samples(trained_run, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    page = trained_run / "report.html"
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120, check=False).stdout
    assert "<svg id=\"curves\"" in dom and dom.count("<polyline") == 2
    assert dom.count('class="sample"') == len(TEMPERATURES)
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--window-size=1000,1600",
                        "--virtual-time-budget=3000", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120, check=False)
    img = (mpimg.imread(shot)[:, :, :3] * 255).round().astype(int)
    assert img.shape == (1600, 1000, 3)

    def pixels(colour: str) -> int:
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        return int((abs(img - rgb).max(axis=2) < 30).sum())

    # Both curves are drawn (a 2.5-pixel line across most of a 900-pixel-wide chart).
    assert pixels(TRAIN_COLOUR) > 600 and pixels(VAL_COLOUR) > 600, (pixels(TRAIN_COLOUR), pixels(VAL_COLOUR))
    assert (img.max(axis=2) < 100).sum() > 5000  # and text


# --- from Python ---------------------------------------------------------------------------------

class _Widget(tqdm.auto.tqdm):  # type: ignore[misc]
    """Stands in for Jupyter's widget bar: tqdm.auto's class when a notebook kernel runs."""

    made: ClassVar[list[_Widget]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Widget.made.append(self)


def test_fit_and_resume_from_python_show_progress_and_return_metrics_and_paths(tmp_path, corpus_file,
                                                                               monkeypatch, capsys):
    monkeypatch.setattr(tqdm.auto, "tqdm", _Widget)
    _Widget.made = []
    result = charlm.fit(tiny_config(max_steps=30), [str(corpus_file)], tmp_path / "run")
    err = capsys.readouterr().err
    bars = [b for b in _Widget.made if b.unit == "step"]
    assert len(bars) == 1 and bars[0].n == 30 and bars[0].total == 30  # drawn off a terminal: a widget
    assert "step 10: train" in err and "best val bpc" in err
    assert result.metrics == [EvalRecord.from_row(r) for r in metrics(tmp_path / "run")]
    assert [m.step for m in result.metrics] == [10, 20, 30]
    assert result.best == tmp_path / "run" / "best.pt" and result.latest.exists()
    assert result.report == tmp_path / "run" / "report.html" and result.report.exists()

    _Widget.made = []
    again = charlm.resume(result.latest, {"max_steps": 50}, quiet=True)
    assert capsys.readouterr().err == "" and _Widget.made == []  # quiet: nothing at all
    assert [m.step for m in again.metrics] == [10, 20, 30, 40, 50]  # the run's, not only this session's


def test_fit_from_python_in_a_terminal_uses_tqdms_own_bar(tmp_path, corpus_file, capsys):
    import tqdm.asyncio

    assert tqdm.auto.tqdm is tqdm.asyncio.tqdm  # no notebook here: tqdm.auto is the terminal bar
    result = charlm.fit(tiny_config(max_steps=10), [str(corpus_file)], tmp_path / "run")
    assert result.step == 10
    assert "step 10: train" in capsys.readouterr().err  # stderr is no terminal under pytest: plain lines


def test_report_with_a_device_that_is_not_there_is_one_line(trained_run):
    cmd = [*charlm_cmd(), "report", str(trained_run), "--device", "nope"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
