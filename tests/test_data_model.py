"""Batch layout for truncated BPTT (data.py) and the CharRNN model (model.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from charlm.cli import app
from charlm.config.run import ModelConfig
from charlm.data.streams import StreamBatcher, split, translate
from charlm.device import cpu_has_fast_bf16
from charlm.errors import CharLMError
from charlm.model.network import CharRNN, detach_state, state_from_list, state_to_list
from charlm.model.scoring import eval_rows
from charlm.model.size import flops_per_char

CPU = torch.device("cpu")




# --- split --------------------------------------------------------------------------------


def test_split_holds_out_the_tail():
    ids = torch.arange(100, dtype=torch.uint8)
    s = split(ids, 0.1)
    assert s.train.tolist() == list(range(90))
    assert s.val.tolist() == list(range(90, 100))
    assert np.array_equal(np.concatenate([s.train, s.val]), ids.numpy())
    assert np.shares_memory(s.train, s.val.base if s.val.base is not None else s.val)  # views


def test_split_and_batches_read_a_memmap_without_copying_it(tmp_path):
    path = tmp_path / "ids"
    np.arange(1001, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r", shape=(1001,))
    s = split(ids, 0.1)
    assert isinstance(s.train, np.memmap) and isinstance(s.val, np.memmap)
    b = StreamBatcher(s.train, batch_size=3, seq_len=5, device=CPU)
    x, y, _ = b.next()
    assert x.dtype == torch.long and x[:, 0].tolist() == [0, 300, 600]
    assert torch.equal(y, x + 1)


def test_split_keeps_at_least_two_validation_chars():
    s = split(torch.arange(20), 0.01)
    assert s.val.tolist() == [18, 19] and len(s.train) == 18


def test_split_rejects_tiny_corpus():
    with pytest.raises(CharLMError, match="too small"):
        split(torch.arange(3), 0.05)


# --- StreamBatcher ------------------------------------------------------------------------


def test_batches_are_contiguous_streams_and_targets_are_shifted():
    ids = torch.randint(0, 50, (1001,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    B, T = 4, 8
    b = StreamBatcher(ids, batch_size=B, seq_len=T, device=CPU)
    stream_len = 1000 // B  # the last character is only a target
    assert b.stream_len == stream_len and b.chars_per_batch == B * T
    xs, ys = [], []
    for _ in range(stream_len // T):
        x, y, _reset = b.next()
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs, dim=1), torch.cat(ys, dim=1)  # (B, n*T)
    n = x_all.shape[1]
    for row in range(B):
        start = row * stream_len
        # Row b of batch k+1 continues row b of batch k: together they are one slice of text.
        assert x_all[row].tolist() == ids[start : start + n].long().tolist()
        # y is x shifted by one character.
        assert y_all[row].tolist() == ids[start + 1 : start + n + 1].long().tolist()


def test_reset_only_at_the_start_of_a_pass_and_wrap_around():
    ids = torch.arange(101)
    b = StreamBatcher(ids, batch_size=2, seq_len=8, device=CPU)  # streams of 50: 6 windows
    first_x, _, reset = b.next()
    assert reset and b.epoch == 0
    assert first_x[:, 0].tolist() == [0, 50]
    for k in range(1, 6):
        x, _, reset = b.next()
        assert not reset
        assert x[:, 0].tolist() == [8 * k, 50 + 8 * k]
    # Only 2 characters are left in each stream: the ragged tail is dropped, a new pass begins.
    x, _, reset = b.next()
    assert reset and b.epoch == 1
    assert torch.equal(x, first_x)
    _, _, reset = b.next()
    assert not reset


def test_position_is_saved_and_restored():
    ids = torch.arange(501)
    a = StreamBatcher(ids, batch_size=3, seq_len=7, device=CPU)
    for _ in range(30):  # past one wrap-around
        a.next()
    state = a.state_dict()
    assert state["epoch"] >= 1
    b = StreamBatcher(ids, batch_size=3, seq_len=7, device=CPU)
    b.load_state_dict(json.loads(json.dumps(state)))  # plain ints, as in a checkpoint
    for _ in range(10):
        xa, ya, ra = a.next()
        xb, yb, rb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ra == rb


def test_rows_pick_a_subset_of_the_same_streams():
    ids = torch.arange(801)
    whole = StreamBatcher(ids, batch_size=4, seq_len=10, device=CPU)
    halves = [StreamBatcher(ids, batch_size=4, seq_len=10, device=CPU, rows=range(r * 2, r * 2 + 2))
              for r in range(2)]
    for _ in range(25):  # across a wrap-around
        x, y, reset = whole.next()
        parts = [h.next() for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(p[2] == reset for p in parts)
    assert halves[0].chars_per_batch == 20


def test_seq_len_is_clipped_to_the_stream_and_short_text_is_rejected():
    b = StreamBatcher(torch.arange(21), batch_size=4, seq_len=100, device=CPU)
    x, y, _ = b.next()
    assert x.shape == y.shape == (4, 5)
    with pytest.raises(CharLMError, match="--batch-size"):
        StreamBatcher(torch.arange(4), batch_size=8, seq_len=4, device=CPU)


def test_eval_rows_cover_the_held_out_text():
    starts, length = eval_rows(10_000)
    assert starts.tolist() == [k * 625 for k in range(16)] and length == 625  # consecutive slices
    assert eval_rows(100)[0].tolist() == [0] and eval_rows(100)[1] == 100  # short text: one row


def test_eval_rows_cap_spreads_rows_over_the_held_out_text():
    starts, length = eval_rows(100_000, max_chars=8192)
    assert starts.tolist() == [k * 6250 for k in range(16)] and length == 512  # evenly spaced
    # A cap at or above the text's length scores all of it, as without one.
    assert eval_rows(10_000, max_chars=10_000)[1] == eval_rows(10_000)[1]


def test_translate_maps_and_drops_in_chunks():
    ids = np.array([0, 1, 2, 3, 2, 1, 0], dtype=np.uint8)
    table = np.array([5, -1, 0, 2])
    out, dropped = translate(ids, table, chunk=3)
    assert out.tolist() == [5, 0, 2, 0, 5] and dropped == 2 and out.dtype == np.uint8


# --- model --------------------------------------------------------------------------------


def make_model(cell: str, layers: int = 2, vocab: int = 11) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(cell=cell, num_layers=layers, hidden_size=12, embedding_size=5), vocab)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_output_and_state_shapes(cell):
    model = make_model(cell)
    idx = torch.randint(0, 11, (3, 7))
    logits, state = model(idx)
    assert logits.shape == (3, 7, 11)  # (B, T, V)
    tensors = state_to_list(state)
    assert len(tensors) == (2 if cell == "lstm" else 1)  # LSTM carries (h, c)
    assert all(t.shape == (2, 3, 12) for t in tensors)  # (layers, B, H)
    init = state_to_list(model.init_state(3))
    assert [t.shape for t in init] == [t.shape for t in tensors]
    assert all(not t.any() for t in init)
    # Feeding a state back in works and the state round-trips through a plain list.
    logits2, _ = model(idx, state_from_list(tensors, cell))
    assert logits2.shape == (3, 7, 11)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_evaluation_carries_each_row_s_state_from_chunk_to_chunk(cell):
    """Scored a few characters at a time, held-out text gets the bpc of one pass over each row:
    `evaluate` carries every row's state across its chunk boundaries."""
    import math

    import torch.nn.functional as F

    from charlm.model.scoring import evaluate

    model = make_model(cell).eval()
    ids = torch.randint(0, 11, (3000,), generator=torch.Generator().manual_seed(1))
    whole, n = evaluate(model, ids, CPU, chunk=4096)  # each row in one call
    pieces, m = evaluate(model, ids, CPU, chunk=7)
    assert n == m and pieces == pytest.approx(whole, abs=1e-5)  # (float32 sums in other orders)
    # Control: the same chunks, each read from a fresh state, score differently.
    starts, length = eval_rows(len(ids))
    rows = ids[torch.from_numpy(starts)[:, None] + torch.arange(length)]
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(rows[:, a:a + 7])[0].reshape(-1, 11), rows[:, a + 1:a + 8].reshape(-1),
                                   reduction="sum").item() for a in range(0, length - 1, 7)
                   if rows[:, a + 1:a + 8].shape[1] == 7)
    assert abs(nats / math.log(2) / (rows.shape[0] * ((length - 1) // 7) * 7) - whole) > 1e-4


def test_detach_state_cuts_the_graph():
    for cell in ("lstm", "gru"):
        model = make_model(cell)
        _, state = model(torch.randint(0, 11, (2, 4)))
        assert all(t.requires_grad for t in state_to_list(state))
        cut = detach_state(state)
        assert all(not t.requires_grad for t in state_to_list(cut))
        assert all(torch.equal(a, b) for a, b in zip(state_to_list(cut), state_to_list(state), strict=True))


def test_parameters_and_flops():
    lstm, gru, rnn = (make_model(c, layers=1) for c in ("lstm", "gru", "rnn"))
    assert lstm.num_parameters() > gru.num_parameters() > rnn.num_parameters() > 0
    f = {c: flops_per_char(ModelConfig(cell=c, num_layers=1, hidden_size=12, embedding_size=5), 11)
         for c in ("lstm", "gru", "rnn")}
    assert f["lstm"] > f["gru"] > f["rnn"] > 0


def test_dropout_only_between_layers():
    one = CharRNN(ModelConfig(num_layers=1, hidden_size=8, embedding_size=4, dropout=0.3), 5)
    two = CharRNN(ModelConfig(num_layers=2, hidden_size=8, embedding_size=4, dropout=0.3), 5)
    assert one.rnn.dropout == 0.0  # PyTorch warns about dropout on a single layer
    assert two.rnn.dropout == 0.3


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_train_and_sample_through_cli(cell, runner, corpus_file, tmp_path):
    out = tmp_path / cell
    res = runner.invoke(app, ["train", str(corpus_file), "--cell", cell, "--out", str(out),
                              "--max-steps", "12", *TINY])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(out / "latest.pt"), "--json"]).stdout)
    assert info["config"]["model"]["cell"] == cell and info["step"] == 12
    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "15", "--quiet"])
    assert res.exit_code == 0, res.output  # a GRU / RNN carried state (one tensor) resumes
    res = runner.invoke(app, ["sample", "-c", str(out / "latest.pt"), "--no-echo", "--length", "30",
                              "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout) == 31 and res.stdout.endswith("\n")


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="this CPU has no bf16 kernels (test_bf16_is_refused_where_the_cpu_has_none)"))])
def test_training_scores_held_out_text_in_its_own_precision(precision, runner, corpus_file, tmp_path, monkeypatch):
    from charlm.model import scoring as evaluate_module
    from charlm.training import trainer as train

    seen: list[torch.dtype | None] = []

    def watched(*args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return evaluate_module.score_held_out(*args, **kwargs)

    monkeypatch.setattr(train, "score_held_out", watched)
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "run"), "--max-steps", "10",
                              "--device", "cpu", "--precision", precision, *TINY])
    assert res.exit_code == 0, res.output
    assert seen == [None if precision == "fp32" else torch.bfloat16]
    # `charlm eval` scores in fp32, a hair from the bf16 score training recorded.
    info = json.loads(runner.invoke(app, ["eval", str(tmp_path / "run" / "best.pt"), "--json"]).stdout)
    recorded = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["val_bpc"]
    assert info["bpc"] == pytest.approx(recorded, abs=0 if precision == "fp32" else 0.02)


def test_bf16_is_refused_where_the_cpu_has_none(runner, corpus_file, tmp_path, monkeypatch):
    """Without AVX-512, oneDNN has no bf16 recurrent kernels: one line and exit 2 before
    anything is written, for a new run and for a resume (whose precision may change)."""
    from conftest import one_line_error

    from charlm import device

    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(corpus_file), "--out", str(out), "--max-steps", "4", *TINY]).exit_code == 0
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    one_line_error(runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "new"), "--precision",
                                       "bf16", *TINY]), "--precision bf16: this CPU has no bf16 kernels", "fp32")
    assert not (tmp_path / "new").exists()
    one_line_error(runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "8", "--precision", "bf16"]),
                   "--precision bf16: this CPU has no bf16 kernels")
    # auto takes fp32 there, and trains.
    res = runner.invoke(app, ["resume", str(out / "latest.pt"), "--max-steps", "8", "--quiet"])
    assert res.exit_code == 0, res.output
