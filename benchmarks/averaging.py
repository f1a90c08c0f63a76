"""Does averaging the weights help? Held-out bpc of the live weights against an exponential
moving average (EMA) of them and a uniform average over the last part of the schedule.

    python benchmarks/averaging.py /tmp/panel/sotu.txt --steps 3000 [--set dropout=0.2 ...]

Trains one run (one thread) and, at every evaluation, scores the live weights, EMAs with
decays 0.99 / 0.999, and the running mean of the weights since 80 % of the steps; prints
one JSON line per evaluation and a last line with the best and final bpc of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from typing import Any

import torch

from charlm.config.run import build_config
from charlm.data.cache import encode_corpus
from charlm.data.records import RecordSet
from charlm.model.network import CharRNN
from charlm.model.scoring import evaluate
from charlm.storage.rundir import RunDir
from charlm.training.budget import TimeBudget
from charlm.training.events import Callbacks
from charlm.training.trainer import Trainer

DECAYS = (0.99, 0.999)
TAIL = 0.8  # the uniform average starts at this share of the steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE setting (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        settings[key] = json.loads(raw)
    cfg = build_config(None, {**settings, "preview_length": 0, "keep": 0, "device": "cpu"})
    corpus = encode_corpus([args.corpus])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, corpus.vocab, corpus.ids, corpus.desc, RunDir(tmp), torch.device("cpu"))
        emas = {d: copy.deepcopy(trainer.model) for d in DECAYS}
        mean = copy.deepcopy(trainer.model)
        tail_start = int(args.steps * TAIL)
        scores: dict[str, list[float]] = {"live": [], **{f"ema{d}": [] for d in DECAYS}, "tail_mean": []}

        val = trainer.split.val
        assert not isinstance(val, RecordSet)  # a stream corpus: averaging.py trains no records

        def score(model: CharRNN) -> float:
            return evaluate(model, val, trainer.device, max_chars=cfg.train.eval_chars)[0]

        class Average(Callbacks):
            def on_step(self, stats: Any) -> None:
                with torch.no_grad():
                    live = dict(trainer.model.named_parameters())
                    for d, ema in emas.items():
                        for name, p in ema.named_parameters():
                            p.mul_(d).add_(live[name], alpha=1 - d)
                    if stats.step > tail_start:
                        k = stats.step - tail_start
                        for name, p in mean.named_parameters():
                            p.mul_((k - 1) / k).add_(live[name], alpha=1 / k)
                if stats.step % cfg.session.eval_interval == 0 or stats.step == args.steps:
                    row = {"step": stats.step, "live": score(trainer.model)}
                    for d, ema in emas.items():
                        row[f"ema{d}"] = score(ema)
                    if stats.step > tail_start:
                        row["tail_mean"] = score(mean)
                    for key in scores:
                        if key in row:
                            scores[key].append(row[key])
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                          flush=True)

        trainer.loop(TimeBudget.fixed_steps(args.steps), Average(), lambda: 0)
    print(json.dumps({"settings": settings, "steps": args.steps,
                      **{f"{k}_best": round(min(v), 4) for k, v in scores.items() if v},
                      **{f"{k}_final": round(v[-1], 4) for k, v in scores.items() if v}}))


if __name__ == "__main__":
    main()
