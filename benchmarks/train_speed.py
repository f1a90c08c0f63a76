"""Training throughput at the default shape: charlm's trainer vs a plain fp32 loop.

    python benchmarks/train_speed.py [--steps 30]

Prints JSON with, measured in one run: the trainer's chars/s; the chars/s of a plain fp32
PyTorch loop of the same model (embedding, nn.LSTM, linear, cross-entropy, AdamW); the
machine's measured matrix-multiply peak in fp32 and bf16; and the fraction of each peak
the trainer reaches. FLOPs per character follow `charlm.model.network.flops_per_char`: per layer
G*H*(I+H) multiply-adds (G = 4 gates for an LSTM), plus the output layer, x2 FLOPs per
multiply-add, x3 for forward and backward.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config.run import RunConfig
from charlm.data.vocab import Vocab
from charlm.device import resolve_device, resolve_precision
from charlm.model.size import flops_per_char
from charlm.storage.rundir import RunDir
from charlm.training.budget import TimeBudget
from charlm.training.events import Callbacks, StepStats
from charlm.training.trainer import Trainer

VOCAB = 96  # State of the Union has 96 distinct characters


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """Measured GFLOP/s of an n x n matrix product (best of a few timed repetitions)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(cfg: RunConfig, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """What a user would write: fp32, nn.LSTM (or the configured cell), cross-entropy, AdamW,
    state carried."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, m.embedding_size).to(device)
    cell = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[m.cell]
    rnn = cell(m.embedding_size, m.hidden_size, m.num_layers, batch_first=True).to(device)
    head = nn.Linear(m.hidden_size, VOCAB).to(device)
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=t.lr)
    B, T = t.batch_size, t.seq_len
    data = ids[: (len(ids) - 1) // B * B + 1].to(device).long()
    L = (len(data) - 1) // B
    xs, ys = data[:-1].view(B, L), data[1:].view(B, L)
    state = None
    elapsed, timed = 0.0, 0
    for i in range(steps + 3):
        pos = (i * T) % (L - T)
        x, y = xs[:, pos : pos + T], ys[:, pos : pos + T]
        _sync(device)
        t0 = time.perf_counter()
        out, state = rnn(emb(x), state)
        loss = F.cross_entropy(head(out).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        loss.item()
        if i >= 3:  # skip warm-up steps
            elapsed += time.perf_counter() - t0
            timed += 1
    return B * T * timed / elapsed


class _Timer(Callbacks):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, stats: StepStats) -> None:
        self.times.append(time.perf_counter())


def trainer_speed(cfg: RunConfig, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """charlm's Trainer on the same data and shape, timed between step callbacks."""
    cfg.session.eval_interval = 10**9  # one evaluation at the very end, outside the timing
    cfg.session.keep = 0
    cfg.session.preview_length = 0
    vocab = Vocab("".join(chr(32 + i) for i in range(VOCAB)))
    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, vocab, ids, {"specs": [], "documents": [], "sha256": ""}, RunDir(tmp), device)
        trainer.loop(TimeBudget.fixed_steps(steps + 3), timer, lambda: 0)
    span = timer.times[-1] - timer.times[2]
    return cfg.train.batch_size * cfg.train.seq_len * (len(timer.times) - 3) / span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = RunConfig()
    precision = resolve_precision(cfg.session.precision, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2_000_000,), generator=gen, dtype=torch.uint8)
    big = 4096 if device.type == "cuda" else 1024
    fp32_peak = matmul_peak(torch.float32, device, big, 10 if device.type == "cuda" else 5)
    # bf16 without native support is ~100x slower on some CPUs: keep that probe small.
    bf16_peak = matmul_peak(torch.bfloat16, device, big if device.type == "cuda" else 256, 3)
    # Interleave the two measurements so background load affects both alike.
    plain, ours = [], []
    for _ in range(2):
        plain.append(plain_loop(cfg, ids, args.steps, device))
        ours.append(trainer_speed(RunConfig(), ids, args.steps, device))
    plain_cps, ours_cps = max(plain), max(ours)
    fpc = flops_per_char(cfg.model, VOCAB)
    achieved = ours_cps * fpc / 1e9
    print(json.dumps({
        "machine": platform.processor() or platform.machine(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "shape": {**cfg.model.__dict__, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len},
        "trainer_precision": precision,
        "trainer_chars_per_s": round(ours_cps),
        "plain_fp32_chars_per_s": round(plain_cps),
        "speedup_vs_plain": round(ours_cps / plain_cps, 3),
        "flops_per_char": fpc,
        "trainer_gflops": round(achieved, 1),
        "peak_gflops_fp32": round(fp32_peak, 1),
        "peak_gflops_bf16": round(bf16_peak, 1),
        "fraction_of_fp32_peak": round(achieved / fp32_peak, 3),
        "fraction_of_bf16_peak": round(achieved / bf16_peak, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
