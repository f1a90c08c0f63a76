"""What weight drop and locked dropout cost a training step, and whether the fused kernel still runs.

    python benchmarks/regularize_speed.py [CORPUS] [--widths 256,384] [--pairs 5] [--steps 40]

CORPUS defaults to nltk:state_union. For each width (2 layers, batch 32x32, the run's
precision and fp32), charlm's trainer step is timed plain, with `--weight-drop 0.3`, and with
`--weight-drop 0.3 --locked-dropout 0.1`, alternately (A B C, A B C, ...) so the machine's
drift touches all alike; prints JSON with the machine, chars/s of each, the median over the
rounds of each ratio to plain, and whether the profiler saw the fused recurrent kernel
(oneDNN's `mkldnn_rnn_layer` on a CPU, cuDNN's on a GPU) in each regularized step, with its
calls per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from train_speed import WARMUP, machine, profile_steps, trainer_speed

from charlm.config.run import RunConfig
from charlm.data.cache import encode_corpus
from charlm.data.streams import model_vocab, training_data
from charlm.device import resolve_device, resolve_precision
from charlm.training import probe

VARIANTS = {"plain": {}, "wd0.3": {"weight_drop": 0.3}, "wd0.3+ld0.1": {"weight_drop": 0.3, "locked_dropout": 0.1}}
FUSED = ("mkldnn_rnn_layer", "cudnn", "_cudnn_rnn")


def fused_calls(ops: list[dict[str, Any]]) -> float:
    """Calls per step of the fused recurrent kernel among the profiled operators (0: absent)."""
    return sum(o["calls_per_step"] for o in ops if any(k in o["op"] for k in FUSED))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default="nltk:state_union")
    ap.add_argument("--widths", default="256,384")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    corpus = encode_corpus([args.corpus])
    vocab = model_vocab(corpus.vocab.chars, "", "")
    data = training_data(corpus, vocab, "")
    report: dict[str, Any] = {"machine": machine(), "device": str(device), "shapes": []}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ[probe.SPEEDS_ENV] = str(Path(scratch) / "speeds.json")
        for width in (int(w) for w in args.widths.split(",")):
            for precision in dict.fromkeys([resolve_precision("auto", device), "fp32"]):
                base = {"hidden_size": width, "num_layers": 2, "precision": precision, "device": args.device}
                cfgs = {name: RunConfig().updated({**base, **extra}) for name, extra in VARIANTS.items()}
                rounds = [{name: trainer_speed(cfg, data, vocab, args.steps, device) for name, cfg in cfgs.items()}
                          for _ in range(args.pairs)]
                row: dict[str, Any] = {"shape": f"2x{width}", "precision": precision}
                for name in VARIANTS:
                    row[f"{name}_chars_per_s"] = round(statistics.median(r[name] for r in rounds))
                    if name != "plain":
                        row[f"{name}_ratio"] = round(statistics.median(r[name] / r["plain"] for r in rounds), 3)
                        ops = profile_steps(cfgs[name], data, vocab, max(10, args.steps // 2), device)
                        row[f"{name}_fused_calls_per_step"] = fused_calls(ops)
                row["plain_fused_calls_per_step"] = fused_calls(
                    profile_steps(cfgs["plain"], data, vocab, max(10, args.steps // 2), device))
                report["shapes"].append(row)
    report["timed_steps"], report["warmup_steps"], report["rounds"] = args.steps, WARMUP, args.pairs
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
