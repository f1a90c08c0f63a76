"""Sampling throughput at the default shape: charlm's sampler vs a plain PyTorch loop.

    python benchmarks/sample_speed.py [--checkpoint FILE] [--rounds 5] [--threads N] [--startup]

Prints JSON with, measured in one run and interleaved round by round (other work on the
machine then slows all three alike):
- plain: what a user would write, one character per call: `model(x, state)` with x of
  shape (1, 1), softmax, `torch.multinomial`, `.item()` (under `torch.no_grad`);
- single: charlm's one-stream sampler (`Sampler.generate`), chars/s;
- batch: charlm's `--num-samples 64` path (`Sampler.generate_batch` with 64 rows), chars/s summed
  over the 64 rows;
the medians over rounds, the median per-round ratios single/plain and batch/single, and
for context the GFLOP/s the batch reaches and an fp32 matrix-product peak measured at the
batch's own largest shape: batch/single cannot exceed peak / (forward FLOPs per char x
single chars/s), whatever the sampler does.

The model is the default `ModelConfig()` (2-layer LSTM, hidden 256, embedding 64) with
random weights and 96 characters (State of the Union's vocabulary size), or a checkpoint.
`--startup` also times cold processes: `charlm --help` and `charlm sample --length 1` on a
default-shape checkpoint (trained one step in a temporary folder unless --checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from charlm.config.run import ModelConfig
from charlm.config.sampling import SampleOptions
from charlm.data.vocab import Vocab
from charlm.generation.sampler import Sampler
from charlm.model.network import CharRNN
from charlm.model.size import flops_per_char

VOCAB = 96  # State of the Union has 96 distinct characters
TARGETS = {"single_over_plain": 2.0, "batch_over_single": 20.0}


@torch.no_grad()
def plain_loop(model: CharRNN, first_id: int, n: int, temperature: float = 1.0) -> float:
    """chars/s of the loop a user would write: one model call per character."""
    torch.manual_seed(0)
    x = torch.tensor([[first_id]])
    state = None
    start = time.perf_counter()
    for _ in range(n):
        logits, state = model(x, state)  # (1, 1, V)
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        i = torch.multinomial(probs, 1).item()
        x = torch.tensor([[i]])
    return n / (time.perf_counter() - start)


def charlm_rate(sampler: Sampler, rows: int, steps: int, seed: int) -> float:
    """chars/s of charlm's sampler: one stream (rows=1) or one batch of `rows` streams."""
    start = time.perf_counter()
    chars = 0
    if rows == 1:
        for _ in sampler.generate(SampleOptions(length=steps, temperature=1.0, seed=seed)):
            chars += 1
    else:
        for out in sampler.generate_batch(SampleOptions(num_samples=rows, length=steps, temperature=1.0, seed=seed)):
            chars += len(out)
    return chars / (time.perf_counter() - start)


def matmul_peak(m: int, k: int, n: int, seconds: float = 0.3) -> float:
    """Best GFLOP/s of an (m, k) @ (k, n) fp32 product over a few timed repetitions."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(a, b, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b, out=out)
        best = max(best, 2 * m * k * n * 20 / (time.perf_counter() - t) / 1e9)
    return best


def startup_times(checkpoint: Path | None, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of cold `charlm --help` and `charlm sample --length 1`."""
    script = Path(sys.executable).with_name("charlm")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "charlm"]
    env = dict(os.environ, CHARLM_NO_DOWNLOAD="1")
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            corpus = Path(tmp) / "text.txt"
            corpus.write_text("".join(chr(32 + i % 95) for i in range(20000)), encoding="utf-8")
            subprocess.run([*cmd, "train", str(corpus), "--out", f"{tmp}/run", "--max-steps", "1",
                            "--batch-size", "2", "--seq-len", "16", "--no-preview", "--quiet"],
                           check=True, env=env, capture_output=True)
            checkpoint = Path(tmp) / "run" / "latest.pt"
        result = {}
        for name, args in (("help_s", ["--help"]),
                           ("sample_length1_s", ["sample", "-c", str(checkpoint), "--length", "1"])):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                subprocess.run([*cmd, *args], check=True, env=env, capture_output=True)
                times.append(time.perf_counter() - t)
            result[name] = round(statistics.median(times), 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="sample from this checkpoint instead")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    p.add_argument("--plain-chars", type=int, default=500)
    p.add_argument("--single-chars", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64, help="rows of the batched measurement")
    p.add_argument("--batch-steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--startup", action="store_true", help="also time cold CLI processes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        from charlm.api import load

        lm = load(args.checkpoint)
        model, vocab, cfg = lm.model, lm.vocab, lm.config.model
    else:
        cfg = ModelConfig()
        torch.manual_seed(0)
        model = CharRNN(cfg, VOCAB)
        vocab = Vocab("".join(chr(32 + i) for i in range(VOCAB)))
    model.eval()
    sampler = Sampler(model, vocab)
    first = vocab.chars.index("\n") if "\n" in vocab else 0

    # Warm up every path once (allocator, kernels, oneDNN primitives).
    plain_loop(model, first, 20)
    charlm_rate(sampler, 1, 50, 0)
    charlm_rate(sampler, args.batch, 20, 0)

    rounds = []
    for r in range(args.rounds):
        plain = plain_loop(model, first, args.plain_chars)
        single = charlm_rate(sampler, 1, args.single_chars, r)
        batch = charlm_rate(sampler, args.batch, args.batch_steps, r)
        rounds.append({"plain": round(plain, 1), "single": round(single, 1), "batch": round(batch, 1),
                       "single_over_plain": round(single / plain, 2),
                       "batch_over_single": round(batch / single, 2)})
    med = lambda key: statistics.median(x[key] for x in rounds)  # noqa: E731

    # Model FLOPs of one forward character (charlm skips layer 0's input matmul via a table).
    fwd_flops = flops_per_char(cfg, len(vocab)) / 3
    h = cfg.hidden_size
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cfg.cell]
    biggest = (args.batch, 2 * h if cfg.num_layers > 1 else h, gates * h)  # layer 1's [x|h] @ W.T
    peak = matmul_peak(*biggest)
    single, batch = med("single"), med("batch")
    result = {
        "model": {**cfg.__dict__, "vocab_size": len(vocab),
                  "weights": str(args.checkpoint) if args.checkpoint else "random"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rounds": rounds,
        "plain_chars_per_s": med("plain"),
        "single_chars_per_s": single,
        f"batch{args.batch}_chars_per_s": batch,
        "single_over_plain": med("single_over_plain"),
        f"batch{args.batch}_over_single": med("batch_over_single"),
        "targets": TARGETS,
        "met": {"single_over_plain": med("single_over_plain") >= TARGETS["single_over_plain"],
                "batch_over_single": med("batch_over_single") >= TARGETS["batch_over_single"]},
        "context": {
            "forward_mflop_per_char": round(fwd_flops / 1e6, 3),
            "batch_gflops": round(batch * fwd_flops / 1e9, 1),
            "matmul_peak_gflops": round(peak, 1),
            "matmul_peak_shape": list(biggest),
            "batch_over_single_ceiling": round(peak * 1e9 / fwd_flops / single, 1),
        },
    }
    if args.startup:
        result["startup"] = startup_times(args.checkpoint)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
