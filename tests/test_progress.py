"""What users see: previews that never change training, plain log lines, summary, plot."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from conftest import TINY, tiny_config

from charlm.cli import app
from charlm.cli.progress import Reporter
from charlm.training.session import fit


def _tiny_cfg(preview_length: int):
    return tiny_config(num_layers=2, dropout=0.2, eval_interval=5, max_steps=20, preview_length=preview_length)


def test_previews_do_not_change_training(corpus_file, tmp_path):
    with_prev = fit(_tiny_cfg(60), [str(corpus_file)], tmp_path / "a")
    without = fit(_tiny_cfg(0), [str(corpus_file)], tmp_path / "b")
    a = torch.load(with_prev.out_dir / "latest.pt", weights_only=True)["model"]
    b = torch.load(without.out_dir / "latest.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_log_lines_previews_and_summary(corpus_file, tmp_path):
    stream = io.StringIO()  # not a terminal: one plain line per evaluation, no bar
    rep = Reporter(stream=stream)
    cfg = _tiny_cfg(30)
    result = fit(cfg, [str(corpus_file)], tmp_path / "run", callbacks=rep)
    rep.summary(result)
    text = stream.getvalue()
    assert text.count("val ") >= 4  # evaluations at steps 5, 10, 15, 20
    for t in ("0.2", "0.5", "1"):
        assert f"sample at temperature {t} ---" in text
    assert "charlm sample --checkpoint" in text and "charlm resume" in text
    assert "best val bpc" in text and "\r" not in text
    [split] = [line for line in text.splitlines() if "in this session:" in line]
    assert "s training (" in split and "s evaluating" in split and "s saving" in split
    assert "planner" not in split  # no planner, no probe


def test_the_closing_line_says_where_the_seconds_went():
    from charlm.cli.progress import spent

    seconds = {"training": 222.4, "evaluation": 9.6, "saving": 2.2, "planning": 5.8, "total": 240.0}
    assert spent(seconds) == ("240s in this session: 222s training (93 %), 10s evaluating, 2s saving, "
                              "6s measuring this machine for the planner")


def test_log_says_once_that_encoding_started_and_then_that_the_cache_served(tmp_path):
    text_file = tmp_path / "unique.txt"  # text no other test encodes, so the cache is cold
    text_file.write_text("A log of its own: encoding shows up once.\n" * 200, encoding="utf-8")
    logs = []
    for run in ("first", "second"):
        stream = io.StringIO()
        fit(_tiny_cfg(0), [str(text_file)], tmp_path / run, callbacks=Reporter(stream=stream))
        logs.append(stream.getvalue())
    assert logs[0].count("charlm: encoding the corpus") == 1 and "encoded in" in logs[0]
    assert "charlm: encoding" not in logs[1] and "from the cache" in logs[1]


def test_quiet_prints_nothing(runner, corpus_file, tmp_path):
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "q"),
                              "--max-steps", "10", *TINY])
    assert res.exit_code == 0
    assert res.output == ""


def test_plot_writes_png(runner, corpus_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus_file), "--out", str(out), "--max-steps", "30",
                               *TINY]).exit_code == 0
    (out / "loss.png").unlink()  # training drew one already; `charlm plot` must redraw it
    res = runner.invoke(app, ["plot", str(out)])
    assert res.exit_code == 0, res.output
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_without_matplotlib_says_how_to_install(runner, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "chars": 10, "train_bpc": 3.0, "val_bpc": 3.1, "lr": 0.001, "elapsed": 1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails
    res = runner.invoke(app, ["plot", str(out)])
    assert res.exit_code == 2
    assert "pip install 'charlm[plot]'" in res.stderr


def test_plot_of_a_folder_without_metrics(runner, tmp_path):
    res = runner.invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 2 and "metrics.jsonl" in res.stderr
