"""Where a training step's time goes, at the shape the planner picks for a corpus and budget.

    python benchmarks/train_speed.py [CORPUS] [--time 4m] [--pairs 5] [--steps 40] [--split-run 1m]

CORPUS defaults to nltk:state_union. Prints JSON with, all measured in this one run:
- the machine: CPU model, the instruction sets that pick PyTorch's kernels, threads, PyTorch;
- the shape the planner picks for `charlm train CORPUS --time 4m` here;
- chars/s of charlm's trainer at the run's precision, of charlm's trainer in fp32 (what a
  CPU without native bf16 runs), and of a plain fp32 PyTorch loop of the same model,
  measured alternately (A B C, A B C, ...), with the median over the rounds of each ratio;
- the machine's matrix-multiply rate in fp32 and, where native, bf16, and the fraction of
  the best of them the trainer reaches (FLOPs per character from `charlm.model.size`);
- the operators a trainer step spends its time in (torch.profiler, self time per step);
- how the seconds of a `--time` run (`--split-run`, default 1m; 0 skips it) were spent, a
  first run on a machine with no speeds.json, then a second with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config.run import RunConfig
from charlm.data.cache import encode_corpus
from charlm.data.records import RecordSet
from charlm.data.streams import model_vocab, training_data
from charlm.device import resolve_device, resolve_precision
from charlm.model.size import flops_per_char
from charlm.storage.rundir import RunDir
from charlm.training import probe, session
from charlm.training.planner import Shape
from charlm.training.trainer import Trainer

WARMUP = 3  # untimed steps before each measurement


def machine() -> dict[str, Any]:
    """The CPU (lscpu's model name and the flags that pick kernels), threads and PyTorch."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"cpu": fields.get("Model name", "").strip(), "family": fields.get("CPU family", "").strip(),
            "model": fields.get("Model", "").strip(),
            "flags": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """Measured GFLOP/s of an n x n matrix product (best of three timed rounds)."""
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
        torch.cuda.synchronize(device)


def plain_loop(cfg: RunConfig, ids: torch.Tensor, vocab: int, steps: int, device: torch.device) -> float:
    """Chars/s of what a user would write: fp32, the configured nn cell, cross-entropy, AdamW,
    gradient clipping, state carried from batch to batch."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, m.embedding_size).to(device)
    cell = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[m.cell]
    rnn = cell(m.embedding_size, m.hidden_size, m.num_layers, batch_first=True,
               dropout=m.dropout if m.num_layers > 1 else 0.0).to(device)
    head = nn.Linear(m.hidden_size, vocab).to(device)
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=t.lr)
    B, T = t.batch_size, t.seq_len
    data = ids[: (len(ids) - 1) // B * B + 1].to(device).long()
    L = (len(data) - 1) // B
    xs, ys = data[:-1].view(B, L), data[1:].view(B, L)
    state: Any = None
    elapsed = 0.0
    for i in range(steps + WARMUP):
        pos = (i * T) % (L - T)
        x, y = xs[:, pos : pos + T], ys[:, pos : pos + T]
        _sync(device)
        t0 = time.perf_counter()
        out, state = rnn(emb(x), state)
        loss = F.cross_entropy(head(out).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        loss.item()
        if i >= WARMUP:
            elapsed += time.perf_counter() - t0
    return B * T * steps / elapsed


def make_trainer(cfg: RunConfig, data: Any, vocab: Any, tmp: str, device: torch.device) -> Trainer:
    """A trainer of the planned run outside any session (no evaluation, no save)."""
    return Trainer(cfg, vocab, data, {}, RunDir(tmp), device)


def trainer_speed(cfg: RunConfig, data: Any, vocab: Any, steps: int, device: torch.device) -> float:
    """Chars/s of charlm's own step (`charlm.training.probe.time_steps`), after warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        times = probe.time_steps(make_trainer(cfg, data, vocab, tmp, device), steps + WARMUP)
    return cfg.train.batch_size * cfg.train.seq_len * steps / sum(times[WARMUP:])


def profile_steps(cfg: RunConfig, data: Any, vocab: Any, steps: int, device: torch.device) -> list[dict[str, Any]]:
    """The operators a trainer step spends its (self) time in, most first."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, data, vocab, tmp, device)
        probe.time_steps(trainer, WARMUP)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            probe.time_steps(trainer, steps)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": round(e.count / steps, 1)}
            for e in events[:12]]


def split_run(corpus: str, time_spec: str, speeds: Path) -> dict[str, Any]:
    """A planned `--time` run as `charlm train` makes it: where its seconds went."""
    os.environ[probe.SPEEDS_ENV] = str(speeds)
    cfg = RunConfig().updated({"time": time_spec, "preview_length": 0})
    with tempfile.TemporaryDirectory() as tmp:
        result = session.fit(cfg, [corpus], Path(tmp) / "run", explicit={"preview_length"})
    s = result.seconds
    return {"steps": result.step, "best_val_bpc": round(result.best_val_bpc or 0.0, 4),
            "seconds": {k: round(v, 2) for k, v in s.items()},
            "training_share": round(s["training"] / s["total"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default="nltk:state_union")
    ap.add_argument("--time", default="4m", help="the budget whose planned shape is measured")
    ap.add_argument("--pairs", type=int, default=5, help="alternating rounds (each: trainer, trainer fp32, plain)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    ap.add_argument("--split-run", default="1m", help="budget of the runs whose seconds are split (0: none)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ[probe.SPEEDS_ENV] = str(Path(scratch) / "plan-speeds.json")
        cfg, plan = session.dry_plan(RunConfig().updated({"time": args.time, "device": args.device}),
                                     [args.corpus], set())
        corpus = encode_corpus([args.corpus])
        vocab = model_vocab(corpus.vocab.chars, cfg.train.records, "")
        data = training_data(corpus, vocab, cfg.train.records)
        precision = resolve_precision(cfg.session.precision, device)
        fp32 = cfg.updated({"precision": "fp32"})
        if isinstance(data, RecordSet):
            raise SystemExit("train_speed measures stream mode: a corpus without --records")
        ids = torch.tensor(data[:2_000_000].tolist(), dtype=torch.int64)

        big = 4096 if device.type == "cuda" else 1024
        rates = {"fp32": matmul_rate(torch.float32, device, big, 10 if device.type == "cuda" else 5)}
        if precision == "bf16":
            rates["bf16"] = matmul_rate(torch.bfloat16, device, big, 10 if device.type == "cuda" else 5)
        rounds = []
        for _ in range(args.pairs):  # alternate, so the machine's drift touches all three alike
            ours = trainer_speed(cfg, data, vocab, args.steps, device)
            ours32 = trainer_speed(fp32, data, vocab, args.steps, device)
            plain = plain_loop(cfg, ids, len(vocab), args.steps, device)
            rounds.append({"trainer": ours, "trainer_fp32": ours32, "plain_fp32": plain})
        ops = profile_steps(cfg, data, vocab, max(10, args.steps // 2), device)
        fpc = flops_per_char(cfg.model, len(vocab))
        ours_cps = statistics.median(r["trainer"] for r in rounds)
        best_rate = max(rates.values())
        report: dict[str, Any] = {
            "machine": machine(),
            "device": str(device),
            "plan": plan.summary(),
            "shape": {**Shape.of(cfg).settings(), "ema": cfg.train.ema},
            "trainer_precision": precision,
            "rounds": [{k: round(v) for k, v in r.items()} for r in rounds],
            "trainer_chars_per_s": round(ours_cps),
            "trainer_fp32_chars_per_s": round(statistics.median(r["trainer_fp32"] for r in rounds)),
            "plain_fp32_chars_per_s": round(statistics.median(r["plain_fp32"] for r in rounds)),
            "trainer_vs_plain": round(statistics.median(r["trainer"] / r["plain_fp32"] for r in rounds), 3),
            "trainer_fp32_vs_plain": round(statistics.median(r["trainer_fp32"] / r["plain_fp32"] for r in rounds), 3),
            "flops_per_char": fpc,
            "gemm_gflops": {k: round(v, 1) for k, v in rates.items()},
            "trainer_gflops": round(ours_cps * fpc / 1e9, 1),
            "fraction_of_best_gemm": round(ours_cps * fpc / 1e9 / best_rate, 3),
            "step_ops": ops,
        }
        if args.split_run not in ("0", ""):
            speeds = Path(scratch) / "run-speeds.json"
            report["split_first_run"] = split_run(args.corpus, args.split_run, speeds)
            report["split_second_run"] = split_run(args.corpus, args.split_run, speeds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
