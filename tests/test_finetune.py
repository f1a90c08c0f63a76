"""Fine-tuning (--init-from): vocabularies merged by character (rows copied exactly, new rows
as a fresh model's), the model shape from the checkpoint, where the run started recorded and
shown, an exact resume that needs only the run's own checkpoint, and the bad inputs.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, TINY, tiny_config
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config.run import build_config
from charlm.data.cache import encode_corpus
from charlm.data.streams import Translated, model_vocab, split, training_data
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError, TrainingInterrupted
from charlm.model.network import CharRNN
from charlm.storage import checkpoint
from charlm.training import session
from charlm.training.events import Callbacks
from charlm.training.finetune import ROWS

# The new corpus: some of TEXT's characters, none of its capitals but M, and new ones (digits, Z, #).
NEW_TEXT = ("zebra 1234 quiz: Zany jazz, 5678 fizz # buzz. the state of our union is strong; "
            "Mr. Speaker, 90 zoo keepers quiz us.\n") * 40


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_step(self, stats):
        self.steps.append([stats.step, stats.bpc])


@pytest.fixture(scope="module")
def base(tmp_path_factory, _one_thread, _corpus_cache) -> Path:
    """A tiny model trained for 40 steps on TEXT (with dropout and two layers)."""
    root = tmp_path_factory.mktemp("base")
    (root / "speech.txt").write_text(TEXT, encoding="utf-8")
    res = CliRunner().invoke(app, ["train", str(root / "speech.txt"), "--out", str(root / "run"), "--max-steps",
                                   "40", *TINY, "--num-layers", "2", "--dropout", "0.1"])
    assert res.exit_code == 0, res.output
    return root / "run" / "latest.pt"


@pytest.fixture
def new_corpus(tmp_path) -> Path:
    path = tmp_path / "new.txt"
    path.write_text(NEW_TEXT, encoding="utf-8")
    return path


def ft_config(base: Path, **over):
    """A fine-tuning config: the built-in defaults but for these settings (`fit` takes the
    model's settings from the checkpoint, but for the ones changed here)."""
    flags = {"init_from": str(base), "preview_length": 0, "device": "cpu", "precision": "fp32",
             "batch_size": 4, "seq_len": 16, "eval_interval": 5, **over}
    return build_config(None, flags)


def start_of(cfg, corpus: Path, out: Path) -> checkpoint.Checkpoint:
    """The fine-tuning run's weights at step 0: stopped before its first step."""
    with pytest.raises(TrainingInterrupted):
        session.fit(cfg, [str(corpus)], out, pending_signal=lambda: signal.SIGINT)
    return checkpoint.load(out / "latest.pt")


# --- the vocabulary, merged by character --------------------------------------------------


def test_rows_are_copied_by_character_and_new_rows_are_fresh(base, new_corpus, tmp_path):
    old = checkpoint.load(base)
    cfg = ft_config(base)
    ck = start_of(cfg, new_corpus, tmp_path / "ft")
    assert ck.progress.step == 0
    old_chars, new_chars = set(old.vocab), set(NEW_TEXT)
    assert ck.vocab == "".join(sorted(old_chars | new_chars))
    shared, fresh, kept = old_chars & new_chars, new_chars - old_chars, old_chars - new_chars
    assert shared and fresh and kept  # the test covers all three kinds
    assert {"Z", "1", "#"} <= fresh and {"W", "U"} <= kept
    merged = Vocab(ck.vocab)
    # A fresh model of the merged vocabulary, as a run from scratch would build it.
    torch.manual_seed(cfg.train.seed)
    scratch = CharRNN(ck.config.model, len(merged)).state_dict()  # (the shape is the checkpoint's)
    for key in ROWS:
        for ch in merged.chars:
            row = ck.model[key][merged.chars.index(ch)]
            if ch in old_chars:  # shared or known only to the old model: its trained row, exactly
                assert torch.equal(row, old.model[key][old.vocab.index(ch)]), (key, ch)
            else:  # new: the fresh model's row
                assert torch.equal(row, scratch[key][merged.chars.index(ch)]), (key, ch)
    for key in old.model:  # the recurrent layers, whole
        if key not in ROWS:
            assert torch.equal(ck.model[key], old.model[key]), key
    # Control: the fresh rows are not the old model's (the checks above can tell them apart).
    assert not torch.equal(scratch["head.bias"][:len(old.vocab)], old.model["head.bias"])
    assert ck.optimizer["state"] == {}  # a new optimizer
    assert ck.init["vocab"] == {"size": len(merged), "shared": len(shared), "new": len(fresh),
                                "old_only": len(kept)}


def test_corpus_ids_are_read_through_the_table(base, new_corpus):
    corpus = encode_corpus([str(new_corpus)])
    vocab = model_vocab(corpus.vocab.chars, "", checkpoint.load(base).vocab)
    data = training_data(corpus, vocab, "")
    assert isinstance(data, Translated)
    assert data[:].tolist() == vocab.encode(NEW_TEXT).tolist()
    part = split(data, 0.05).val  # slices stay translated views of the cache
    assert isinstance(part, Translated)
    assert part[np.arange(3)].tolist() == vocab.encode(NEW_TEXT[-len(part):][:3]).tolist()


def test_characters_only_the_old_model_knew_stay_usable(base, new_corpus, tmp_path, runner):
    out = tmp_path / "ft"
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(base), "--out", str(out),
                              "--max-steps", "10", "--batch-size", "4", "--seq-len", "16", "--no-preview", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "-c", str(out / "latest.pt"), "--prime", "We meet", "--length", "20",
                              "--seed", "1"])
    assert res.exit_code == 0 and res.stdout.startswith("We meet")  # W: only in the old corpus


# --- shape, provenance ----------------------------------------------------------------------


def test_shape_comes_from_the_checkpoint_and_a_disagreeing_flag_is_named(base, new_corpus, tmp_path, runner):
    common = ["--max-steps", "3", "--batch-size", "4", "--seq-len", "16", "--no-preview", "-q"]
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(base), "--out", str(tmp_path / "a"),
                              "--hidden-size", "64", "--num-layers", "2", *common])
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "--hidden-size 64 (it has 32)" in res.stderr and "--num-layers" not in res.stderr
    assert not (tmp_path / "a").exists()
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(base), "--out", str(tmp_path / "b"),
                              "--hidden-size", "32", "--num-layers", "2", "--dropout", "0.3", *common])
    assert res.exit_code == 0, res.output  # agreeing shape flags are fine; dropout may differ
    cfg = checkpoint.load(tmp_path / "b" / "latest.pt").config
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.embedding_size, m.dropout) == (2, 32, 16, 0.3)
    assert cfg.train.init_from == str(base)


def test_info_shows_where_the_run_started(base, new_corpus, tmp_path, runner):
    out = tmp_path / "ft"
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(base), "--out", str(out),
                              "--max-steps", "5", "--batch-size", "4", "--seq-len", "16", "--no-preview", "-q"])
    assert res.exit_code == 0, res.output
    old = checkpoint.load(base)
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)["init_from"]
    assert info["path"] == str(base.resolve()) and info["step"] == 40
    assert info["corpus"] == {"sources": old.corpus["specs"], "sha256": old.corpus["sha256"],
                              "chars": old.corpus["chars"]}
    text = runner.invoke(app, ["info", str(out / "latest.pt")]).stdout
    assert f"initialised from        {base.resolve()} (step 40, trained on {old.corpus['specs'][0]})" in text
    assert old.corpus["sha256"] in text
    plain = json.loads(runner.invoke(app, ["info", str(base), "--json"]).stdout)
    assert plain["init_from"] is None


# --- exact resume ---------------------------------------------------------------------------


def test_fine_tuned_run_resumes_bit_exactly_without_its_init_checkpoint(base, new_corpus, tmp_path):
    private = tmp_path / "base.pt"
    shutil.copy(base, private)
    n, m = 7, 8
    first = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(ft_config(private, max_steps=n + m), [str(new_corpus)], tmp_path / "stopped", callbacks=first,
                    pending_signal=lambda: signal.SIGINT if first.steps and first.steps[-1][0] >= n else 0)
    private.unlink()  # everything a resume needs is in the run's own checkpoint
    second = Recorder()
    session.resume(tmp_path / "stopped" / "latest.pt", {}, callbacks=second)
    shutil.copy(base, private)
    whole = Recorder()
    session.fit(ft_config(private, max_steps=n + m), [str(new_corpus)], tmp_path / "full", callbacks=whole)
    assert first.steps + second.steps == whole.steps and len(whole.steps) == n + m
    a, b = (checkpoint.load(tmp_path / d / "latest.pt") for d in ("stopped", "full"))
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.init == b.init and a.init["step"] == 40
    # Control: the same run from scratch (no --init-from) trains differently.
    scratch = Recorder()
    session.fit(tiny_config(num_layers=2, dropout=0.1, max_steps=3, precision="fp32"), [str(new_corpus)],
                tmp_path / "scratch", callbacks=scratch)
    assert scratch.steps[0][1] != whole.steps[0][1]


def test_format_2_checkpoints_load_as_trained_from_scratch(base, tmp_path):
    raw = torch.load(base, weights_only=True)
    raw["version"] = 2
    del raw["init"]
    old = tmp_path / "v2.pt"
    torch.save(raw, old)
    ck = checkpoint.load(old)
    assert ck.file_version == 2 and ck.init == {} and ck.progress.step == 40


# --- bad input ------------------------------------------------------------------------------


class Unsafe:
    """Pickled as a class reference: weights_only refuses to load it."""


def bad_files(tmp_path: Path, base: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(base.read_bytes()[:300])
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "charlm", "version": 3, "payload": Unsafe()}, pickled)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return {"missing": (tmp_path / "nope.pt", "no such checkpoint"),
            "corrupt": (corrupt, "corrupt or truncated"),
            "pickled": (pickled, "pickled Python objects"),
            "foreign": (foreign, "not a charlm checkpoint")}


@pytest.mark.parametrize("kind", ["missing", "corrupt", "pickled", "foreign"])
def test_bad_init_checkpoint_is_one_line_and_nothing_is_written(base, new_corpus, tmp_path, runner, kind):
    path, expect = bad_files(tmp_path, base)[kind]
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(path), "--out", str(tmp_path / "run"),
                              "--max-steps", "3"])
    assert res.exit_code == 2
    assert res.stderr.startswith(f"charlm: error: --init-from: {path}: ") and expect in res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_force_never_deletes_the_init_checkpoint(base, new_corpus, tmp_path, runner):
    run = tmp_path / "run"
    shutil.copytree(base.parent, run)
    before = (run / "latest.pt").read_bytes()
    res = runner.invoke(app, ["train", str(new_corpus), "--init-from", str(run / "latest.pt"), "--out", str(run),
                              "--force", "--max-steps", "3", "--batch-size", "4", "--seq-len", "16"])
    assert res.exit_code == 2 and "--force clears" in res.stderr
    assert (run / "latest.pt").read_bytes() == before


def test_fit_from_python_takes_the_model_from_the_checkpoint(base, new_corpus, tmp_path):
    """`charlm.fit` with `init_from` and the built-in default shape fine-tunes as the command
    line does: the model's settings are the checkpoint's (the library resolves them)."""
    import charlm

    cfg = charlm.RunConfig()
    cfg.train.init_from, cfg.train.batch_size, cfg.train.seq_len = str(base), 4, 16
    cfg.session.max_steps, cfg.session.preview_length = 3, 0
    result = charlm.fit(cfg, [str(new_corpus)], tmp_path / "ft")
    assert result.step == 3
    assert checkpoint.load(tmp_path / "ft" / "latest.pt").config.model == checkpoint.load(base).config.model
    # A shape the caller chose that disagrees is still refused, naming it.
    cfg.model.hidden_size = 48
    with pytest.raises(CharLMError, match="--hidden-size 48 \\(it has 32\\)"):
        charlm.fit(cfg, [str(new_corpus)], tmp_path / "other")
