"""Load test of `charlm serve` on the loopback address, against separate `charlm sample` runs.

    python benchmarks/serve_load.py [--checkpoint FILE] [--clients 1,8,32,64] [--length 500]
                                    [--rounds 3] [--no-processes] [--threads 1] [--timeout 300]

Starts `charlm serve CHECKPOINT --host 127.0.0.1 --port 0` and, for each N in --clients, runs
N concurrent clients, each asking --rounds times for --length characters as a stream
(server-sent events) with its own seed. Per level it reports requests/s, characters/s and
p50/p95 latency to the first character and to the end, and the server's resident memory
(RSS: before, peak, after). Then, unless --no-processes, N separate `charlm sample` processes
started at once (each with OMP_NUM_THREADS=1, what N processes on few cores want), timed
the same way: to the first character on stdout and to the process's end.

The largest level runs a second time, so memory that grows with use would show. "targets"
checks issue 24's bar, all from this one run: total chars/s at 32 clients >= 8x that of 1
client, p50 first character at 32 clients <= 50 ms, no failures at any level, and the
server's memory bounded (its peak in the repeated largest level no more than 10 % above the
first pass's). A fairness
check follows: the latency of a short request (50 characters) alone, and while a long one
(--long-length characters) is being generated. For scale, the library's own single-stream
speed (`CharLM.sample`, no HTTP) is measured in a separate process.

Every request has a socket timeout and every level a deadline: a request that fails or hangs
is counted in "failed" (which must be 0), and the run stops by itself. Only 127.0.0.1 is used.
The checkpoint defaults to the default shape (2x256 LSTM) trained for 50 steps on
nltk:state_union (needs NLTK_DATA) in a temporary folder: speed does not depend on how well
a model is trained. Progress goes to stderr; the JSON result to stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHARLM = [sys.executable, "-m", "charlm"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values, in milliseconds."""
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))], 1)


def stream(port: int, body: dict[str, Any], timeout: float) -> tuple[float, float, int]:
    """One streamed request: (seconds to the first character, seconds to the end, characters)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/generate", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first, chars, ended = None, 0, False
        event = "message"
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "message":
                    first = first if first is not None else time.perf_counter() - start
                    chars += len(data["text"])
                elif event == "end":
                    ended = True
                elif event == "error":
                    raise RuntimeError(data["error"])
            elif line == "":
                event = "message"
        if not ended or first is None:
            raise RuntimeError("stream ended without its end event")
        return first, time.perf_counter() - start, chars
    finally:
        conn.close()


class RssWatch:
    """Samples a process's RSS every 0.1 s in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def server_level(port: int, pid: int, n: int, rounds: int, length: int, timeout: float) -> dict[str, Any]:
    """N clients at once, each `rounds` sequential requests of `length` characters."""
    firsts: list[float] = []
    ends: list[float] = []
    chars = [0]
    failed: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(rounds):
            try:
                f, e, c = stream(port, {"length": length, "seed": 1000 * i + r}, timeout)
                with lock:
                    firsts.append(f)
                    ends.append(e)
                    chars[0] += c
            except Exception as exc:
                with lock:
                    failed.append(f"{type(exc).__name__}: {exc}")

    before = rss_mb(pid)
    watch = RssWatch(pid)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    deadline = start + timeout * rounds + 30
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - start
    hung = sum(t.is_alive() for t in threads)
    peak = watch.stop()
    done = len(ends)
    return {
        "clients": n, "requests": n * rounds, "ok": done, "failed": len(failed),
        "hung_clients": hung, "errors": failed[:3], "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 2), "chars_per_s": round(chars[0] / wall),
        "first_char_ms": {"p50": pct(firsts, 50), "p95": pct(firsts, 95)} if firsts else None,
        "end_ms": {"p50": pct(ends, 50), "p95": pct(ends, 95)} if ends else None,
        "server_rss_mb": {"before": round(before, 1), "peak": round(peak, 1),
                          "after": round(rss_mb(pid), 1)},
    }


def process_level(ckpt: Path, n: int, length: int, timeout: float) -> dict[str, Any]:
    """N `charlm sample` processes started at once: first character on stdout, and the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    firsts: list[float] = []
    ends: list[float] = []
    failed: list[str] = []
    chars = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        proc = subprocess.Popen([*CHARLM, "sample", "--checkpoint", str(ckpt), "--length", str(length),
                                 "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)
        try:
            assert proc.stdout is not None
            first_byte = proc.stdout.read(1)
            first = time.perf_counter() - start
            rest = proc.stdout.read()
            code = proc.wait(timeout=timeout)
            end = time.perf_counter() - start
            text = (first_byte + rest).decode()
            text = text.removesuffix("\n")  # the one newline sample ends with
            if code != 0 or len(text) != length:
                raise RuntimeError(f"exit {code}, {len(text)} chars: {proc.stderr.read()[:200]!r}")  # type: ignore[union-attr]
            with lock:
                firsts.append(first)
                ends.append(end)
                chars[0] += len(text)
        except Exception as exc:
            proc.kill()
            with lock:
                failed.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    wall = time.perf_counter() - start
    return {
        "processes": n, "ok": len(ends), "failed": len(failed), "errors": failed[:3],
        "wall_s": round(wall, 2), "requests_per_s": round(len(ends) / wall, 2),
        "chars_per_s": round(chars[0] / wall),
        "first_char_ms": {"p50": pct(firsts, 50), "p95": pct(firsts, 95)} if firsts else None,
        "end_ms": {"p50": pct(ends, 50), "p95": pct(ends, 95)} if ends else None,
    }


def fairness(port: int, long_length: int, timeout: float, repeats: int = 5) -> dict[str, Any]:
    """End latency of a 50-character request alone, and while a long request is generating."""
    alone = [stream(port, {"length": 50, "seed": i}, timeout)[1] for i in range(repeats)]
    result: dict[str, Any] = {}

    def long_request() -> None:
        result["long"] = stream(port, {"length": long_length, "seed": 99}, timeout)

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    time.sleep(0.3)  # the long request is under way
    beside = [stream(port, {"length": 50, "seed": i}, timeout)[1] for i in range(repeats)]
    still_running = t.is_alive()
    t.join(timeout)
    long_end = result["long"][1] if "long" in result else None
    return {"short_chars": 50, "long_chars": long_length,
            "short_alone_ms_median": round(1000 * statistics.median(alone), 1),
            "short_beside_long_ms_median": round(1000 * statistics.median(beside), 1),
            "long_still_running_after_the_shorts": still_running,
            "long_end_ms": round(1000 * long_end, 1) if long_end else None}


def library_speed(ckpt: Path, chars: int = 5000) -> int:
    """chars/s of one stream from the library in a fresh process, on one thread like the
    server (its ceiling for one request: the same sampler, no HTTP)."""
    code = ("import sys, time, torch, charlm; torch.set_num_threads(1); m = charlm.load(sys.argv[1]); "
            "m.sample(length=200, seed=0); "
            "t = time.perf_counter(); m.sample(length=int(sys.argv[2]), seed=1); "
            "print(int(sys.argv[2]) / (time.perf_counter() - t))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt), str(chars)], capture_output=True,
                         text=True, check=True).stdout
    return round(float(out))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor()


def cpu_flags() -> list[str]:
    """The instruction sets that pick PyTorch's CPU kernels, as lscpu lists them."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    m = re.search(r"Flags:\s*(.+)", out)
    flags = set(m.group(1).split()) if m else set()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def targets(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 24's bar, read off this run's levels (None where a level was not run)."""
    by = {lv["clients"]: lv for lv in levels}
    one, many = by.get(1), by.get(32)
    ratio = round(many["chars_per_s"] / one["chars_per_s"], 2) if one and many and one["chars_per_s"] else None
    first = many["first_char_ms"]["p50"] if many and many["first_char_ms"] else None
    largest = [lv for lv in levels if lv["clients"] == levels[-1]["clients"]]
    growth = (round(largest[-1]["server_rss_mb"]["peak"] / largest[0]["server_rss_mb"]["peak"], 3)
              if len(largest) > 1 else None)
    failures = sum(lv["failed"] + lv["hung_clients"] for lv in levels)
    return {"chars_per_s_32_over_1": ratio, "ok_ratio": ratio is not None and ratio >= 8,
            "first_char_p50_ms_at_32": first, "ok_first_char": first is not None and first <= 50,
            "failures": failures, "ok_failures": failures == 0,
            "peak_rss_repeat_over_first": growth, "ok_memory": growth is not None and growth <= 1.10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint (default: train one)")
    p.add_argument("--clients", default="1,8,32,64", help="comma list of concurrent clients")
    p.add_argument("--length", type=int, default=500, help="characters per request")
    p.add_argument("--rounds", type=int, default=3, help="sequential requests per client")
    p.add_argument("--long-length", type=int, default=10_000, help="the fairness check's long request")
    p.add_argument("--no-processes", action="store_true", help="skip the charlm sample processes")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (PyTorch CPU threads)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request (socket timeout)")
    args = p.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    server = None
    try:
        ckpt = args.checkpoint
        if ckpt is None:
            log("training a default-shape checkpoint for 50 steps...")
            subprocess.run([*CHARLM, "train", "nltk:state_union", "--out", str(tmp / "run"),
                            "--max-steps", "50", "--eval-interval", "50", "--no-preview", "--quiet"],
                           check=True)
            ckpt = tmp / "run" / "latest.pt"
        err_path = tmp / "serve.log"
        with open(err_path, "wb") as err:
            server = subprocess.Popen([*CHARLM, "serve", str(ckpt), "--host", "127.0.0.1", "--port", "0",
                                       "--max-in-flight", str(max(64, max(levels))),
                                       # every client is 127.0.0.1 here: one address may hold them all
                                       "--max-per-client", str(max(64, max(levels))),
                                       "--threads", str(args.threads)],
                                      stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"at http://127\.0\.0\.1:(\d+)/", err_path.read_text())):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"charlm serve did not start: {err_path.read_text()}")
            time.sleep(0.1)
        port = int(m.group(1))
        for i in range(3):  # warm-up: first requests pay for lazy imports and allocation
            stream(port, {"length": args.length, "seed": i}, args.timeout)
        rss_start = rss_mb(server.pid)

        result: dict[str, Any] = {
            "machine": {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d"), "load_avg_at_start": os.getloadavg()[0],
            "checkpoint": str(ckpt), "length": args.length, "rounds": args.rounds, "threads": args.threads,
            "library_single_stream_chars_per_s": library_speed(ckpt),
            "server": [], "processes": [],
        }
        # The largest level runs twice: memory that only grows would show in the second pass.
        for n in [*levels, levels[-1]]:
            log(f"server: {n} clients x {args.rounds} requests of {args.length} chars...")
            level = server_level(port, server.pid, n, args.rounds, args.length, args.timeout)
            log(f"  {json.dumps(level)}")
            result["server"].append(level)
        result["targets"] = targets(result["server"])
        log(f"targets: {json.dumps(result['targets'])}")
        log("fairness: a short request alone and beside a long one...")
        result["fairness"] = fairness(port, args.long_length, args.timeout)
        result["server_rss_mb"] = {"after_warmup": round(rss_start, 1), "end": round(rss_mb(server.pid), 1)}
        if not args.no_processes:
            for n in levels:
                log(f"processes: {n} x charlm sample --length {args.length}...")
                level = process_level(ckpt, n, args.length, args.timeout)
                log(f"  {json.dumps(level)}")
                result["processes"].append(level)
        result["all_ok"] = (all(lv["failed"] == 0 and lv["hung_clients"] == 0 for lv in result["server"])
                            and all(lv["failed"] == 0 for lv in result["processes"]))
        result["load_avg_at_end"] = os.getloadavg()[0]
        print(json.dumps(result, indent=2))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
