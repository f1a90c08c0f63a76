"""End-to-end smoke test through the CLI: train, sample, resume, eval, info."""

from __future__ import annotations

import json

from conftest import TINY

from charlm.cli import app


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
    assert res.exit_code == 0
    assert json.loads(res.stdout)["step"] == 30
    res = runner.invoke(app, ["eval", str(out / "best.pt"), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert 0 < data["bpc"] < 8 and data["chars"] > 0


def test_python_api_after_the_training_module_is_loaded(corpus_file, tmp_path):
    """The README's API: fit, resume, load, sample, stream, evaluate — usable even once
    charlm.training.trainer (the module) has been imported."""
    import charlm
    import charlm.training.trainer

    cfg = charlm.RunConfig()
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.embedding_size = 32, 1, 16
    cfg.train.seq_len, cfg.train.batch_size = 16, 4
    cfg.session.eval_interval, cfg.session.preview_length, cfg.session.max_steps = 10, 0, 20
    result = charlm.fit(cfg, [str(corpus_file)], tmp_path / "run")
    assert result.step == 20
    charlm.resume(tmp_path / "run" / "latest.pt", {"max_steps": 30})
    m = charlm.load(tmp_path / "run" / "latest.pt")
    assert m.info()["step"] == 30
    text = m.sample(prime="The ", length=40, temperature=0.5, seed=1)
    assert len(text) == 40 and text == "".join(m.stream(prime="The ", length=40, temperature=0.5, seed=1))
    assert 0 < m.evaluate()["bpc"] < 8
