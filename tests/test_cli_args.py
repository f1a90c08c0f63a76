"""What the CLI hands the library, in milliseconds: the library boundary is patched (as
fastapi-cli's tests patch uvicorn.run) and the exact arguments it receives are checked.

Flag precedence (defaults < --config file < flags), the flags derived from the config's
fields, what `resume` may pass on, and the options `sample` builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from charlm.cli import app
from charlm.config.run import ModelConfig, RunConfig, SessionConfig, TrainConfig
from charlm.config.sampling import SampleOptions
from charlm.training import session
from charlm.training.events import TrainResult


@pytest.fixture
def fit_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_fit(cfg: RunConfig, specs: list[str] | None, out_dir: Path, **kwargs: Any) -> TrainResult:
        calls.append({"cfg": cfg, "specs": specs, "out_dir": out_dir, **kwargs})
        return TrainResult(Path(out_dir), 0, 0, 0, 0.0, None, None, True)

    monkeypatch.setattr(session, "fit", fake_fit)
    return calls


def test_train_defaults_reach_the_library_unchanged(runner, fit_calls):
    res = runner.invoke(app, ["train", "a.txt", "b/", "--quiet"])
    assert res.exit_code == 0, res.output
    [call] = fit_calls
    assert call["cfg"] == RunConfig()
    assert call["specs"] == ["a.txt", "b/"] and call["out_dir"] == Path("checkpoints")
    assert call["encoding"] is None and call["force"] is False
    assert call["explicit"] == set() and call["planner"] is True  # the planner fills in every setting


def test_the_settings_chosen_reach_the_planner_and_the_file_is_read_once(runner, fit_calls, tmp_path, monkeypatch):
    import tomllib

    preset = tmp_path / "p.toml"
    preset.write_text("[model]\nhidden_size = 40\n[session]\nkeep = 7\n")
    reads = []
    real = tomllib.load
    monkeypatch.setattr(tomllib, "load", lambda fh: reads.append(fh.name) or real(fh))
    res = runner.invoke(app, ["train", "--config", str(preset), "--lr", "0.02", "--no-planner", "--quiet"])
    assert res.exit_code == 0, res.output
    assert fit_calls[0]["explicit"] == {"hidden_size", "keep", "lr"} and fit_calls[0]["planner"] is False
    assert reads == [str(preset)]


def test_flags_win_over_the_config_file_which_wins_over_defaults(runner, fit_calls, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[model]\nhidden_size = 40\ncell = 'gru'\n[train]\nlr = 0.005\n[session]\nkeep = 7\n")
    res = runner.invoke(app, ["train", "--config", str(preset), "--hidden-size", "24", "--keep", "1", "--quiet",
                              "--out", str(tmp_path / "o"), "--force", "--encoding", "latin-1"])
    assert res.exit_code == 0, res.output
    cfg = fit_calls[0]["cfg"]
    assert cfg.model == ModelConfig(cell="gru", hidden_size=24)  # file, then flag
    assert cfg.train == TrainConfig(lr=0.005)
    assert cfg.session == SessionConfig(keep=1)
    assert fit_calls[0]["force"] is True and fit_calls[0]["encoding"] == "latin-1"


@pytest.mark.parametrize(("args", "field", "value"), [
    (["--no-preview"], "preview_length", 0),
    (["--compile"], "compile", True),
    (["--time", "5m"], "time", "5m"),
    (["--max-steps", "7"], "max_steps", 7),
    (["--precision", "fp32"], "precision", "fp32"),
])
def test_session_flags(runner, fit_calls, args, field, value):
    assert runner.invoke(app, ["train", *args, "--quiet"]).exit_code == 0
    assert getattr(fit_calls[0]["cfg"].session, field) == value


def test_every_bad_flag_is_named_in_one_line_before_anything_is_read_or_written(runner, monkeypatch, tmp_path):
    # The CLI delegates; the library's first act is to validate the config, once.
    def reads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the corpus was read before the settings were checked")

    monkeypatch.setattr(session, "encode_corpus", reads)
    res = runner.invoke(app, ["train", "--lr", "-1", "--seq-len", "0", "--dropout", "2", "--quiet",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and not (tmp_path / "run").exists()
    [line] = res.stderr.splitlines()
    assert all(f in line for f in ("--lr: ", "--seq-len: ", "--dropout: "))


def test_resume_passes_only_session_settings(runner, monkeypatch, tmp_path):
    calls = []

    def fake_resume(path: Path, changes: dict[str, Any], **kwargs: Any) -> TrainResult:
        calls.append((path, changes, kwargs))
        return TrainResult(tmp_path, 0, 0, 0, 0.0, None, None, True)

    monkeypatch.setattr(session, "resume", fake_resume)
    res = runner.invoke(app, ["resume", "run/latest.pt", "--max-steps", "50", "--no-preview", "--quiet"])
    assert res.exit_code == 0, res.output
    [(path, changes, kwargs)] = calls
    assert path == Path("run/latest.pt") and kwargs["config_file"] is None
    assert set(changes) == {f for f in SessionConfig.__dataclass_fields__}  # nothing else can be passed
    assert changes["max_steps"] == 50 and changes["preview_length"] == 0
    assert all(v is None for k, v in changes.items() if k not in ("max_steps", "preview_length"))
    # A run-defining flag does not exist on resume.
    res = runner.invoke(app, ["resume", "run/latest.pt", "--lr", "0.1"])
    assert res.exit_code == 2 and "--lr" in res.stderr


def test_sample_builds_its_options_from_the_flags(runner, monkeypatch, tmp_path):
    seen: list[SampleOptions] = []

    class FakeModel:
        def __init__(self) -> None:
            from charlm.data.vocab import Vocab

            self.vocab = Vocab("abc")
            self.sampler = self
            self.records = ""  # a model of a stream of text

        def prime_ids(self, prime: str, unknown: str) -> list[int]:
            return [0] * len(prime)

        def stream_batch(self, opts: SampleOptions):
            seen.append(opts)
            return iter([["a"] * opts.num_samples] * opts.length)

    monkeypatch.setattr("charlm.api.load", lambda path, device="cpu": FakeModel())
    res = runner.invoke(app, ["sample", "-c", "x.pt", "-n", "3", "-t", "0.5,1", "--top-k", "4", "--top-p", "0.9",
                              "--seed", "2", "--num-samples", "2", "--stop", "zz", "--prime", "ab"])
    assert res.exit_code == 0, res.output
    assert seen == [SampleOptions(length=3, temperature=t, top_k=4, top_p=0.9, prime="ab", stop="zz", seed=2,
                                  num_samples=2) for t in (0.5, 1.0)]


def test_the_run_config_is_validated_once_per_change(runner, corpus_file, tmp_path, monkeypatch):
    """Once for the settings given, once more for each change the library makes (the
    planner's choice): never twice for the same settings."""
    from conftest import tiny_flags

    calls: list[RunConfig] = []
    real = RunConfig.validate

    def counting(self: RunConfig) -> RunConfig:
        calls.append(self)
        return real(self)

    monkeypatch.setattr(RunConfig, "validate", counting)
    args = ["train", str(corpus_file), *tiny_flags(), "--max-steps", "2", "--no-preview", "-q"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    assert len(calls) == 2 and calls[0] != calls[1]
    calls.clear()
    assert runner.invoke(app, [*args, "--no-planner", "--out", str(tmp_path / "b")]).exit_code == 0
    assert len(calls) == 1
