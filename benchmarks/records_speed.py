"""Records mode: its training throughput against stream mode on the same text, and what a
names model learns in a few minutes.

    pip install names      # the US census first-name lists (else names are made up)
    NLTK_DATA=../shared/data/nltk_data python benchmarks/records_speed.py [--steps 120] [--time 2m]

Throughput: the default model (2x256 LSTM, batch 32 x seq_len 32, fp32 or bf16 as `auto`
picks) trains --steps steps on (a) a list of first names, one per line (`--records lines`
against plain stream mode), and (b) State of the Union's paragraphs (`--records
blank-lines` against stream mode), the two modes alternating --reps times, on --threads
threads; characters trained per second of CPU time (what the steps cost, however busy a
shared machine is) and of wall time. Records mode counts each record's characters and its
end marker, stream mode every window position.

Quality (--time, 0 to skip): the names list trained for --time in each mode; held-out bpc
(records: the last 5 % of the names, whole, end markers counted; stream: the last 5 % of
the text, line breaks counted), 20 sampled names and how many of them are training names.
Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from finetune import machine  # benchmarks/finetune.py: this script's folder is on the path

from charlm.api import load
from charlm.config.run import build_config
from charlm.data.cache import encode_corpus
from charlm.data.streams import model_vocab, training_data
from charlm.storage.rundir import RunDir
from charlm.training.budget import TimeBudget
from charlm.training.events import Callbacks, StepStats
from charlm.training.session import fit
from charlm.training.trainer import Trainer


def first_names(seed: int = 0) -> list[str]:
    """The census first names of the `names` package (female and male, each once,
    capitalised), shuffled so the held-out tail is not just the rarest; made-up names
    where the package is not installed."""
    rng = random.Random(seed)
    try:
        import names

        folder = Path(names.__file__).parent
        found = sorted({line.split()[0].capitalize() for f in ("dist.female.first", "dist.male.first")
                        for line in (folder / f).read_text().splitlines() if line.strip()})
    except ImportError:
        parts = ["an", "na", "ma", "ri", "el", "la", "jo", "hn", "be", "th", "ka", "te", "li", "so", "ar", "lo"]
        found = sorted({"".join(rng.choice(parts) for _ in range(rng.randint(1, 4))).capitalize()
                        for _ in range(6000)})
    rng.shuffle(found)
    return found


class _Timer(Callbacks):
    """Wall clock, this process's CPU time and characters trained, at every step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, int]] = []

    def on_step(self, stats: StepStats) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), stats.chars_seen))


def speed(corpus: str, records: str, steps: int) -> tuple[float, float]:
    """Characters trained per second of wall time and per second of CPU time (the latter is
    what the steps cost, whatever else the machine runs), steps 4 to `steps` + 3."""
    cfg = build_config(None, {"records": records, "device": "cpu", "preview_length": 0, "keep": 0,
                              "eval_interval": 10**9})
    enc = encode_corpus([corpus])
    vocab = model_vocab(enc.vocab.chars, records)
    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, vocab, training_data(enc, vocab, records), enc.desc, RunDir(tmp), torch.device("cpu"))
        trainer.loop(TimeBudget.fixed_steps(steps + 3), timer, lambda: 0)  # (one evaluation at the very end, not timed)
    (w0, c0, n0), (w1, c1, n1) = timer.marks[2], timer.marks[-1]
    return (n1 - n0) / (w1 - w0), (n1 - n0) / (c1 - c0)


def quality(corpus: str, records: str, budget: str, folder: Path, training: set[str]) -> dict[str, Any]:
    cfg = build_config(None, {"records": records, "time": budget, "preview_length": 0, "keep": 0})
    out = folder / f"quality-{records or 'stream'}"
    result = fit(cfg, [corpus], out)
    row: dict[str, Any] = {"mode": records or "stream", "time": budget, "steps": result.step,
                           "val_bpc": round(result.best_val_bpc or 0.0, 4)}
    if records:
        lm = load(out / "best.pt")
        sampled = lm.sample(num_samples=20, temperature=0.8, seed=1, length=60)
        assert isinstance(sampled, list)
        row["samples"] = sampled
        row["training_names_among_them"] = sum(s in training for s in sampled)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads for the throughput runs")
    ap.add_argument("--time", default="2m", help="quality runs' budget (0: skip them)")
    args = ap.parse_args()
    names = first_names()
    with tempfile.TemporaryDirectory(prefix="charlm-records-") as tmp:
        folder = Path(tmp)
        names_file = folder / "names.txt"
        names_file.write_text("\n".join(names) + "\n", encoding="utf-8")
        sotu = encode_corpus(None)
        sotu_file = folder / "sotu.txt"
        sotu_file.write_text(sotu.vocab.decode(sotu.ids.tolist()), encoding="utf-8")
        print(json.dumps({"machine": machine(), "names": len(names), "names_chars": len(names_file.read_text()),
                          "sotu_chars": len(sotu.ids)}), flush=True)
        torch.set_num_threads(args.threads)
        for label, corpus, mode in (("names", names_file, "lines"), ("state_union paragraphs", sotu_file,
                                                                     "blank-lines")):
            wall: dict[str, list[float]] = {"stream": [], mode: []}
            cpu: dict[str, list[float]] = {"stream": [], mode: []}
            for _ in range(args.reps):  # alternating, so background load falls on both alike
                for m in ("", mode):
                    w, c = speed(str(corpus), m, args.steps)
                    wall[m or "stream"].append(w)
                    cpu[m or "stream"].append(c)
            med = {k: statistics.median(v) for k, v in cpu.items()}
            print(json.dumps({"throughput": label, "steps": args.steps, "threads": args.threads,
                              "chars_per_cpu_s": {k: round(v) for k, v in med.items()},
                              "chars_per_wall_s": {k: [round(x) for x in v] for k, v in wall.items()},
                              "records_vs_stream": round(med[mode] / med["stream"], 3)}), flush=True)
        if args.time != "0":
            training = set(names[:len(names) - max(1, int(len(names) * 0.05))])
            for mode in ("lines", ""):
                print(json.dumps(quality(str(names_file), mode, args.time, folder, training)), flush=True)


if __name__ == "__main__":
    main()
