"""Fine-tuning vs training from scratch on a small corpus, at the same time budget.

    NLTK_DATA=../shared/data/nltk_data python benchmarks/finetune.py [--base-time 6m] [--times 1m,4m]
    python benchmarks/finetune.py --base runs/base/best.pt      # reuse a base model
    python benchmarks/finetune.py --base-steps 3000 --steps 250,1000   # budgets in steps

State of the Union, split by year (the NLTK file ids are YEAR-President.txt):

- base: a model trained on the speeches up to 1990 for --base-time or --base-steps (once;
  or --base);
- small corpus: the first --kb thousand characters of the later speeches (1991 on);
- test text: the later speeches after those, none of it in the small corpus, with the
  characters the small corpus lacks removed, so both models score exactly the same text.

For each N in --times: a run fine-tuned from the base (`--init-from`) and a run from
scratch (the default model), each trained on the small corpus for N with the default
settings, then both best.pt scored on the test text. --steps does the same with step
budgets, which a machine shared with other work cannot skew. The base itself is scored too (0
minutes of fine-tuning). `--ft-set KEY=VALUE` adds fine-tuning runs with other settings.
Prints one JSON line per run and a markdown table. The subsets are written to a temporary
folder (or --workdir, kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from charlm.api import load
from charlm.config.run import build_config
from charlm.training.session import fit


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        cpus = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("CPU(s)"))
        return f"{name}, {cpus} CPUs"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def write_subsets(folder: Path, kb: int) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The base speeches (a folder), the small corpus and the test text (files)."""
    from nltk.corpus import state_union

    ids = sorted(state_union.fileids())
    early = [f for f in ids if int(f[:4]) <= 1990]
    later = [f for f in ids if int(f[:4]) > 1990]
    base = folder / "base"
    base.mkdir()
    for f in early:
        (base / f).write_text(state_union.raw(f), encoding="utf-8")
    raws = [state_union.raw(f) for f in later]
    text = "\n\n".join(raws)
    starts = [sum(len(r) + 2 for r in raws[:i]) for i in range(len(raws))]
    cut = kb * 1000
    used = [f for f, s in zip(later, starts, strict=True) if s < cut]
    small = text[:cut]
    # The test speeches start after the last one the small corpus touches: whole speeches.
    rest = text[starts[len(used)]:]
    keep = set(small)
    test = "".join(c for c in rest if c in keep)
    (folder / "small.txt").write_text(small, encoding="utf-8")
    (folder / "test.txt").write_text(test, encoding="utf-8")
    return base, folder / "small.txt", folder / "test.txt", {
        "base_speeches": f"{early[0]} .. {early[-1]} ({len(early)} files)",
        "small_corpus": f"first {len(small):,} characters of {used[0]} .. {used[-1]}",
        "test_text": f"{later[len(used)]} .. {later[-1]} ({len(later) - len(used)} files): {len(test):,} characters "
                     f"({len(rest) - len(test)} removed: not in the small corpus)"}


def score(ckpt: Path, test: Path) -> dict[str, Any]:
    result = load(ckpt).evaluate([str(test)])
    return {"test_bpc": round(result["bpc"], 4), "test_chars": result["chars"], "skipped": result["skipped_chars"]}


def run(name: str, flags: dict[str, Any], corpus: list[str], out: Path, test: Path) -> dict[str, Any]:
    """A run with the built-in defaults but for `flags` (a fine-tuned one takes its model settings
    from its base)."""
    cfg = build_config(None, {**flags, "preview_length": 0, "keep": 0})
    t0 = time.perf_counter()
    result = fit(cfg, corpus, out, explicit=set(flags), planner=False)
    row = {"run": name, **{k: v for k, v in flags.items() if k != "init_from"},
           "steps": result.step, "train_s": round(result.elapsed, 1), "wall_s": round(time.perf_counter() - t0, 1),
           "val_bpc": round(result.best_val_bpc or 0.0, 4), **score(out / "best.pt", test)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="a base checkpoint to reuse (trained on the speeches up to 1990)")
    ap.add_argument("--base-time", default="6m")
    ap.add_argument("--base-steps", type=int, default=0, help="train the base for this many steps instead")
    ap.add_argument("--times", default="1m,4m", help="time budgets of the two runs (comma list; '' for none)")
    ap.add_argument("--steps", default="", help="step budgets of the two runs (comma list)")
    ap.add_argument("--kb", type=int, default=100, help="thousands of characters in the small corpus")
    ap.add_argument("--ft-set", action="append", default=[], help="an extra fine-tuning run: KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--only-extra", action="store_true", help="run only the --ft-set runs (with --base)")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: PyTorch's choice)")
    ap.add_argument("--workdir", type=Path, help="keep the subsets and runs in this new folder (default: a "
                    "temporary one, removed at the end)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="charlm-finetune-") as tmp:
        folder = Path(tmp) if args.workdir is None else args.workdir
        folder.mkdir(parents=True, exist_ok=args.workdir is None)
        base_dir, small, test, subsets = write_subsets(folder, args.kb)
        print(json.dumps({"machine": machine(), "threads": torch.get_num_threads(), **subsets}), flush=True)
        base = args.base
        if base is None:
            budget = {"max_steps": args.base_steps} if args.base_steps else {"time": args.base_time}
            run("base", budget, [str(base_dir)], folder / "base-run", test)
            base = folder / "base-run" / "best.pt"
        print(json.dumps({"run": "base (no fine-tuning)", "checkpoint": str(base), **score(base, test)}), flush=True)
        extra = [dict(item.split("=", 1) for item in spec.split(",")) for spec in args.ft_set]
        rows = []
        budgets = [{"time": t} for t in args.times.split(",") if t]
        budgets += [{"max_steps": int(n)} for n in args.steps.split(",") if n]
        for budget in budgets:
            name = str(next(iter(budget.values())))
            if not args.only_extra:
                rows.append(run("scratch", budget, [str(small)], folder / f"scratch-{name}", test))
                rows.append(run("fine-tuned", {**budget, "init_from": str(base)}, [str(small)],
                                folder / f"ft-{name}", test))
            for i, changes in enumerate(extra):
                flags = {**budget, "init_from": str(base), **{k: json.loads(v) for k, v in changes.items()}}
                rows.append(run("fine-tuned", flags, [str(small)], folder / f"ft{i}-{name}", test))
        print("\n| run | budget | settings | steps | training time | test bpc |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            settings = ", ".join(f"{k}={v}" for k, v in r.items()
                                 if k not in ("run", "time", "max_steps", "steps", "train_s", "wall_s", "val_bpc",
                                              "test_bpc", "test_chars", "skipped")) or "defaults"
            spent = r.get("time") or f"{r['max_steps']} steps"
            print(f"| {r['run']} | {spent} | {settings} | {r['steps']:,} | {r['train_s']:.0f} s | "
                  f"{r['test_bpc']:.4f} |")


if __name__ == "__main__":
    main()
