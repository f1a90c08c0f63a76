"""The memory estimate (`charlm.training.memory`) and the checkpoint-size estimate (`charlm.fs`)
against measurements on this machine.

    python benchmarks/memory_estimate.py [--quick]

Memory: for each shape, a fresh process builds charlm's `Trainer` (model, fused AdamW, the
batcher) on random ids, takes two real training steps (the second holds AdamW's moments as
well as the activations) and serializes a checkpoint as a save does; `measured` is its peak
RSS (`ru_maxrss`) minus its RSS before the trainer was built. CPU only (on CUDA the estimate is compared with
`torch.cuda.mem_get_info`, which this script does not measure). In the same process, the
size of the checkpoint after those steps against `charlm.storage.checkpoint.checkpoint_bytes`.

Prints one JSON object: {"machine": ..., "memory": [one row per shape]}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CHILD = """
import json, os, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from charlm.config.run import build_config
from charlm.data.vocab import Vocab
from charlm.model.size import state_values
from charlm.storage.checkpoint import BudgetState, checkpoint_bytes, serialize
from charlm.storage.rundir import RunDir
from charlm.training import memory
from charlm.training.probe import time_steps
from charlm.training.trainer import Trainer
shape = json.loads(sys.argv[1])
V = shape.pop("vocab")
cfg = build_config(None, {**shape, "device": "cpu"})
ids = np.random.default_rng(0).integers(0, V, cfg.train.batch_size * cfg.train.seq_len * 8).astype(np.uint16)
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
trainer = Trainer(cfg, Vocab("".join(chr(0x100 + i) for i in range(V))), ids, {}, RunDir(sys.argv[2]),
                  torch.device("cpu"))
seconds = sum(time_steps(trainer, 2))
size = len(serialize(trainer.checkpoint(BudgetState())))  # a save's peak: the checkpoint serialized in memory
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
est = memory.estimate(cfg, V, trainer.precision)
print(json.dumps({"precision": trainer.precision, "parameters": est.parameters, "measured_bytes": peak - base,
                  "estimate_bytes": est.total, "activations_bytes": est.activations,
                  "checkpoint_bytes": size,
                  "checkpoint_estimate": checkpoint_bytes(est.parameters, state_values(cfg.model, cfg.train.streams())),
                  "seconds": round(seconds, 2)}))
"""

SHAPES = [
    # cell, layers, hidden, embedding, vocab, batch, seq_len, precision
    ("lstm", 1, 64, 16, 96, 1024, 128, "fp32"),
    ("lstm", 2, 64, 16, 96, 1024, 128, "fp32"),
    ("lstm", 2, 128, 16, 96, 512, 128, "fp32"),
    ("lstm", 3, 128, 16, 96, 512, 128, "fp32"),
    ("lstm", 2, 256, 64, 96, 256, 64, "fp32"),
    ("lstm", 1, 64, 16, 1000, 512, 128, "fp32"),
    ("gru", 2, 128, 16, 96, 512, 128, "fp32"),
    ("rnn", 2, 128, 16, 96, 512, 128, "fp32"),
    ("lstm", 2, 128, 16, 96, 512, 128, "bf16"),
    ("gru", 2, 128, 16, 96, 512, 128, "bf16"),
    ("lstm", 2, 1024, 64, 96, 8, 32, "fp32"),  # weights and the checkpoint dominate
]
QUICK = SHAPES[:2] + SHAPES[-3:]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(shape: tuple) -> dict:
    cell, layers, hidden, emb, vocab, batch, seq, precision = shape
    args = {"cell": cell, "num_layers": layers, "hidden_size": hidden, "embedding_size": emb, "vocab": vocab,
            "batch_size": batch, "seq_len": seq, "precision": precision}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), tmp], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    got = json.loads(proc.stdout)
    return {"shape": args, **got, "estimate_over_measured": round(got["estimate_bytes"] / got["measured_bytes"], 3),
            "checkpoint_estimate_over_real": round(got["checkpoint_estimate"] / got["checkpoint_bytes"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="five shapes instead of eleven")
    args = parser.parse_args()
    import torch

    rows = [measure(s) for s in (QUICK if args.quick else SHAPES)]
    print(json.dumps({"machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": 1},
                      "memory": rows}, indent=1))


if __name__ == "__main__":
    main()
