"""Novelty index and report speed: building the suffix array of a 100 MB corpus, and a
report on 10k generated characters.

    python benchmarks/novelty_speed.py [--size-mb 100] [--doubling-mb 10,100] [--report-chars 10000]
    python benchmarks/novelty_speed.py --size-mb 5 --doubling-mb 5   # quick check

Targets (issue 15): the index of a 100 MB corpus built within a minute, a report on 10k
generated characters within a second.

The corpus is the paragraphs of State of the Union (nltk:state_union, needs NLTK_DATA; else
the repository's README.md and */*.py) written over and over, each pass in a new seeded
shuffle, to --size-mb MB: realistic characters, and every paragraph repeated once per pass,
so long repeats (a hard case for suffix sorting) are common. It is encoded into a
temporary corpus cache like any training run.

Measured, one JSON line each:
  - build: `charlm.analysis.novelty.open_index` on an empty cache (libdivsufsort through
    pydivsufsort, then the atomic write and checksum): seconds, MB/s, peak RSS;
  - doubling: a plain numpy prefix-doubling suffix array (the dependency-free alternative)
    on the first --doubling-mb MB of the same ids: seconds and rounds; the two arrays are
    compared for equality;
  - open: `open_index` again (the cached index: checks only): seconds;
  - report: `novelty_report` on --report-chars characters of "generated" text, sampled
    from a character 6-gram model of the same text (locally plausible and mostly novel at
    16+ characters, like a char-RNN's samples): first call and median of 5 calls.
Then a summary line with the targets. The CPU is shared with other work: the load average
at the start is printed with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MB = 10**6
BUILD_TARGET_S, REPORT_TARGET_S = 60.0, 1.0


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1)


def source_text() -> tuple[str, str]:
    from charlm.data.sources import iter_text, resolve_all
    from charlm.errors import CharLMError

    try:
        _, docs = resolve_all(["nltk:state_union"])
        return "\n\n".join("".join(iter_text(d, None)) for d in docs), "nltk:state_union"
    except CharLMError:  # NLTK's data missing: the repository's own text
        files = [REPO / "README.md", *sorted(REPO.glob("*/*.py"))]
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files), "repository files"


def write_corpus(text: str, target: int, path: Path, seed: int = 0) -> int:
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    written = 0
    with open(path, "wb", buffering=4 << 20) as fh:
        while written < target:
            order = paragraphs[:]
            rng.shuffle(order)
            for p in order:
                data = (p + "\n\n").encode("utf-8")
                fh.write(data)
                written += len(data)
                if written >= target:
                    break
    return written


def markov_text(text: str, length: int, order: int = 6, seed: int = 1) -> str:
    """`length` characters from a character `order`-gram model of `text`."""
    table: dict[str, list[str]] = defaultdict(list)
    for i in range(min(len(text), 2_000_000) - order):
        table[text[i:i + order]].append(text[i + order])
    rng = random.Random(seed)
    start = rng.randrange(len(text) - order)
    out = list(text[start:start + order])
    while len(out) < length:
        nxt = table.get("".join(out[-order:]))
        if not nxt:
            start = rng.randrange(len(text) - order)
            out.extend(text[start:start + order])
            continue
        out.append(rng.choice(nxt))
    return "".join(out[:length])


def prefix_doubling(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Suffix array by prefix doubling (Manber-Myers with numpy sorts); returns it and the
    number of sorting rounds. Ranks of the first k ids are refined to 2k each round."""
    n = len(ids)
    rank = np.asarray(ids, dtype=np.int64)
    k, rounds = 1, 0
    while True:
        rounds += 1
        second = np.zeros(n, dtype=np.int64)  # 0 = past the end, sorts first
        second[:n - k] = rank[k:] + 1
        key = rank * (n + 1) + second
        sa = np.argsort(key, kind="stable")
        sorted_key = key[sa]
        new = np.empty(n, dtype=np.int64)
        new[sa] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new
        del key, sorted_key, second
        if rank.max() == n - 1 or k >= n:
            return sa, rounds
        k *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=100.0)
    ap.add_argument("--doubling-mb", default="10,100",
                    help="comma list of prefix sizes for the numpy baseline ('' = none)")
    ap.add_argument("--report-chars", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from charlm.analysis.novelty import novelty_report, open_index
    from charlm.data.cache import encode_corpus

    emit({"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                      "numpy": np.__version__, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}})
    text, source = source_text()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        corpus_path = folder / "corpus.txt"
        size = write_corpus(text, int(args.size_mb * MB), corpus_path)
        corpus = encode_corpus([str(corpus_path)], cache_dir=folder / "cache")
        n = len(corpus.ids)
        emit({"corpus": {"source": source, "bytes": size, "chars": n, "dtype": corpus.ids.dtype.name,
                         "vocab": len(corpus.vocab)}})

        t0 = time.perf_counter()
        index = open_index(corpus, n)
        build_s = time.perf_counter() - t0
        assert index.built
        emit({"build": {"chars": n, "seconds": round(build_s, 2), "mb_per_s": round(size / MB / build_s, 1),
                        "index_mb": round(index.path.stat().st_size / MB, 1), "peak_rss_mb": peak_rss_mb()}})

        for mb in [float(x) for x in args.doubling_mb.split(",") if x.strip()]:
            m = min(n, int(mb * MB))
            t0 = time.perf_counter()
            sa, rounds = prefix_doubling(np.asarray(corpus.ids[:m]))
            seconds = time.perf_counter() - t0
            same = bool(np.array_equal(sa, index.sa[:m])) if m == n else None
            if m < n:  # compare with libdivsufsort on the same prefix
                from charlm.analysis.suffix import suffix_array
                t1 = time.perf_counter()
                ref = suffix_array(np.asarray(corpus.ids[:m]))
                ref_s = time.perf_counter() - t1
                same = bool(np.array_equal(sa, ref))
            else:
                ref_s = build_s
            emit({"doubling": {"chars": m, "seconds": round(seconds, 2), "rounds": rounds,
                               "divsufsort_seconds": round(ref_s, 2), "ratio": round(seconds / ref_s, 1),
                               "same_array": same, "peak_rss_mb": peak_rss_mb()}})
            del sa

        t0 = time.perf_counter()
        index = open_index(corpus, n)
        open_s = time.perf_counter() - t0
        assert not index.built
        emit({"open": {"seconds": round(open_s, 4)}})

        generated = markov_text(text, args.report_chars)
        times = []
        report: dict[str, Any] = {}
        for _ in range(6):
            t0 = time.perf_counter()
            report = novelty_report(index, [generated])
            times.append(time.perf_counter() - t0)
        emit({"report": {"chars": len(generated), "first_s": round(times[0], 3),
                         "median_s": round(statistics.median(times[1:]), 3),
                         "longest_span": report["longest_span"]["length"],
                         "novel_share": {k: v["novel_share"] for k, v in report["ngrams"].items()}}})
        emit({"summary": {"build_s": round(build_s, 2), "build_target_s": BUILD_TARGET_S,
                          "build_ok": build_s <= BUILD_TARGET_S, "report_s": round(times[0], 3),
                          "report_target_s": REPORT_TARGET_S, "report_ok": times[0] <= REPORT_TARGET_S}})


if __name__ == "__main__":
    main()
