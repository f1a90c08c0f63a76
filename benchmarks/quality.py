"""The quality panel: held-out bits per character for a budget, across corpora and budgets.

    python benchmarks/quality.py prepare WORK            # corpora and the speed table
    python benchmarks/quality.py panel WORK --cells sotu@4m,code@1m --configs default,h384
    python benchmarks/quality.py planner WORK --cells all   # what charlm's planner picks, run
    python benchmarks/quality.py table WORK               # the markdown table of everything run
    python benchmarks/quality.py panel SLOW --precision fp32 --cells sotu@4m --configs planner,w128e,w192e
                                         # a slower machine: every run (and the planner) in fp32

Corpora (built from NLTK's State of the Union and the Python standard library's own .py
files; none goes into git): `sotu` (all of it, 2.07 M characters), `sotu-1m` and
`sotu-250k` (its first 1 M / 250 k characters), `code` (the standard library without its
tests, ~12 MB). Each run holds out the last 5 % of its corpus and is scored there (best
validation bpc, the score of its best.pt, and the final one).

Budgets are single-core seconds. Every configuration's speed is measured once as the CPU
time of one thread (`time.process_time`, which other load on the machine does not change),
and a run of budget B trains the steps that one core fits in B seconds (evaluations
included, as `--time` plans them; the planner's own speed probe is charged too). The runs
then go two at a time, one thread each, and their results do not depend on what else the
machine is doing. `charlm train --time` on a quiet machine is checked separately (see
benchmarks/RESULTS.md).

`--precision fp32` on a CPU with native bf16 stands in for a slower machine, one without it
(an AVX2 laptop, a Zen 1): every configuration, its speed and the planner's probe run in
fp32, where widths differ in speed by other ratios than in bf16. Give it its own WORK folder,
so its rows do not mix with the native panel's.

Every result is appended to WORK/results.jsonl; `table` prints them per cell.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGETS = {"1m": 60.0, "4m": 240.0, "10m": 600.0, "30m": 1800.0}
CORPORA = ("sotu-250k", "sotu-1m", "sotu", "code")
SPEED_CHARS = 120_000  # characters timed per speed measurement (after 3 warm-up steps)

REGULARIZED: dict[str, dict[str, Any]] = {
    "wd3": {"weight_drop": 0.3}, "wd5": {"weight_drop": 0.5}, "wd3ld1": {"weight_drop": 0.3, "locked_dropout": 0.1},
    "const": {"schedule": "constant"}, "d1const": {"dropout": 0.1, "schedule": "constant"}}

# Hand configurations: each changes a few settings from the built-in defaults. "ema": "auto"
# takes the planner's decay for the run's steps and passes (`charlm.training.planner.ema_for`).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    **{f"w{w}e": {"hidden_size": w, "lr": round(0.01 * (256 / w) ** 0.5, 5), "ema": "auto"}
       for w in (128, 192, 256, 384, 512, 768)},
    **{f"w{w}d{d}e": {"hidden_size": w, "lr": round(0.01 * (256 / w) ** 0.5, 5), "dropout": d / 10, "ema": "auto"}
       for w in (256, 384, 512, 768) for d in (1, 2, 3)},
    # A second seed of the best 4-minute code configuration: how much of a gap is luck.
    "w128e-s2": {"hidden_size": 128, "lr": round(0.01 * 2 ** 0.5, 5), "ema": "auto", "seed": 2},
    "w256": {"hidden_size": 256},
    "w384": {"hidden_size": 384, "lr": 0.008},
    "gru256e": {"cell": "gru", "lr": 0.005, "ema": "auto"},
    # Issue 23: AWD-LSTM's regularizers and the constant schedule, at the width the planner
    # takes for a small corpus read many times (sotu-250k at 4 minutes: 2x512).
    **{f"w512{name}e": {"hidden_size": 512, "lr": round(0.01 * (256 / 512) ** 0.5, 5), "ema": "auto", **extra}
       for name, extra in REGULARIZED.items()},
    "fp32": {"precision": "fp32"},  # the default model in fp32 on a CPU with native bf16
    "bf16": {"precision": "bf16"},
}


def machine() -> dict[str, str]:
    """The CPU model and the flags that matter for speed (lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"cpu": platform.processor() or platform.machine()}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"cpu": fields.get("Model name", "?").strip(), "cores": fields.get("CPU(s)", "?").strip(),
            "flags": " ".join(f for f in wanted if f in flags)}


# --- corpora --------------------------------------------------------------------------------


def prepare(work: Path) -> None:
    """Write the panel's corpora into WORK (State of the Union needs NLTK_DATA)."""
    from charlm.data.cache import encode_corpus

    work.mkdir(parents=True, exist_ok=True)
    sotu = encode_corpus(["nltk:state_union"])
    text = sotu.vocab.decode(sotu.ids.tolist())
    (work / "sotu.txt").write_text(text, encoding="utf-8")
    (work / "sotu-1m.txt").write_text(text[:1_000_000], encoding="utf-8")
    (work / "sotu-250k.txt").write_text(text[:250_000], encoding="utf-8")
    cut = int(len(text) * 0.95)
    (work / "sotu-first95.txt").write_text(text[:cut], encoding="utf-8")
    (work / "sotu-last5.txt").write_text(text[cut:], encoding="utf-8")
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    parts = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "tests/" in rel:
            continue
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    (work / "code.txt").write_text("\n\n".join(parts), encoding="utf-8")
    print(json.dumps({"prepared": str(work), "sotu_chars": len(text), "code_files": len(parts),
                      "code_chars": sum(map(len, parts))}))


def corpus_path(work: Path, name: str) -> Path:
    return work / f"{name}.txt"


# --- speed ----------------------------------------------------------------------------------


def shape_key(settings: dict[str, Any]) -> str:
    """What speed depends on: the model's shape, the batch layout, dropout and the cell."""
    from charlm.config.run import build_config

    cfg = build_config(None, {k: v for k, v in settings.items() if k in SPEED_FIELDS})
    m, t = cfg.model, cfg.train
    key = f"{m.cell}-{m.num_layers}x{m.hidden_size}-e{m.embedding_size}-d{m.dropout:g}-b{t.batch_size}x{t.seq_len}"
    key += f"-wd{m.weight_drop:g}-ld{m.locked_dropout:g}" if m.regularized() else ""  # one call per layer
    return key + ("" if cfg.session.precision == "auto" else f"-{cfg.session.precision}")


SPEED_FIELDS = ("cell", "num_layers", "hidden_size", "embedding_size", "dropout", "batch_size", "seq_len",
                "precision", "weight_drop", "locked_dropout")


def measure_speed(settings: dict[str, Any]) -> float:
    """Characters per CPU-second of one thread, for these settings (runs in a child process)."""
    import torch

    from charlm.config.run import build_config
    from charlm.training.planner import Shape
    from charlm.training.probe import step_seconds

    torch.set_num_threads(1)
    cfg = build_config(None, {k: v for k, v in settings.items() if k in SPEED_FIELDS})
    shape = Shape.of(cfg)
    steps = max(4, SPEED_CHARS // (shape.batch_size * shape.seq_len))
    return shape.batch_size * shape.seq_len / step_seconds(shape, 96, steps, torch.device("cpu"),
                                                           cfg.session.precision, cfg=cfg)


def speed_of(work: Path, settings: dict[str, Any]) -> float:
    """The cached single-thread speed of `settings`, measured now if it is not cached."""
    table_path = work / "speeds.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    key = shape_key(settings)
    if key not in table:
        out = subprocess.run([sys.executable, __file__, "speed", str(work), json.dumps(settings)],
                             capture_output=True, text=True, env=_one_thread_env(), check=True)
        table = json.loads(table_path.read_text()) if table_path.exists() else {}
        table[key] = json.loads(out.stdout.strip().splitlines()[-1])["chars_per_cpu_s"]
        table_path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return float(table[key])


def _one_thread_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# --- one run --------------------------------------------------------------------------------


def planned_steps(settings: dict[str, Any], budget_s: float, speed: float, corpus_chars: int) -> int:
    """Steps a `--time` run of `budget_s` plans at `speed` (the TimeBudget's own arithmetic)."""
    from charlm.config.run import build_config
    from charlm.training.budget import steps_in

    cfg = build_config(None, settings)
    per_batch = cfg.train.batch_size * cfg.train.seq_len
    return steps_in(budget_s, per_batch / speed, per_batch, cfg.train.scored_chars(train_part(corpus_chars)[1]),
                    cfg.session.eval_interval)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration for its planned steps; runs in a child process (one thread)."""
    import torch

    from charlm.config.run import build_config
    from charlm.storage.rundir import RunDir
    from charlm.training.session import fit

    torch.set_num_threads(1)
    cfg = build_config(None, {**job["settings"], "max_steps": job["steps"], "preview_length": 0, "keep": 0,
                              "device": "cpu", "seed": job["settings"].get("seed", 1337)})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = fit(cfg, [job["corpus"]], Path(tmp) / "run")
        rows = RunDir(Path(tmp) / "run").read_metrics()
    best = min(rows, key=lambda r: r["val_bpc"])
    return {"best_val_bpc": round(best["val_bpc"], 4), "final_val_bpc": round(rows[-1]["val_bpc"], 4),
            "final_train_bpc": round(rows[-1]["train_bpc"], 4), "best_at": round(best["step"] / result.step, 3),
            "steps": result.step, "chars": result.chars_seen, "wall_s": round(time.perf_counter() - t0, 1),
            "curve": [[r["step"], round(r["val_bpc"], 4)] for r in rows]}


def train_part(chars: int) -> tuple[int, int]:
    """Training and held-out characters of a corpus of `chars`, split as a run splits it."""
    import numpy as np

    from charlm.config.run import RunConfig
    from charlm.data.streams import split

    held = split(np.zeros(chars, dtype=np.uint8), RunConfig().train.val_fraction)
    return len(held.train), len(held.val)


def schedule(work: Path, cell: str, name: str, settings: dict[str, Any], probe_s: float = 0.0,
             plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job for one configuration in one cell (corpus@budget)."""
    corpus, budget = cell.split("@")
    path = corpus_path(work, corpus)
    chars = len(path.read_text(encoding="utf-8"))
    speed = speed_of(work, settings)
    fixed = {k: v for k, v in settings.items() if v != "auto"}  # "auto" is resolved below
    steps = planned_steps(fixed, BUDGETS[budget] - probe_s, speed, chars)
    passes = steps * _per_batch(fixed) / train_part(chars)[0]
    if settings.get("ema") == "auto":
        from charlm.training.planner import ema_for

        settings = {**settings, "ema": ema_for(steps, passes)}
    return {"cell": cell, "config": name, "settings": settings, "corpus": str(path), "steps": steps,
            "speed_cpu": round(speed), "corpus_chars": chars, "plan": plan, "passes": round(passes, 2)}


def _per_batch(settings: dict[str, Any]) -> int:
    from charlm.config.run import build_config

    t = build_config(None, settings).train
    return t.batch_size * t.seq_len


def run_jobs(work: Path, jobs: list[dict[str, Any]], parallel: int) -> None:
    done = _done(work)
    todo = [j for j in jobs if (j["cell"], j["config"], json.dumps(j["settings"], sort_keys=True)) not in done]
    with cf.ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(_child, j): j for j in todo}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            row = {**job, **fut.result(), "machine": machine()["cpu"], "date": time.strftime("%Y-%m-%d")}
            with open(work / "results.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("cell", "config", "best_val_bpc", "final_val_bpc",
                                                   "passes", "steps", "wall_s")}), flush=True)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "one", json.dumps(job)], capture_output=True, text=True,
                         env=_one_thread_env())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _done(work: Path) -> set[tuple[str, str, str]]:
    path = work / "results.jsonl"
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["cell"], r["config"], json.dumps(r["settings"], sort_keys=True)) for r in rows}


def cells(spec: str) -> list[str]:
    if spec == "all":
        return [f"{c}@{b}" for b in ("1m", "4m") for c in CORPORA] + ["sotu@30m"]
    return spec.split(",")


# --- the planner's choice -------------------------------------------------------------------


def planner_job(work: Path, cell: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """What charlm's planner picks for a cell, given the same single-core speeds, charged the
    time its probe would take (PROBE_TIMED_STEPS timed steps and the untimed warm-up steps per
    shape); `fixed`: settings every run of the panel has (as a user's flags, the plan keeps them)."""
    from charlm.config.run import RunConfig
    from charlm.training.budget import UNTIMED_STEPS
    from charlm.training.planner import PROBE_TIMED_STEPS, make_plan

    fixed = fixed or {}
    corpus, budget = cell.split("@")
    chars = len(corpus_path(work, corpus).read_text(encoding="utf-8"))
    train_chars, val_chars = train_part(chars)
    probe_s = 0.0

    def speed(shape: Any) -> float:
        nonlocal probe_s
        cps = speed_of(work, {**shape.settings(), **fixed})
        probe_s += (PROBE_TIMED_STEPS + UNTIMED_STEPS) * shape.batch_size * shape.seq_len / cps
        return cps

    cfg = RunConfig()
    cfg.session.time = f"{BUDGETS[budget]}s"
    plan = make_plan(cfg, set(fixed), train_chars, val_chars, 96, speed, "cpu")
    return schedule(work, cell, "planner", {**plan.settings, **fixed}, probe_s,
                    plan={"why": plan.why, "passes": round(plan.passes, 2), "probe_s": round(probe_s, 2)})


def table(work: Path) -> None:
    """Per cell: today's fixed default, the best hand configuration, the planner; then every run."""
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines() if line.strip()]
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    order = sorted(by_cell, key=lambda c: (BUDGETS[c.split("@")[1]], CORPORA.index(c.split("@")[0])))
    print("| cell | fixed default | best by hand (of N) | planner | planner - best | planner - default |")
    print("|---|---|---|---|---|---|")
    for cell in order:
        runs = by_cell[cell]
        hand = [r for r in runs if r["config"] != "planner"]
        best = min(hand, key=lambda r: r["best_val_bpc"], default=None)
        default = next((r for r in runs if r["config"] == "default"), None)
        plan = next((r for r in runs if r["config"] == "planner"), None)
        d = f"{default['best_val_bpc']:.4f}" if default else "-"
        b = f"{best['best_val_bpc']:.4f} ({best['config']}, of {len(hand)})" if best else "- (not swept)"
        p = f"{plan['best_val_bpc']:.4f} ({_describe(plan['settings'])})" if plan else "-"
        gap = f"{plan['best_val_bpc'] - best['best_val_bpc']:+.4f}" if plan and best else "-"
        vs = f"{plan['best_val_bpc'] - default['best_val_bpc']:+.4f}" if plan and default else "-"
        print(f"| {cell} | {d} | {b} | {p} | {gap} | {vs} |")
    print()
    print("| cell | config | settings | passes | steps | best val bpc | final val bpc |")
    print("|---|---|---|---|---|---|---|")
    for cell in order:
        for r in sorted(by_cell[cell], key=lambda r: r["best_val_bpc"]):
            print(f"| {cell} | {r['config']} | {_describe(r['settings'])} | {r['passes']} | {r['steps']:,} | "
                  f"{r['best_val_bpc']:.4f} | {r['final_val_bpc']:.4f} |")


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def _setting(item: str) -> tuple[str, Any]:
    """FIELD=VALUE of `--set`: the value as JSON reads it (0.1, 3, true), else the string."""
    field, _, value = item.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "panel", "planner", "table", "speed", "one"])
    ap.add_argument("work", help="the panel's folder (for `one`: the job, as JSON)")
    ap.add_argument("settings", nargs="?", default="{}", help="for `speed`: the settings, as JSON")
    ap.add_argument("--cells", default="all")
    ap.add_argument("--configs", default="default")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"],
                    help="every run in this precision (fp32: a slower machine)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a setting every run of this call has, the planner's included (it keeps it, as it "
                         "keeps a user's flag); repeatable, e.g. --set weight_decay=0.1")
    args = ap.parse_args()
    if args.what == "one":  # child: args.work is the job
        print(json.dumps(run_one(json.loads(args.work))))
        return
    work = Path(args.work)
    fixed: dict[str, Any] = {"precision": args.precision} if args.precision else {}
    fixed.update(_setting(item) for item in args.set)
    if args.what == "prepare":
        prepare(work)
        print(json.dumps(machine()))
    elif args.what == "speed":  # child: one speed measurement, printed
        print(json.dumps({"chars_per_cpu_s": measure_speed(json.loads(args.settings))}))
    elif args.what == "panel":
        # "planner" among the configurations: what charlm's planner picks, in the same pool.
        jobs = [planner_job(work, cell, fixed) if name == "planner"
                else schedule(work, cell, name, {**CONFIGS[name], **fixed})
                for cell in cells(args.cells) for name in args.configs.split(",")]
        run_jobs(work, jobs, args.parallel)
    elif args.what == "planner":
        run_jobs(work, [planner_job(work, cell, fixed) for cell in cells(args.cells)], args.parallel)
    else:
        table(work)


if __name__ == "__main__":
    main()
