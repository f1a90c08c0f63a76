"""End-to-end smoke test through the CLI: train, sample, resume, eval, info."""

from __future__ import annotations

import json

from charlm.cli import app
from conftest import TINY


def test_train_sample_resume_eval_info(runner, corpus_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(out), "--max-steps", "20", *TINY])
    assert res.exit_code == 0, res.output
    assert (out / "latest.pt").exists() and (out / "best.pt").exists()
    res = runner.invoke(app, ["sample", "-c", str(out / "best.pt"), "--length", "50", "--seed", "3"])
    assert res.exit_code == 0
    assert len(res.stdout.rstrip("\n")) == 50
    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "30", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["info", str(out / "latest.pt"), "--json"])
    assert json.loads(res.stdout)["step"] == 30
    res = runner.invoke(app, ["eval", str(out / "best.pt"), "--json"])
    data = json.loads(res.stdout)
    assert 0 < data["bpc"] < 8 and data["chars"] > 0
