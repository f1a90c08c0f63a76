"""Sampling: each control checked against the model's own logits, seeds, the CLI's output
format and errors, streaming into a closed pipe, and the fast stepper against nn.LSTM/GRU/RNN.

One tiny checkpoint is trained once for the module. Per-step checks replay the emitted text
through `model(x, state)` (the plain nn.LSTM forward) and look at that step's logits.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import charlm_cmd, subprocess_env

from charlm.cli import main
from charlm.config.run import ModelConfig
from charlm.config.sampling import SampleOptions
from charlm.data.vocab import Vocab
from charlm.generation.batch import _read
from charlm.generation.sampler import Sampler
from charlm.generation.stepper import Stepper
from charlm.model.network import CharRNN

PRIME = "The state of "




def replay_logits(lm, prime: str, text: str) -> torch.Tensor:
    """Logits (len(text), V) the plain model gives before each character of `text`."""
    ids = lm.vocab.encode(prime + text)
    with torch.no_grad():
        logits, _ = lm.model(ids[None], None)  # (1, P+T, V)
    return logits[0, len(prime) - 1:len(prime) - 1 + len(text)]


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """The real entry point (`charlm.cli.main`) in-process: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["charlm", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


# --- each control against the model's own logits -----------------------------------------


def test_greedy_is_argmax_step_by_step(lm):
    text = lm.sample(length=150, temperature=0, prime=PRIME)
    assert len(text) == 150
    # A manual loop: nn.LSTM one character at a time, argmax, carry the state.
    x, state, manual = lm.vocab.encode(PRIME)[None], None, []
    with torch.no_grad():
        for _ in range(150):
            logits, state = lm.model(x, state)
            i = int(logits[0, -1].argmax())
            manual.append(lm.vocab.chars[i])
            x = torch.tensor([[i]])
    assert text == "".join(manual)


def test_top_k_never_leaves_the_top_k(lm):
    k = 2
    text = lm.sample(length=400, temperature=1.5, top_k=k, prime=PRIME, seed=3)
    logits = replay_logits(lm, PRIME, text)
    ids = lm.vocab.encode(text)
    picked = logits.gather(1, ids[:, None])  # (T, 1)
    above = (logits > picked + 1e-5).sum(dim=1)  # characters clearly more likely than the pick
    assert int(above.max()) < k
    # The check has teeth: without top-k the same settings often leave the top 2.
    free = lm.sample(length=400, temperature=1.5, prime=PRIME, seed=3)
    logits = replay_logits(lm, PRIME, free)
    picked = logits.gather(1, lm.vocab.encode(free)[:, None])
    assert int(((logits > picked + 1e-5).sum(dim=1) >= k).sum()) > 20
    assert len(set(text)) > 2  # not stuck on one or two characters


def test_top_p_keeps_only_the_nucleus(lm):
    p, t = 0.6, 1.2
    text = lm.sample(length=400, temperature=t, top_p=p, prime=PRIME, seed=4)
    probs = torch.softmax(replay_logits(lm, PRIME, text) / t, dim=-1)
    picked = probs.gather(1, lm.vocab.encode(text)[:, None])  # (T, 1)
    # Mass of the characters more likely than the pick: below p, or it is outside the nucleus.
    before = torch.where(probs > picked + 1e-6, probs, 0.0).sum(dim=1)
    assert float(before.max()) < p + 1e-5
    free = lm.sample(length=400, temperature=t, prime=PRIME, seed=4)
    probs = torch.softmax(replay_logits(lm, PRIME, free) / t, dim=-1)
    picked = probs.gather(1, lm.vocab.encode(free)[:, None])
    assert int((torch.where(probs > picked, probs, 0.0).sum(dim=1) >= p).sum()) > 10


def test_top_k_and_top_p_combine(lm):
    text = lm.sample(length=300, temperature=1.5, top_k=3, top_p=0.5, prime=PRIME, seed=5)
    logits = replay_logits(lm, PRIME, text)
    picked = logits.gather(1, lm.vocab.encode(text)[:, None])
    assert int((logits > picked + 1e-5).sum(dim=1).max()) < 3


def test_temperature_draws_from_softmax_of_logits_over_t(lm):
    """One step for 50000 rows of one batch: frequencies match softmax(logits / T)."""
    t, n = 0.5, 50000
    rows = lm.sample(num_samples=n, length=1, temperature=t, prime=PRIME, seed=11)
    counts = torch.zeros(len(lm.vocab))
    for ch in rows:
        counts[lm.vocab.chars.index(ch)] += 1
    with torch.no_grad():
        logits, _ = lm.model(lm.vocab.encode(PRIME)[None], None)
    probs = torch.softmax(logits[0, -1] / t, dim=-1)
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731  (total variation)
    assert tv(counts / n, probs) < 0.025  # about 0.01 expected from sampling noise
    # The check has teeth: T = 1, or logits without the output bias, are further away.
    assert tv(probs, torch.softmax(logits[0, -1], dim=-1)) > 0.04
    assert tv(probs, torch.softmax((logits[0, -1] - lm.model.head.bias.detach()) / t, dim=-1)) > 0.04


def test_tiny_temperature_is_greedy(lm):
    greedy = lm.sample(length=60, temperature=0, prime=PRIME)
    assert lm.sample(length=60, temperature=1e-6, prime=PRIME, seed=1) == greedy
    assert lm.sample(length=60, temperature=1e-300, prime=PRIME, seed=1) == greedy  # 1/T overflows


# --- seeds, streaming API, RNG hygiene ------------------------------------------------------


def test_seeds_reproduce_and_differ(lm):
    a = lm.sample(length=120, temperature=1.0, seed=7)
    assert a == lm.sample(length=120, temperature=1.0, seed=7)
    assert a != lm.sample(length=120, temperature=1.0, seed=8)
    batch = lm.sample(num_samples=4, length=80, seed=7, top_k=5)
    assert batch == lm.sample(num_samples=4, length=80, seed=7, top_k=5)
    assert len(set(batch)) == 4  # rows of one batch are independent samples


def test_stream_is_an_iterator_of_the_same_text(lm):
    it = lm.stream(length=50, temperature=0.7, seed=2, prime=PRIME)
    first = next(it)
    assert isinstance(first, str) and len(first) == 1
    assert first + "".join(it) == lm.sample(length=50, temperature=0.7, seed=2, prime=PRIME)
    steps = list(lm.stream_batch(SampleOptions(num_samples=3, length=10, seed=2)))
    assert len(steps) == 10 and all(len(s) == 3 for s in steps)


def test_sampling_leaves_global_rng_and_mode_alone(lm):
    """Training previews sample mid-run: the global RNG and train/eval mode must not change."""
    sampler = Sampler(lm.model, lm.vocab)
    lm.model.train()
    try:
        before = torch.get_rng_state()
        "".join(sampler.generate(SampleOptions(length=30, temperature=1.0, seed=1, top_p=0.9, prime=PRIME)))
        "".join(sampler.generate(SampleOptions(length=30, temperature=0.5)))  # no seed: from os.urandom
        assert torch.equal(before, torch.get_rng_state())
        assert lm.model.training
    finally:
        lm.model.eval()


def test_stop_ends_each_sample(lm):
    text = lm.sample(length=300, temperature=0.8, seed=1, stop=" ", prime=PRIME)
    assert text.endswith(" ") and text.count(" ") == 1
    rows = lm.sample(num_samples=6, length=300, temperature=0.8, seed=1, stop=" ")
    stopped = [row for row in rows if len(row) < 300]
    for row in rows:  # each row stops at its own first " ", or runs to the length
        assert row.find(" ") == len(row) - 1 if row in stopped else " " not in row
    assert len(stopped) > 0 and len({len(r) for r in stopped}) > 1


def test_length_zero_and_no_prime(lm):
    assert lm.sample(length=0, prime=PRIME) == ""
    assert len(lm.sample(length=5, seed=1)) == 5


# --- the fast stepper is the model's math ----------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stepper_matches_the_model(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, num_layers=3, hidden_size=48, embedding_size=12), 40).eval()
    vocab = Vocab("".join(chr(48 + i) for i in range(40)))
    ids = torch.randint(0, 40, (2, 60))  # two rows of inputs
    with torch.inference_mode():
        want, _ = model(ids, None)  # (2, 60, V) through nn.LSTM / GRU / RNN
        _, state = model(ids[:, :20], None)
        stepper = Stepper(model, 2, torch.device("cpu"))
        stepper.set_state(state)
        got = []
        for t in range(20, 60):
            stepper.step(ids[:, t].contiguous())
            got.append(torch.addmm(stepper.head_b, stepper.top, stepper.head_w))
    torch.testing.assert_close(torch.stack(got, 1), want[:, 20:], atol=2e-5, rtol=1e-4)
    # A long prime is read a chunk at a time: same state as one pass.
    with torch.inference_mode():
        chunked = _read(model, ids[0].tolist(), torch.device("cpu"), chunk=7)
        _, whole = model(ids[:1], None)
    for a, b in zip(chunked if cell == "lstm" else [chunked], whole if cell == "lstm" else [whole], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Greedy text equals the plain loop's greedy text.
    text = "".join(Sampler(model, vocab).generate(SampleOptions(length=120, temperature=0, prime="0123")))
    x, st, manual = vocab.encode("0123")[None], None, []
    with torch.no_grad():
        for _ in range(120):
            logits, st = model(x, st)
            i = int(logits[0, -1].argmax())
            manual.append(vocab.chars[i])
            x = torch.tensor([[i]])
    assert text == "".join(manual)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_seed_reproduces_and_matches_the_api(capsys, monkeypatch, ckpt, lm):
    args = ("sample", "-c", ckpt, "--length", "80", "--seed", "9", "--prime", PRIME, "-t", "0.9")
    code, a, _ = run_cli(capsys, monkeypatch, *args)
    assert code == 0
    assert run_cli(capsys, monkeypatch, *args)[1] == a
    assert a == PRIME + lm.sample(length=80, seed=9, prime=PRIME, temperature=0.9) + "\n"
    other = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, "--length", "80", "--seed", "10",
                    "--prime", PRIME, "-t", "0.9")[1]
    assert other != a


def test_cli_greedy(capsys, monkeypatch, ckpt, lm):
    code, out, _ = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, "-t", "0", "--length", "50",
                           "--no-echo", "--prime", PRIME)
    assert code == 0 and out == lm.sample(length=50, temperature=0, prime=PRIME) + "\n"


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["-t", "-0.5"], "--temperature"), (["-t", "nan"], "--temperature"), (["-t", "inf"], "--temperature"),
     (["-t", "0.5,-1"], "--temperature"), (["-t", "warm"], "--temperature"),
     (["--top-k", "-1"], "--top-k"), (["--top-k", "two"], "--top-k"),
     (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
     (["--length", "-1"], "--length"), (["--num-samples", "0"], "--num-samples"),
     (["--seed", "-3"], "--seed"), (["--unknown", "maybe"], "--unknown"),
     (["--prime", "snow ☃ and ♫"], "'☃' '♫'"), (["--prime-file", "/nonexistent/prime.txt"], "--prime-file")],
)
def test_cli_bad_values_exit_2_with_one_line(capsys, monkeypatch, ckpt, args, flag):
    code, out, err = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, *args)
    assert code == 2
    assert out == ""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], lines[0]


def test_cli_unknown_skip_warns_on_stderr(capsys, monkeypatch, ckpt):
    code, out, err = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, "--prime", "The ☃ state",
                             "--unknown", "skip", "--length", "10", "--seed", "1")
    assert code == 0
    assert out.startswith("The  state") and len(out) == len("The  state") + 10 + 1
    assert "warning" in err and "☃" in err and len(err.splitlines()) == 1


def test_cli_echo_no_echo_and_length(capsys, monkeypatch, ckpt):
    base = ("sample", "-c", ckpt, "--prime", PRIME, "--length", "33", "--seed", "4")
    code, echoed, _ = run_cli(capsys, monkeypatch, *base)
    assert code == 0 and echoed.startswith(PRIME) and len(echoed) == len(PRIME) + 33 + 1
    code, bare, _ = run_cli(capsys, monkeypatch, *base, "--no-echo")
    assert code == 0 and PRIME + bare == echoed


def test_cli_prime_file(capsys, monkeypatch, ckpt, tmp_path):
    prime = "Mr. Speaker,\nWe meet "
    path = tmp_path / "prime.txt"
    path.write_text(prime, encoding="utf-8")
    args = ("sample", "-c", ckpt, "--length", "40", "--seed", "2")
    from_file = run_cli(capsys, monkeypatch, *args, "--prime-file", path)[1]
    assert from_file == run_cli(capsys, monkeypatch, *args, "--prime", prime)[1]
    assert from_file.startswith(prime)


def test_cli_num_samples_one_batch_labelled(capsys, monkeypatch, ckpt, lm):
    calls = []
    real = Sampler.generate_batch

    def spy(self, opts):
        calls.append(opts.num_samples)
        return real(self, opts)

    monkeypatch.setattr(Sampler, "generate_batch", spy)
    args = ("sample", "-c", ckpt, "--num-samples", "3", "--length", "30", "--seed", "6", "--prime", PRIME)
    code, out, _ = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and calls == [3]  # one batch, not three runs
    parts = re.split(r"^--- sample (\d)/3 ---\n", out, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["1", "2", "3"]
    texts = [p[:-1] for p in parts[2::2]]
    assert all(p.endswith("\n") for p in parts[2::2])
    assert [t[len(PRIME):] for t in texts] == lm.sample(num_samples=3, length=30, seed=6, prime=PRIME)
    assert all(t.startswith(PRIME) and len(t) == len(PRIME) + 30 for t in texts)
    assert run_cli(capsys, monkeypatch, *args)[1] == out


def test_cli_stop_and_temperature_list(capsys, monkeypatch, ckpt):
    code, out, _ = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, "--no-echo", "--stop", "e",
                           "--length", "500", "--seed", "1", "-t", "0.8")
    assert code == 0 and out.endswith("e\n") and out.count("e") == 1
    code, out, _ = run_cli(capsys, monkeypatch, "sample", "-c", ckpt, "-t", "0,1.5", "--length", "20",
                           "--seed", "1", "--no-echo")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "=== temperature 0 ===" and lines[2] == "=== temperature 1.5 ==="
    assert len(lines) == 4 and len(lines[1]) == 20 and len(lines[3]) == 20


# --- streaming into a pipe that closes --------------------------------------------------------


def test_stream_into_head_stops_promptly(ckpt):
    """`charlm sample --length 200000 | head -c 100`: the first bytes come while the model is
    still generating; closing the pipe ends the process at once, exit 0, nothing on stderr."""
    start = time.monotonic()
    proc = subprocess.Popen([*charlm_cmd(), "sample", "-c", str(ckpt), "--length", "200000",
                             "--seed", "1", "--no-echo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    try:
        head = proc.stdout.read(100)
        proc.stdout.close()
        rc = proc.wait(timeout=20)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    assert len(head) == 100
    assert rc == 0, err
    assert err == ""
    assert time.monotonic() - start < 20  # 200000 characters would take far longer


def test_shell_pipe_to_head(ckpt):
    cmd = " ".join([*charlm_cmd(), "sample", "-c", f"'{ckpt}'", "--length", "200000", "--seed", "2"])
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 100"], capture_output=True,
                         env=subprocess_env(), timeout=30)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout) == 100 and res.stderr == b""
