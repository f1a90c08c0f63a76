"""What checking every stored byte costs: checkpoint digests and the corpus cache's block checksums.

    python benchmarks/verify_speed.py [--rounds 7]

Prints JSON: the machine (CPU model and the flags that pick kernels); for checkpoints of the
default shape (2x256 LSTM) and of 2x1024 (what the planner takes on a GPU), each written by
charlm with its optimizer state: the file's size, the load time as charlm loads it (checksums
checked) and without the check (the same `torch.load` and parsing), their ratio, and the
digest's own speed in ms per MB; for the corpus cache, the CRC-32 of its blocks in ms per MB
over a 64 MB entry. Medians over --rounds, the two loads alternating.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.config.run import ModelConfig, RunConfig
from charlm.data.checked import BLOCK_BYTES, block_crcs
from charlm.model.network import CharRNN
from charlm.storage import checkpoint
from charlm.storage.digest import digests


def machine() -> dict[str, Any]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    name = re.search(r"Model name:\s*(.+)", out)
    flags = set((re.search(r"Flags:\s*(.+)", out) or re.search(r"(x)", "x")).group(1).split())  # type: ignore[union-attr]
    return {"cpu": name.group(1).strip() if name else platform.processor(),
            "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "sha_ni") if f in flags],
            "torch": torch.__version__}


def a_checkpoint(hidden: int, folder: Path) -> Path:
    """A charlm checkpoint of a 2-layer LSTM of width `hidden`, with AdamW's two moments."""
    cfg = RunConfig()
    cfg.model = ModelConfig(hidden_size=hidden)
    model = CharRNN(cfg.model, 92)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 2, dtype=torch.long))[0].sum().backward()
    opt.step()
    ck = checkpoint.Checkpoint(model={k: v.detach() for k, v in model.state_dict().items()}, config=cfg,
                               vocab="".join(chr(32 + i) for i in range(92)), corpus={"specs": ["x"]},
                               optimizer=opt.state_dict())
    path = folder / f"h{hidden}.pt"
    path.write_bytes(checkpoint.serialize(ck))
    return path


def unchecked(path: Path) -> checkpoint.Checkpoint:
    """The same load without the digest: read, upgrade, parse, refuse non-finite weights."""
    obj = checkpoint._read(path)
    ck = checkpoint.Checkpoint.from_dict(checkpoint._upgrade(obj), str(path))
    checkpoint._check_finite(ck, path)
    return ck


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "checkpoints": []}
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (256, 1024):
            path = a_checkpoint(hidden, Path(tmp))
            mb = path.stat().st_size / 1e6
            checked, plain = [], []
            for _ in range(args.rounds):
                checked.append(timed(lambda path=path: checkpoint.load(path)))
                plain.append(timed(lambda path=path: unchecked(path)))
            raw = torch.load(path, weights_only=True)
            digest = statistics.median(timed(lambda raw=raw: digests(raw)) for _ in range(args.rounds))
            out["checkpoints"].append({
                "shape": f"2x{hidden}", "mb": round(mb, 1),
                "load_ms_checked": round(1000 * statistics.median(checked), 1),
                "load_ms_unchecked": round(1000 * statistics.median(plain), 1),
                "ratio": round(statistics.median(checked) / statistics.median(plain), 3),
                "digest_ms_per_mb": round(1000 * digest / mb, 3)})
    ids = np.random.default_rng(0).integers(0, 92, 64 << 20, dtype=np.uint8)
    crc = statistics.median(timed(lambda: block_crcs(ids)) for _ in range(args.rounds))
    out["cache"] = {"entry_mb": 64, "block_bytes": BLOCK_BYTES, "crc_ms_per_mb": round(1000 * crc / 64, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
