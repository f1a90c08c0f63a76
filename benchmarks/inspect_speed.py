"""`charlm inspect` on a 5,000-character passage: time per stage and the page's size.

    python benchmarks/inspect_speed.py CHECKPOINT [--text-file FILE] [--chars 5000] [--rounds 3]

Prints JSON: seconds per stage (medians over rounds, in one process: scoring with the fused
kernel, replaying the layers step by step for h / c / gates, the unit finder, rendering and
writing the page, writing the npz), the wall time of the whole `charlm inspect` command in
a fresh process (Python and PyTorch start-up included), the page size in bytes (and the part
that is the deflated states), the npz size, and the page size for other `--levels`.
Without --text-file the passage is the run's own held-out text (its corpus must be readable).
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

import charlm
from charlm.analysis.inspect_page import page_data, render
from charlm.analysis.inspection import (
    find_units,
    inspect_text,
    load_text,
    score,
    text_properties,
    trace_states,
    write_npz,
)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text-file", type=Path)
    ap.add_argument("--chars", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    lm = charlm.load(args.checkpoint)
    text, source = load_text(lm, [str(args.text_file)] if args.text_file else None)
    text = text[: args.chars]
    times: dict[str, list[float]] = {k: [] for k in ("score", "trace", "units", "page", "npz", "total")}
    with tempfile.TemporaryDirectory() as tmp:
        page_path, npz_path = Path(tmp) / "page.html", Path(tmp) / "page.npz"
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            s = score(lm.model, lm.vocab, text)
            t1 = time.perf_counter()
            states = trace_states(lm.model, s.ids)
            t2 = time.perf_counter()
            find_units(states, {k: v[s.known] for k, v in text_properties(text).items()})
            t3 = time.perf_counter()
            ins = inspect_text(lm, text, source, max_chars=args.chars)
            t4 = time.perf_counter()
            page_path.write_text(render(ins), encoding="utf-8")
            t5 = time.perf_counter()
            write_npz(npz_path, ins)
            t6 = time.perf_counter()
            for key, dt in (("score", t1 - t0), ("trace", t2 - t1), ("units", t3 - t2), ("page", t5 - t4),
                            ("npz", t6 - t5), ("total", (t4 - t3) + (t5 - t4) + (t6 - t5))):
                times[key].append(dt)
        page_bytes = page_path.stat().st_size
        npz_bytes = npz_path.stat().st_size
        states_b64 = len(page_data(ins)["states"])
        by_levels = {levels: len(render(ins, levels).encode("utf-8")) for levels in (8, 16, 32, 256)}
        # The whole command in a fresh process, as a user runs it.
        text_file = Path(tmp) / "passage.txt"
        text_file.write_text(text, encoding="utf-8")
        cmd = [str(Path(sys.executable).with_name("charlm")), "inspect", str(args.checkpoint), str(text_file),
               "--html", str(page_path), "--npz", str(npz_path)]
        walls = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
            walls.append(time.perf_counter() - t0)
    cfg = lm.model.cfg
    print(json.dumps({
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model": f"{cfg.num_layers}x{cfg.hidden_size} {cfg.cell}", "checkpoint": str(args.checkpoint),
        "chars": len(text), "scored": ins.scores.scored, "source": source,
        "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "cli_wall_s": round(statistics.median(walls), 2),
        "page_bytes": page_bytes, "page_states_bytes": states_b64, "npz_bytes": npz_bytes,
        "page_bytes_by_levels": by_levels,
    }, indent=1))


if __name__ == "__main__":
    main()
