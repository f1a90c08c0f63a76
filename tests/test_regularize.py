"""Weight drop and locked dropout (charlm.model.network): only in training, through the fused
kernel, training the raw weights; and dynamic evaluation (charlm.model.dynamic)."""

from __future__ import annotations

import copy
import json
import signal

import numpy as np
import pytest
import torch
from conftest import TEXT, TINY, one_line_error, tiny_config

import charlm
from charlm.cli import app
from charlm.config.run import ModelConfig
from charlm.errors import TrainingInterrupted
from charlm.model import dynamic
from charlm.model.network import CharRNN, drop_weight, locked_dropout, state_to_list
from charlm.storage import checkpoint
from charlm.training import session
from charlm.training.events import Callbacks

CELLS = ["lstm", "gru", "rnn"]


def model(cell: str = "lstm", **settings: float) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(cell=cell, num_layers=2, hidden_size=12, embedding_size=5, **settings), 11)


def idx(batch: int = 3, steps: int = 9) -> torch.Tensor:
    return torch.randint(0, 11, (batch, steps), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("cell", CELLS)
def test_regularizers_leave_the_weights_and_evaluation_as_they_are(cell):
    plain, reg = model(cell), model(cell, weight_drop=0.5, locked_dropout=0.3)
    assert reg.state_dict().keys() == plain.state_dict().keys()  # same checkpoint layout
    assert list(reg.parameters()) and sum(p.numel() for p in reg.parameters()) == plain.num_parameters()
    reg.load_state_dict(plain.state_dict())
    plain.eval(), reg.eval()
    with torch.no_grad():
        a, sa = plain(idx())
        b, sb = reg(idx())
    assert torch.equal(a, b)  # evaluation and sampling: no drop, the same multi-layer call
    assert all(torch.equal(x, y) for x, y in zip(state_to_list(sa), state_to_list(sb), strict=True))


@pytest.mark.parametrize("cell", CELLS)
def test_the_layer_by_layer_path_is_the_multi_layer_call_when_nothing_is_dropped(cell):
    """Control for the path itself: with weight drop 0 (locked dropout set but 1e-9, so the
    path runs and drops nothing) it computes what nn.LSTM's multi-layer call computes."""
    plain, reg = model(cell), model(cell, locked_dropout=1e-9)
    reg.load_state_dict(plain.state_dict())
    state = plain.init_state(3)
    state = tuple(torch.randn_like(t) for t in state) if isinstance(state, tuple) else torch.randn_like(state)
    a, sa = plain.train()(idx(), state)
    b, sb = reg.train()(idx(), state)
    assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(state_to_list(sa), state_to_list(sb), strict=True))


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_trains_the_raw_recurrent_weights_and_never_drops_them(cell):
    net = model(cell, weight_drop=0.5).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    logits, _ = net(idx())
    first = logits.detach().clone()
    # The trained weights themselves are never dropped: the forward left them as they were.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not torch.equal(first, net(idx())[0].detach())  # a new mask each batch
    logits.sum().backward()
    for k in range(2):
        grad = getattr(net.rnn, f"weight_hh_l{k}").grad
        assert grad is not None and grad.abs().sum() > 0, k  # the gradient reaches the raw weight
        # ... through the drop: the entries the mask dropped got no gradient this batch.
        assert (grad == 0).float().mean() > 0.2
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    assert not torch.equal(before["rnn.weight_hh_l0"], net.rnn.weight_hh_l0)


def test_weight_drop_keeps_the_fused_kernel():
    """oneDNN's LSTM runs with weight drop and locked dropout as without them (one
    `mkldnn_rnn_layer` per layer, not a Python loop over time steps)."""
    from torch.profiler import ProfilerActivity, profile

    def ops(net: CharRNN) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net.train()(idx(steps=20))[0].sum().backward()
        return {e.key: e.count for e in prof.key_averages()}

    plain, reg = ops(model()), ops(model(weight_drop=0.5, locked_dropout=0.2))
    if "aten::mkldnn_rnn_layer" not in plain:
        pytest.skip("this PyTorch build runs the LSTM without oneDNN")
    assert reg["aten::mkldnn_rnn_layer"] == plain["aten::mkldnn_rnn_layer"] == 2
    assert "aten::lstm_cell" not in reg and "aten::_thnn_fused_lstm_cell" not in reg


def test_a_model_moved_after_it_was_built_still_trains_its_own_weights():
    """pytorch #32929: a wrapper that keeps its own copy of the weight loses it on `.to()`.
    Here the module's parameters are the weights: moved (to float64), they still train."""
    net = model(weight_drop=0.5, locked_dropout=0.2).to(torch.float64).train()
    net(idx())[0].sum().backward()
    assert net.rnn.weight_hh_l1.dtype == torch.float64 and net.rnn.weight_hh_l1.grad is not None
    copied = copy.deepcopy(net)  # the weight average deep-copies the model
    copied.zero_grad()
    copied(idx())[0].sum().backward()
    assert copied.rnn.weight_hh_l0.grad is not None and copied.rnn.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_drop_weight_drops_its_share_scales_the_rest_and_passes_gradients_through_them(p):
    torch.manual_seed(0)
    w = torch.randn(512, 256, requires_grad=True)
    dropped = drop_weight(w, p)
    kept = dropped != 0
    assert abs((~kept).float().mean().item() - p) < 0.005  # 131,072 entries: the share is p
    assert torch.allclose(dropped[kept], w.detach()[kept] / (1 - p))
    dropped.sum().backward()
    assert torch.equal(w.grad, kept.float() / (1 - p))  # the trained weight learns through the mask
    assert not torch.equal(drop_weight(w, p) != 0, kept)  # a new mask each call
    assert drop_weight(w, 0.0) is w


def test_locked_dropout_uses_one_mask_for_every_time_step():
    torch.manual_seed(1)
    x = torch.ones(4, 25, 30)
    y = locked_dropout(x, 0.5)
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same at every step
    assert not torch.equal(y[0], y[1])  # one mask per sequence
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert locked_dropout(x, 0.0) is x


def test_runs_with_the_regularizers_resume_exactly_and_old_configs_load_as_none(corpus_file, tmp_path):
    class Steps(Callbacks):
        def __init__(self) -> None:
            self.bpc: list[float] = []

        def on_step(self, stats):  # type: ignore[no-untyped-def]
            self.bpc.append(stats.bpc)

    def cfg():  # type: ignore[no-untyped-def]
        return tiny_config(num_layers=2, weight_drop=0.4, locked_dropout=0.2, max_steps=16, eval_interval=5,
                           precision="fp32", seed=3)

    first = Steps()
    with pytest.raises(TrainingInterrupted):
        session.fit(cfg(), [str(corpus_file)], tmp_path / "a", callbacks=first,
                    pending_signal=lambda: signal.SIGINT if len(first.bpc) >= 7 else 0)
    second = Steps()
    session.resume(tmp_path / "a" / "latest.pt", {}, callbacks=second)
    whole = Steps()
    session.fit(cfg(), [str(corpus_file)], tmp_path / "b", callbacks=whole)
    assert first.bpc + second.bpc == whole.bpc  # the masks' RNG is restored with the rest
    ck = checkpoint.load(tmp_path / "b" / "latest.pt")
    assert ck.config.model.weight_drop == 0.4 and ck.config.model.locked_dropout == 0.2
    # A config saved before these settings existed: they load as "none".
    old = ck.config.to_dict()
    del old["model"]["weight_drop"], old["model"]["locked_dropout"]
    assert type(ck.config).from_dict(old).model.weight_drop == 0.0


def test_the_flags_train_and_are_validated(runner, corpus_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(out), "--max-steps", "6", "--num-layers", "2",
                              "--weight-drop", "0.3", "--locked-dropout", "0.1", *TINY])
    assert res.exit_code == 0, res.output
    assert "weight_drop = 0.3" in (out / "config.toml").read_text()
    res = runner.invoke(app, ["train", str(corpus_file), "--out", str(tmp_path / "bad"), "--weight-drop", "1",
                              *TINY])
    one_line_error(res, "--weight-drop", "[0, 1)")


# --- dynamic evaluation ------------------------------------------------------------------


def text_ids(lm: charlm.CharLM, repeats: int = 1) -> np.ndarray:
    return lm.vocab.encode(TEXT[:3000] * repeats).numpy()


def test_dynamic_scoring_without_a_step_is_the_static_score(lm):
    """Control for the layout: with a step size and decay of 0 nothing adapts, and the
    dynamic pass scores what the static pass scores."""
    ids = text_ids(lm)
    rms = dynamic.gradient_rms(lm.model, ids[:500], lm.device)
    static, n = dynamic.static_bits(lm.model, ids, lm.device)
    still, m = dynamic.dynamic_bits(lm.model, ids, lm.device, rms, lr=0.0, decay=0.0)
    assert n == m == len(ids) - 1
    assert still == pytest.approx(static, abs=1e-5)


def test_dynamic_evaluation_adapts_to_the_text_and_leaves_the_model_alone(lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = text_ids(lm, repeats=2)  # text that repeats: a model that learns while reading gains
    result = dynamic.dynamic_evaluate(lm.model, ids, lm.device, lr=1e-3, decay=0.0)
    assert result.dynamic_bpc < result.static_bpc - 0.05
    assert result.chars == len(ids) - result.tune_chars - 1 and result.tune_chars == 1500
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # bit-identical
    assert not lm.model.training


def test_tuning_picks_the_grid_point_that_scores_lowest(lm, monkeypatch):
    ids = text_ids(lm)[:800]
    rms = dynamic.gradient_rms(lm.model, ids, lm.device)
    monkeypatch.setattr(dynamic, "LR_GRID", (0.0, 1e-3))
    monkeypatch.setattr(dynamic, "DECAY_GRID", (0.0,))
    scores = {lr: dynamic.dynamic_bits(lm.model, ids, lm.device, rms, lr, 0.0)[0] for lr in (0.0, 1e-3)}
    assert dynamic.tune(lm.model, ids, lm.device, rms) == (min(scores, key=scores.__getitem__), 0.0)


def test_eval_dynamic_on_the_command_line(runner, ckpt):
    res = runner.invoke(app, ["eval", str(ckpt), "--dynamic", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["lr"] in dynamic.LR_GRID and got["decay"] in dynamic.DECAY_GRID
    assert got["chars"] > 0 and got["tune_chars"] >= dynamic.MIN_CHARS and got["seconds"] >= 0
    # With the step size given, nothing is tuned: a step of 0 is the static score.
    res = runner.invoke(app, ["eval", str(ckpt), "--dynamic", "--dynamic-lr", "0", "--dynamic-decay", "0", "--json"])
    fixed = json.loads(res.stdout)
    assert fixed["lr"] == 0.0 and fixed["dynamic_bpc"] == pytest.approx(fixed["static_bpc"], abs=1e-5)
    res = runner.invoke(app, ["eval", str(ckpt), "--dynamic"])
    assert "dynamic bpc" in res.stdout and "static bpc" in res.stdout
    one_line_error(runner.invoke(app, ["eval", str(ckpt), "--dynamic-lr", "0.1"]), "--dynamic")


STYLE = "on the hill the rain is gone, the sun is in the sea.\n"  # words and rhythm unlike the training text


def test_adapting_to_a_prime_fits_its_style_and_leaves_the_loaded_model_bit_identical(lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    copy_of = lm.adapted(STYLE * 8)
    assert copy_of.adaptation is not None and copy_of.adaptation["chars"] == len(STYLE) * 8
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # never changed
    assert any(not torch.equal(before[k], v) for k, v in copy_of.model.state_dict().items())
    # What the adapted copy learned: the style reads cheaper to it than to the loaded model.
    ids = lm.vocab.encode(STYLE * 3).numpy()
    adapted_bpc, loaded_bpc = (dynamic.static_bits(m, ids, lm.device)[0] for m in (copy_of.model, lm.model))
    assert adapted_bpc < loaded_bpc - 0.1
    # Sampling with --adapt through the API leaves the loaded model as it was, too.
    lm.sample(prime=STYLE * 4, length=40, seed=1, adapt=True)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert lm.sample(prime=STYLE, length=40, seed=1, adapt=True) != lm.sample(prime=STYLE, length=40, seed=1)


def test_sample_adapt_on_the_command_line(runner, ckpt, tmp_path):
    prime = tmp_path / "poem.txt"
    prime.write_text(STYLE * 4, encoding="utf-8")
    res = runner.invoke(app, ["sample", "-c", str(ckpt), "--prime-file", str(prime), "--adapt", "-n", "30",
                              "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(STYLE * 4) and len(res.stdout) >= len(STYLE) * 4 + 30
    assert f"adapted a copy of the model to the prime's {len(STYLE) * 4:,} characters" in res.stderr
    one_line_error(runner.invoke(app, ["sample", "-c", str(ckpt), "--adapt"]), "--adapt", "--prime")


def test_a_long_prime_adapts_on_its_last_characters(lm, monkeypatch):
    monkeypatch.setattr(dynamic, "ADAPT_MAX_CHARS", 300)
    got = lm.adapted(STYLE * 20)
    assert got.adaptation == {**got.adaptation, "chars": 300, "prime_chars": len(STYLE) * 20}
