"""Held-out bits per character after a fixed time budget on State of the Union.

    python benchmarks/quality.py --time 4m                       # the built-in default
    python benchmarks/quality.py --time 4m --set hidden_size=512 --set lr=0.002
    python benchmarks/quality.py --time 1m --sweep               # screen the sweep grid

Trains with charlm's own trainer (the last 5 % of the corpus, the latest speeches, held
out), evaluates the final model on all of the held-out text, and prints one JSON line per
run. `--sweep` runs the candidate grid below one after another and ends with a markdown
table for benchmarks/RESULTS.md. Needs NLTK_DATA pointing at a folder with state_union.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from charlm.config import RunConfig, build_config
from charlm.encode import encode_corpus
from charlm.session import fit

# Each candidate changes a few settings from the defaults; keep the list short enough to
# screen at --time 1m, then confirm the best few at the real budget.
SWEEP: list[dict[str, object]] = [
    {},
    {"batch_size": 16},
    {"seq_len": 32},
    {"batch_size": 16, "seq_len": 128},
    {"hidden_size": 384},
    {"hidden_size": 512, "num_layers": 1},
    {"num_layers": 3},
    {"lr": 0.006},
    {"lr": 0.0015},
    {"cell": "gru"},
    {"hidden_size": 192},
]
# The screen's best directions, combined and confirmed at the real budget (--confirm).
CONFIRM: list[dict[str, object]] = [
    {"seq_len": 32},
    {"cell": "gru", "seq_len": 32},
    {"cell": "gru", "seq_len": 32, "lr": 0.006},
    {"seq_len": 32, "lr": 0.006},
    {"seq_len": 32, "lr": 0.006, "batch_size": 16},
    {"seq_len": 32, "lr": 0.01},
]


def parse_set(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            value: object = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def config_for(changes: dict[str, object], budget: str, seed: int) -> RunConfig:
    return build_config(None, {**changes, "time": budget, "seed": seed, "preview_length": 0, "keep": 0})


def run_one(changes: dict[str, object], budget: str, seed: int, corpus) -> dict[str, object]:
    cfg = config_for(changes, budget, seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = fit(cfg, None, Path(tmp) / "run", corpus=corpus)
        wall = time.perf_counter() - t0
    return {
        "changes": changes,
        "time_budget": budget,
        "val_bpc": round(result.last_val_bpc, 4),
        "best_val_bpc": round(result.best_val_bpc, 4),
        "steps": result.step,
        "chars_seen": result.chars_seen,
        "train_chars_per_s": round(result.chars_seen / result.elapsed),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", default="4m", help="training budget per run (DURATION)")
    ap.add_argument("--set", action="append", default=[], help="override KEY=VALUE (repeatable)")
    ap.add_argument("--sweep", action="store_true", help="run the screening grid")
    ap.add_argument("--confirm", action="store_true", help="run the confirmation candidates")
    ap.add_argument("--only", type=str, default="", help="comma list of sweep indices to run")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    corpus = encode_corpus(None)  # nltk:state_union, encoded once for all runs
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "python": sys.version.split()[0], "corpus_chars": len(corpus.ids)}), flush=True)
    base = parse_set(args.set)
    grid = SWEEP if args.sweep else CONFIRM if args.confirm else [{}]
    if args.only:
        grid = [grid[int(i)] for i in args.only.split(",")]
    rows = []
    for changes in grid:
        row = run_one({**base, **changes}, args.time, args.seed, corpus)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        print(f"\n| changes from default | val bpc @ {args.time} | steps | chars/s |")
        print("|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["val_bpc"]):
            name = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(default)"
            print(f"| {name} | {r['val_bpc']:.4f} | {r['steps']} | {r['train_chars_per_s']:,} |")


if __name__ == "__main__":
    main()
