"""Corpus encoding and training cost as the corpus grows: 50 MB, 200 MB and 1 GB.

    python benchmarks/corpus_scale.py [--sizes 50,200,1000] [--steps 50] [--workdir DIR] [--keep]
    python benchmarks/corpus_scale.py --sizes 5,20 --steps 20 --source FILE   # quick check

Builds one synthetic UTF-8 corpus per size (MB = 10^6 bytes) by writing the paragraphs of
real text (split on blank lines) over and over, each pass in a new seeded shuffle, so the
vocabulary and character statistics are realistic. The text is --source FILE if given,
else State of the Union (nltk:state_union, needs NLTK_DATA), else the repository's own
README.md, docs/*.md and */*.py; the first JSON line says which. Files go to a temporary folder (under
--workdir if given) that is removed at the end unless --keep.

Each size is measured in a fresh child process, so its peak RSS (`ru_maxrss`) is its own:
  - encoding with an empty cache: seconds, MB/s (source bytes / seconds), characters,
    vocabulary size, id dtype and peak RSS afterwards;
  - encoding again (a cache hit: one hashing pass): seconds;
  - `--steps` training steps of the default model on the CPU: chars/s (chars seen / time in
    training steps; the one evaluation at the end is not timed) and peak RSS at the end.
A bare child that only imports torch and charlm gives the baseline RSS; "above baseline"
is to be compared with the size of the encoded id array.

Prints machine info, one JSON line per size, then a summary: per size the ratios to the
smallest size (encode seconds ratio / size ratio, 1.0 = linear; MB/s from the previous size,
in which fixed start-up costs cancel out; RSS growth; chars/s ratio) and pass/fail for the
targets: encoding >= 50 MB/s at every size, peak RSS <= 2.5 GB (2.5e9 bytes) for the
1000 MB corpus. The OS page cache cannot be dropped without root: each source file has
just been written, so encoding likely reads it from memory, not from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
ENCODE_TARGET_MB_S = 50.0
RSS_TARGET_BYTES, RSS_TARGET_SIZE_MB = 2.5e9, 1000
WRITE_CHUNK = 4 << 20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1)


def source_text(source: str | None) -> tuple[str, str]:
    """(text, description): --source FILE, else nltk:state_union, else the repo's own files."""
    if source:
        return Path(source).read_text(encoding="utf-8"), source
    try:
        from charlm.data.cache import encode_corpus

        enc = encode_corpus(["nltk:state_union"])
        return enc.vocab.decode(enc.ids.tolist()), "nltk:state_union"
    except Exception:
        files = [REPO / "README.md", *sorted(REPO.glob("docs/*.md")), *sorted(REPO.glob("*/*.py"))]
        files = [p for p in files if p.is_file()]
        return ("\n\n".join(p.read_text(encoding="utf-8") for p in files),
                f"repository files ({len(files)}: README.md, docs/*.md, */*.py)")


def build_corpus(paragraphs: list[str], target: int, path: Path, seed: int) -> int:
    """Write shuffled passes over `paragraphs` to `path` (buffered, WRITE_CHUNK at a time)
    until at least `target` bytes; whole paragraphs only, so UTF-8 is never cut. Returns bytes."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb", buffering=WRITE_CHUNK) as fh:
        while written < target:
            order = paragraphs[:]
            rng.shuffle(order)
            for para in order:
                written += fh.write(para.encode("utf-8") + b"\n\n")
                if written >= target:
                    break
    return written


def child(corpus: str | None, cache: str, steps: int) -> dict[str, Any]:
    """Runs in a fresh process: import (baseline), encode, encode again, train."""
    import torch

    from charlm.config.run import RunConfig
    from charlm.data.cache import encode_corpus
    from charlm.training.session import fit

    row: dict[str, Any] = {"rss_after_import_mb": peak_rss_mb()}
    if not corpus:
        return {**row, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    ec = encode_corpus([corpus], cache_dir=Path(cache))
    encode_s = time.perf_counter() - t0
    assert ec.encoded, "the cache folder was not empty"
    size = os.path.getsize(corpus)
    row.update(source_mb=round(size / MB, 2), chars=len(ec.ids), vocab=len(ec.vocab),
               dtype=ec.ids.dtype.name, ids_mb=round(ec.ids.nbytes / MB, 1),
               encode_s=round(encode_s, 3), encode_mb_s=round(size / MB / encode_s, 1),
               peak_rss_after_encode_mb=peak_rss_mb())
    t0 = time.perf_counter()
    ec2 = encode_corpus([corpus], cache_dir=Path(cache))
    row["cache_hit_s"] = round(time.perf_counter() - t0, 3)
    assert not ec2.encoded, "the second encoding was not a cache hit"
    cfg = RunConfig()
    cfg.session.max_steps = steps
    cfg.session.eval_interval = 10**9
    cfg.session.preview_length = 0
    cfg.session.keep = 0
    cfg.session.device = "cpu"
    with tempfile.TemporaryDirectory(dir=cache) as out:
        result = fit(cfg, None, Path(out) / "run", corpus=ec2)
    row.update(train_steps=result.step, train_chars_per_s=round(result.chars_seen / result.elapsed),
               peak_rss_mb=peak_rss_mb())
    return row


def run_child(corpus: Path | None, cache: Path | None, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(corpus or ""), "--cache", str(cache or ""),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": f"child exited with {proc.returncode}", "stdout_tail": proc.stdout[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict[str, Any]], baseline_mb: float) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {"summary": True, "baseline_rss_mb": baseline_mb, "ratios_vs_smallest": []}
    if ok:
        base = ok[0]
        base_above = max(base["peak_rss_mb"] - baseline_mb, 1e-9)
        for i, r in enumerate(ok):
            size_ratio = r["source_mb"] / base["source_mb"]
            marginal = None  # MB/s from the previous size to this one: fixed costs cancel out
            if i:
                prev = ok[i - 1]
                dt = max(r["encode_s"] - prev["encode_s"], 1e-9)
                marginal = round((r["source_mb"] - prev["source_mb"]) / dt, 1)
            summary["ratios_vs_smallest"].append({
                "size_mb": r["size_mb"],
                "size_ratio": round(size_ratio, 2),
                "encode_s_ratio": round(r["encode_s"] / base["encode_s"], 2),
                "encode_linearity": round(r["encode_s"] / base["encode_s"] / size_ratio, 3),
                "marginal_encode_mb_s": marginal,
                "cache_hit_linearity": round(r["cache_hit_s"] / base["cache_hit_s"] / size_ratio, 3),
                "rss_above_baseline_mb": round(r["peak_rss_mb"] - baseline_mb, 1),
                "rss_above_baseline_ratio": round((r["peak_rss_mb"] - baseline_mb) / base_above, 2),
                "rss_above_baseline_per_ids_mb": round((r["peak_rss_mb"] - baseline_mb) / r["ids_mb"], 3),
                "train_chars_per_s_ratio": round(r["train_chars_per_s"] / base["train_chars_per_s"], 3),
            })
    big = [r for r in ok if r["size_mb"] == RSS_TARGET_SIZE_MB]
    summary["targets"] = {
        f"encode_mb_s>={ENCODE_TARGET_MB_S:g}_every_size":
            bool(ok) and len(ok) == len(rows) and all(r["encode_mb_s"] >= ENCODE_TARGET_MB_S for r in ok),
        f"peak_rss_at_{RSS_TARGET_SIZE_MB}mb<=2.5GB":
            (big[0]["peak_rss_mb"] * MB <= RSS_TARGET_BYTES) if big else "not measured",
        "failed_sizes": [r["size_mb"] for r in rows if "error" in r],
    }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,200,1000", help="corpus sizes in MB (10^6 bytes), comma list")
    ap.add_argument("--steps", type=int, default=50, help="training steps timed per size")
    ap.add_argument("--workdir", default=None, help="folder for the temporary files (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    ap.add_argument("--source", default=None, help="real text to repeat (default: nltk:state_union)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.cache, args.steps)), flush=True)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    text, source = source_text(args.source)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    del text
    baseline = run_child(None, None, args.steps)
    if "error" in baseline:
        sys.exit(f"the baseline child failed: {baseline}")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "torch": baseline.get("torch"), "torch_threads": baseline.get("torch_threads"),
                      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": sys.version.split()[0],
                      "source": source, "source_paragraphs": len(paragraphs),
                      "baseline_rss_mb": baseline.get("rss_after_import_mb")}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="charlm-corpus-scale-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            corpus, cache = work / f"corpus-{size}mb.txt", work / f"cache-{size}mb"
            cache.mkdir()
            t0 = time.perf_counter()
            build_corpus(paragraphs, size * MB, corpus, args.seed + size)
            row = {"size_mb": size, "build_s": round(time.perf_counter() - t0, 2),
                   **run_child(corpus, cache, args.steps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:  # free the disk before the next, bigger size
                corpus.unlink()
                shutil.rmtree(cache)
    finally:
        if args.keep:
            print(json.dumps({"kept": str(work)}), flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summarize(rows, baseline["rss_after_import_mb"])), flush=True)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
