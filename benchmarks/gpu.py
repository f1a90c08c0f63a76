"""Everything worth measuring on a GPU, in one command that prints JSON lines.

    NLTK_DATA=../shared/data/nltk_data python benchmarks/gpu.py            # 1 and 4 minutes
    NLTK_DATA=../shared/data/nltk_data python benchmarks/gpu.py --budgets 1m --corpus notes.txt
    python benchmarks/gpu.py --parts quality --budgets 4m --precisions bf16   # one slice of it

1. The device: name, memory, PyTorch and CUDA versions, whether bf16 is supported.
2. Speed: chars/s of a training step for the planner's candidate widths (2-layer LSTM) in
   each of the planner's GPU batch layouts (`LAYOUTS["cuda"]`: 128 x 128, 256 x 64, 512 x 32,
   the same characters a step; it takes the fastest), in bf16 and in fp32.
3. Quality: `charlm train --time B` as a user runs it (the planner on, the default corpus
   State of the Union, its last 5 % held out) for each budget, in bf16 and in fp32: the plan,
   the steps, chars/s and the held-out bpc (best and final).
4. Sampling: chars/s of one stream and of a batch of 64, on the GPU.
5. Reads (`--parts reads`): chars/s of the planned 2x1024 (128 x 128, fp32, the weight
   average on) when the host reads every step's loss against every `SYNC_STEPS`
   (`charlm.training.reads`), 200 steps each, alternating, 3 rounds.

Copy the lines into benchmarks/RESULTS.md with the device and the date. Needs a CUDA GPU;
without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def device_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(), "date": time.strftime("%Y-%m-%d")}


def speeds(vocab: int) -> None:
    import torch

    from charlm.training.planner import LAYOUTS, WIDTHS, Shape
    from charlm.training.probe import step_seconds

    device = torch.device("cuda")
    for precision in ("bf16", "fp32"):
        for width in WIDTHS:
            for batch, seq_len in LAYOUTS["cuda"]:
                shape = Shape(hidden_size=width, batch_size=batch, seq_len=seq_len)
                sec = step_seconds(shape, vocab, 10, device, precision, clock=time.perf_counter)
                emit({"what": "speed", "precision": precision, "hidden_size": width, "batch": f"{batch}x{seq_len}",
                      "chars_per_s": round(shape.chars_per_batch / sec)})


def quality(corpus: list[str] | None, budget: str, precision: str, seed: int | None = None) -> None:
    from charlm.config.run import build_config
    from charlm.storage.rundir import RunDir
    from charlm.training.events import Callbacks
    from charlm.training.session import fit

    notes: list[str] = []

    class Notes(Callbacks):
        def on_message(self, text: str) -> None:
            notes.append(text)

    settings: dict[str, Any] = {"time": budget, "precision": precision, "device": "cuda", "preview_length": 0}
    if seed is not None:
        settings["seed"] = seed
    cfg = build_config(None, settings)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = fit(cfg, corpus, Path(tmp) / "run", callbacks=Notes(), explicit=set(settings))
        wall = time.perf_counter() - t0
        rows = RunDir(Path(tmp) / "run").read_metrics()
    emit({"what": "quality", "corpus": corpus or ["nltk:state_union"], "budget": budget, "precision": precision,
          "seed": cfg.train.seed,
          "plan": next((n for n in notes if n.startswith("plan:")), None), "steps": result.step,
          "chars_per_s": round(result.chars_seen / max(result.elapsed, 1e-9)),
          "best_val_bpc": round(min(r["val_bpc"] for r in rows), 4), "final_val_bpc": round(rows[-1]["val_bpc"], 4),
          "wall_s": round(wall, 1)})


def sampling(corpus: list[str] | None) -> None:
    from charlm.api import load
    from charlm.config.run import build_config
    from charlm.config.sampling import SampleOptions
    from charlm.training.session import fit

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(None, {"max_steps": 50, "device": "cuda", "preview_length": 0})
        fit(cfg, corpus, Path(tmp) / "run")
        lm = load(Path(tmp) / "run" / "latest.pt", device="cuda")
        for rows in (1, 64):
            t0 = time.perf_counter()
            steps = sum(1 for _ in lm.stream_batch(SampleOptions(length=2000, num_samples=rows, seed=1)))
            emit({"what": "sample", "rows": rows, "chars_per_s": round(steps * rows / (time.perf_counter() - t0))})


def reads(vocab: int, steps: int = 200, rounds: int = 3, device_name: str = "cuda", width: int = 1024) -> None:
    import torch

    from charlm.config.run import RunConfig
    from charlm.training.budget import TimeBudget
    from charlm.training.probe import trial_trainer
    from charlm.training.reads import SYNC_STEPS

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = RunConfig().updated({"hidden_size": width, "batch_size": 128, "seq_len": 128, "precision": "fp32",
                               "ema": 0.999})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trial_trainer(cfg, vocab, 20 + steps, device, tmp)  # the stream wraps around
        budget = TimeBudget.fixed_steps(10**9, time.perf_counter)
        budget.begin()
        for _ in range(20):  # warm-up: cuDNN's plans, the allocator
            trainer.step(budget, time.perf_counter())
        trainer.settle()
        for r in range(rounds):
            for every in (1, SYNC_STEPS):
                trainer.sync_every = every
                sync()
                t0 = time.perf_counter()
                for i in range(steps):
                    trainer.step(budget, time.perf_counter())
                    if (i + 1) % every == 0:
                        trainer.settle()
                trainer.settle()
                sync()
                sec = time.perf_counter() - t0
                emit({"what": "reads", "round": r, "read_every": every, "hidden_size": width, "batch": "128x128",
                      "ms_per_step": round(1000 * sec / steps, 2), "chars_per_s": round(steps * 128 * 128 / sec)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1m,4m")
    ap.add_argument("--precisions", default="auto,bf16",
                    help="auto is fp32 on CUDA; bf16 is measured beside it")
    ap.add_argument("--seed", type=int, help="the runs' seed (default: charlm's)")
    ap.add_argument("--parts", default="speed,quality,sample,reads",
                    help="which measurements, comma-separated (a device lease may not fit all in one call)")
    ap.add_argument("--corpus", action="append", help="CORPUS spec(s) (default: nltk:state_union)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here; run it where `torch.cuda.is_available()` is true",
              file=sys.stderr)
        sys.exit(2)
    emit({"what": "device", **device_info()})
    if "speed" in parts:
        speeds(96)
    if "quality" in parts:
        for budget in args.budgets.split(","):
            for precision in args.precisions.split(","):
                quality(args.corpus, budget, precision, args.seed)
    if "sample" in parts:
        sampling(args.corpus)
    if "reads" in parts:
        reads(96)


if __name__ == "__main__":
    main()
