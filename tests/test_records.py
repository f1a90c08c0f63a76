"""Records mode: records found by the rules, no state or gradient crossing from one record to
the next (with controls that show the checks would see it), whole held-out records, end
markers counted, whole records sampled, exact resume, and the bad inputs.
"""

from __future__ import annotations

import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_config
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.data.cache import encode_corpus
from charlm.data.record_batch import RecordBatcher, RecordRows
from charlm.data.records import END, START, find_records, split_text
from charlm.data.streams import model_vocab, training_data
from charlm.data.vocab import Vocab
from charlm.errors import CharLMError, TrainingInterrupted
from charlm.model.scoring import carry_on, evaluate_records, initial_state, record_bits, record_loss
from charlm.storage import checkpoint
from charlm.training import session
from charlm.training.events import Callbacks

CPU = torch.device("cpu")


def make_names(count: int = 600, seed: int = 0) -> list[str]:
    """A list of made-up names, 2 to 12 characters, each once, in no particular order."""
    rng = random.Random(seed)
    parts = ["an", "na", "ma", "ri", "el", "la", "jo", "hn", "be", "th", "ka", "te", "li", "so", "ar", "lo"]
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(parts) for _ in range(rng.randint(1, 6))).capitalize())
    return sorted(names, key=lambda _: rng.random())


NAMES = make_names()


def records_of(text: str, mode: str) -> list[str]:
    ids = Vocab("".join(sorted(set(text)))).encode(text).numpy().astype(np.uint8)
    starts, lengths = find_records(ids, "".join(sorted(set(text))), mode, chunk=5)  # records across chunks
    return [text[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.steps: list[list[float]] = []
        self.messages: list[str] = []

    def on_step(self, stats):
        self.steps.append([stats.step, stats.bpc])

    def on_message(self, text):
        self.messages.append(text)


@pytest.fixture(scope="module")
def names_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def names_run(names_file, _one_thread, _corpus_cache) -> Path:
    """A tiny records model trained on the names for 200 steps."""
    out = names_file.parent / "run"
    res = CliRunner().invoke(app, ["train", str(names_file), "--records", "lines", "--out", str(out),
                                   "--max-steps", "200", *TINY, "--eval-interval", "100", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    return out / "latest.pt"


# --- finding records ------------------------------------------------------------------------


def test_lines_are_records_blank_and_whitespace_lines_are_not():
    text = "Ann\nBob\r\n\n  \nCarol Smith\n\t\nDe\n"
    assert records_of(text, "lines") == ["Ann", "Bob", "Carol Smith", "De"]
    assert records_of("Ann\nBob", "lines") == ["Ann", "Bob"]  # no final line break
    assert records_of("\n\n", "lines") == []


def test_paragraphs_are_records_between_blank_lines():
    text = "One line.\nStill one.\n\n\n  \nTwo.\r\n\r\nThree\nends here"
    assert records_of(text, "blank-lines") == ["One line.\nStill one.", "Two.", "Three\nends here"]
    assert split_text(text, "blank-lines") == records_of(text, "blank-lines")
    assert records_of("no breaks at all", "blank-lines") == ["no breaks at all"]


def test_records_split_whole_records_last_ones_held_out(names_file):
    corpus = encode_corpus([str(names_file)])
    rs = training_data(corpus, model_vocab(corpus.vocab.chars, "lines"), "lines")
    split = rs.split(0.05)
    n_val = int(len(NAMES) * 0.05)
    assert [split.val.text(i, corpus.vocab) for i in range(split.val.count)] == NAMES[-n_val:]
    assert [split.train.text(i, corpus.vocab) for i in range(split.train.count)] == NAMES[:-n_val]
    # A pass scores every character and every end marker, never a start marker.
    assert len(split.val) == sum(len(n) + 1 for n in NAMES[-n_val:])


# --- no state or gradient crosses records ---------------------------------------------------


@pytest.fixture(scope="module")
def lm(names_run):
    return charlm.load(names_run)


def direct_bits(lm, record: str) -> float:
    """A record read alone, from a zero state: START + chars, targets chars + END."""
    ids = lm.vocab.encode(START + record + END)
    with torch.no_grad():
        logits, _ = lm.model(ids[None, :-1])
    return F.cross_entropy(logits[0], ids[1:], reduction="sum").item() / math.log(2)


def names_set(lm):
    corpus = lm.run_corpus()
    return corpus, training_data(corpus, lm.vocab, "lines")


def test_each_record_is_scored_as_if_read_alone_in_any_order_and_window(lm):
    corpus, rs = names_set(lm)
    sub = rs.subset(slice(0, 120))
    texts = [sub.text(i, corpus.vocab) for i in range(sub.count)]
    bits = record_bits(lm.model, sub, CPU)
    alone = np.array([direct_bits(lm, t) for t in texts])
    np.testing.assert_allclose(bits, alone, rtol=0, atol=1e-4)
    # Another order, other rows, windows shorter than most records (pieces carry the state):
    # every record's bits are the same.
    order = np.random.default_rng(1).permutation(sub.count)
    shuffled = record_bits(lm.model, sub.subset(order), CPU, window=3, max_rows=5)
    np.testing.assert_allclose(shuffled, bits[order], rtol=0, atol=1e-4)
    # Control: read as one stream (the state carried over from the records before), the
    # same records score differently.
    stream = lm.vocab.encode("".join(START + t + END for t in texts))
    with torch.no_grad():
        logits, _ = lm.model(stream[None, :-1])
    nats = F.cross_entropy(logits[0], stream[1:], reduction="none")
    first = len(texts[0]) + 2  # record 1's START in the stream
    crossing = nats[first:first + len(texts[1]) + 1].sum().item() / math.log(2)
    assert abs(crossing - bits[1]) > 1e-2


def test_training_windows_give_each_record_its_own_loss(lm):
    """The batches training uses: the loss of each record's positions equals the record read
    alone, whichever records share its row and window."""
    corpus, rs = names_set(lm)
    sub = rs.subset(slice(0, 60))
    batcher = RecordBatcher(sub, batch_size=4, seq_len=5, device=CPU)  # many records longer than 5
    lm.model.eval()
    per_record = np.zeros(sub.count)
    carry = lm.model.init_state(4, CPU)
    while not batcher.rows.done:
        batch = batcher.next()
        with torch.no_grad():
            logits, final = lm.model(batch.x, initial_state(batch, carry))
        nats = F.cross_entropy(logits.transpose(1, 2), batch.y, reduction="none") * batch.mask
        per_record += np.bincount(batch.record, weights=nats.sum(1).numpy() / math.log(2), minlength=sub.count)
        carry = carry_on(batch, final, carry)
    alone = [direct_bits(lm, sub.text(i, corpus.vocab)) for i in range(sub.count)]
    np.testing.assert_allclose(per_record, alone, rtol=0, atol=1e-4)


def test_no_gradient_crosses_from_one_record_to_the_next(lm):
    corpus, rs = names_set(lm)
    sub = rs.subset(slice(0, 3))  # one row holding three records
    texts = [sub.text(i, corpus.vocab) for i in range(3)]
    batch = RecordRows(sub, 1, window=100, device=CPU).next()
    assert batch.record.tolist() == [0, 1, 2]  # one batch row per record
    seen: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["embedded"] = output

    lm.model.eval()
    hook = lm.model.embed.register_forward_hook(keep)
    try:
        logits, _ = lm.model(batch.x, initial_state(batch, lm.model.init_state(1, CPU)))
        nats = F.cross_entropy(logits.transpose(1, 2), batch.y, reduction="none") * batch.mask
        nats[1].sum().backward()  # the second record's loss
        grad = seen["embedded"].grad.abs().sum(2)  # (records, positions)
        assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0)
        assert torch.all(grad[1][batch.mask[1]] > 0)
        # Control: the same three records read as one stream do pass gradient backwards.
        stream = lm.vocab.encode("".join(START + t + END for t in texts))
        logits, _ = lm.model(stream[None, :-1])
        first = len(texts[0]) + 2  # record 1 starts here
        nats = F.cross_entropy(logits[0], stream[1:], reduction="none")
        nats[first:first + len(texts[1]) + 1].sum().backward()
        assert seen["embedded"].grad[0, :first - 1].abs().sum() > 0
    finally:
        hook.remove()
        lm.model.zero_grad(set_to_none=True)


def test_evaluation_counts_end_markers_not_start_markers(lm):
    """A model whose output is uniform scores log2(V) bits for every character and end marker."""
    corpus, rs = names_set(lm)
    uniform = charlm.load(lm.path)
    with torch.no_grad():
        uniform.model.head.weight.zero_()
        uniform.model.head.bias.zero_()
    val = rs.split(0.05).val
    bpc, chars = evaluate_records(uniform.model, val, CPU)
    assert chars == sum(len(val.text(i, corpus.vocab)) + 1 for i in range(val.count))
    assert bpc == pytest.approx(math.log2(len(lm.vocab)), abs=1e-6)


def test_eval_reports_the_held_out_records(lm, names_run, runner):
    import json

    res = runner.invoke(app, ["eval", str(names_run), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    n_val = int(len(NAMES) * 0.05)
    assert data["chars"] == sum(len(n) + 1 for n in NAMES[-n_val:])
    assert data["bpc"] == pytest.approx(checkpoint.load(names_run).progress.last_val_bpc, abs=1e-9)


def test_a_training_batch_predicts_end_markers_never_start_markers(lm):
    _, rs = names_set(lm)
    sub = rs.subset(slice(0, 40))
    batcher = RecordBatcher(sub, batch_size=4, seq_len=16, device=CPU)
    batch = batcher.next()
    lm.model.eval()
    with torch.no_grad():
        loss, _ = record_loss(lm.model, batch, lm.model.init_state(4, CPU))
    real = batch.y[batch.mask]
    assert (real == rs.end_id).sum() == len(batch.record)  # every record of the window ends in it
    assert (real == rs.start_id).sum() == 0 and batch.chars <= 4 * 16
    # Whole records only (none of these names is longer than the window): the loss is the
    # mean over their characters and end markers, each record read alone.
    vocab = lm.run_corpus().vocab
    total = sum(direct_bits(lm, sub.text(int(i), vocab)) for i in batch.record) * math.log(2)
    assert batch.chars == sum(int(sub.lengths[i]) + 1 for i in batch.record)
    assert loss.item() == pytest.approx(total / batch.chars, abs=1e-5)


# --- sampling -------------------------------------------------------------------------------


def test_sample_prints_whole_records_one_per_line(names_run, runner):
    res = runner.invoke(app, ["sample", "-c", str(names_run), "--num-samples", "20", "--length", "60",
                              "--seed", "3", "--temperature", "0.8"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 21  # 20 records, each ended by a line break
    for line in lines[:-1]:
        assert START not in line and END not in line and "\n" not in line
        assert len(line) < 60  # ended by the end marker, not by --length


def test_each_record_starts_fresh_and_stops_at_the_end_marker(lm):
    """Greedy records equal a hand-run greedy decode from a zero state after START, stopped
    at END; a batch of them gives the same record in every row."""
    ids = [int(lm.vocab.encode(START)[0])]
    end = int(lm.vocab.encode(END)[0])
    state = None
    for _ in range(60):
        with torch.no_grad():
            logits, state = lm.model(torch.tensor([[ids[-1]]]), state)
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == end:
            break
    assert ids[-1] == end
    expected = lm.vocab.decode(ids[1:-1])
    got = lm.sample(num_samples=3, temperature=0.0, length=60)
    assert got == [expected] * 3
    primed = lm.sample(num_samples=4, temperature=0.8, length=60, prime="Ma", seed=5)
    assert len(primed) == 4 and all(END not in r for r in primed)


def test_prime_starts_each_record(names_run, runner):
    res = runner.invoke(app, ["sample", "-c", str(names_run), "--num-samples", "5", "--prime", "Jo",
                              "--seed", "1", "--length", "40"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("Jo") for line in lines)


def test_novelty_reports_how_many_records_are_real_names(names_run, runner):
    res = runner.invoke(app, ["sample", "-c", str(names_run), "--num-samples", "20", "--length", "60",
                              "--seed", "2", "--temperature", "0.5", "--novelty"])
    assert res.exit_code == 0, res.output
    records = res.stdout.splitlines()
    training = set(NAMES[:-int(len(NAMES) * 0.05)])  # the held-out names are not training text
    exact = sum(r in training for r in records)
    assert f"exact training records: {100 * exact / 20:.1f}% ({exact} of 20)" in res.stderr
    assert 0 < exact < 20  # a mix of remembered and new names


def test_stop_is_refused_for_a_records_model(names_run, runner):
    res = runner.invoke(app, ["sample", "-c", str(names_run), "--stop", "a"])
    assert res.exit_code == 2 and "--stop" in res.stderr and len(res.stderr.splitlines()) == 1


def test_blank_line_records_sample_paragraphs(tmp_path, runner):
    rng = random.Random(4)
    paragraphs = ["\n".join(" ".join(rng.choice(NAMES) for _ in range(rng.randint(2, 5)))
                            for _ in range(rng.randint(1, 3))) for _ in range(150)]
    corpus = tmp_path / "p.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    res = runner.invoke(app, ["train", str(corpus), "--records", "blank-lines", "--out", str(tmp_path / "run"),
                              "--max-steps", "60", *TINY])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "-c", str(tmp_path / "run" / "latest.pt"), "--num-samples", "3",
                              "--length", "400", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.endswith("\n") and res.stdout.count("\n\n") >= 2  # paragraphs between blank lines


# --- resume -----------------------------------------------------------------------------------


def records_config(total: int):
    return tiny_config(records="lines", num_layers=2, dropout=0.3, seq_len=8, batch_size=6, warmup_steps=5,
                       max_steps=total, eval_interval=5, precision="fp32", seed=11)


def test_records_run_resumes_bit_exactly(names_file, tmp_path):
    n, m = 12, 9  # passes of ~4.7k positions / (6 rows x 8): 97 windows, so no wrap here ...
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    first = Recorder()
    with pytest.raises(TrainingInterrupted):
        session.fit(records_config(n + m), [str(names_file)], stopped, callbacks=first,
                    pending_signal=lambda: signal.SIGINT if first.steps and first.steps[-1][0] >= n else 0)
    second = Recorder()
    session.resume(stopped / "latest.pt", {}, callbacks=second)
    whole = Recorder()
    session.fit(records_config(n + m), [str(names_file)], full, callbacks=whole)
    assert first.steps + second.steps == whole.steps and len(whole.steps) == n + m
    a, b = checkpoint.load(stopped / "latest.pt"), checkpoint.load(full / "latest.pt")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.progress.data == b.progress.data and a.config.train.records == "lines"


def test_records_batcher_wraps_to_a_new_pass_with_fresh_records(names_file):
    corpus = encode_corpus([str(names_file)])
    rs = training_data(corpus, model_vocab(corpus.vocab.chars, "lines"), "lines").split(0.05).train
    batcher = RecordBatcher(rs, batch_size=6, seq_len=8, device=CPU)
    first = batcher.next()
    read = np.bincount(first.record, weights=first.mask.sum(1).numpy(), minlength=rs.count)
    while not batcher.rows.done:
        batch = batcher.next()
        read += np.bincount(batch.record, weights=batch.mask.sum(1).numpy(), minlength=rs.count)
    # A pass reads every position of every training record once (long ones in pieces of 8).
    assert np.array_equal(read, rs.lengths + 1) and (rs.lengths + 1 > 8).any()
    again = batcher.next()
    assert batcher.epoch == 1 and torch.equal(again.y, first.y) and len(again.carried) == 0
    # A resume finds its place from the batch number alone.
    for _ in range(5):
        batcher.next()
    later = RecordBatcher(rs, batch_size=6, seq_len=8, device=CPU)
    later.load_state_dict(batcher.state_dict())
    assert torch.equal(later.next().x, batcher.next().x)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expect"), [
    ("one giant record without any line break " * 20, "holds 1 record"),
    ("Ann\nB\x02b\nCarol\n" * 20, "U+0002"),
    ("Ann\nB\x03b\nCarol\n" * 20, "U+0003"),
])
def test_bad_records_corpus_is_one_line_and_nothing_is_written(tmp_path, runner, text, expect):
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    res = runner.invoke(app, ["train", str(corpus), "--records", "lines", "--out", str(tmp_path / "run"),
                              "--max-steps", "5", *TINY])
    assert res.exit_code == 2
    assert res.stderr.startswith("charlm: error: --records lines: ") and expect in res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fewer_records_than_batch_rows_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Ann\nBob\nCarol\nDave\n", encoding="utf-8")
    with pytest.raises(CharLMError, match="fewer than the 4 rows"):
        session.fit(tiny_config(records="lines", max_steps=3), [str(corpus)], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_records_mode_names_the_flag(runner, names_file, tmp_path):
    res = runner.invoke(app, ["train", str(names_file), "--records", "words", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.stderr.startswith("charlm: error: --records: 'words' is not one of")


def test_records_longer_than_the_window_are_trained_in_pieces(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(NAMES[:200]) + "\n", encoding="utf-8")
    rec = Recorder()
    session.fit(tiny_config(records="lines", seq_len=4, max_steps=3), [str(corpus)], tmp_path / "run",
                callbacks=rec)
    note = next(m for m in rec.messages if m.startswith("records (lines)"))
    long = sum(len(n) + 1 > 4 for n in NAMES[:200][:-10])
    assert f"{long:,} training records are longer than --seq-len 4" in note


def test_novelty_reads_a_file_of_records(names_run, tmp_path, runner):
    listed = tmp_path / "some.txt"
    listed.write_text(f"{NAMES[0]}\n{NAMES[1]}\n\nZzyzx\n{NAMES[2]}\n{NAMES[-1]}\n", encoding="utf-8")
    res = runner.invoke(app, ["novelty", str(names_run), str(listed)])
    assert res.exit_code == 0, res.output
    # The last name is held out: not training text. Zzyzx is in no list.
    assert "exact training records: 60.0% (3 of 5)" in res.stdout
    assert "in 5 samples" in res.stdout


def test_a_records_model_s_default_passage_is_its_held_out_records(tmp_path, runner):
    """`charlm inspect` and `eval --by-char` read the run's held-out text by default; for a
    records model that is its held-out records, whole, as evaluation holds them out, never the
    corpus's last characters, which here lie inside training records."""
    import json

    train = [f"{name} and " * 8 for name in NAMES[:38]]  # long training records
    held = NAMES[38:40]  # the last 5 % of 40 records: two short ones
    corpus = tmp_path / "records.txt"
    corpus.write_text("\n".join(train + held) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus), "--records", "lines", "--out", str(out), "--max-steps", "2",
                              *TINY])
    assert res.exit_code == 0, res.output
    expected = "\n".join(held) + "\n"
    assert charlm.load(out / "latest.pt").held_out_text(5000) == expected
    res = runner.invoke(app, ["eval", str(out / "latest.pt"), "--by-char"])
    assert res.exit_code == 0, res.output
    assert "".join(json.loads(res.stdout)["characters"]) == expected
