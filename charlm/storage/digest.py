"""A checkpoint's digest: a CRC-32 of each of its parts, so that damage is found and named.

The parts are the groups of a checkpoint's plain dict (`charlm.storage.checkpoint`), named
as a damaged one is reported (`PARTS`; every other group is "metadata"). A group is
digested with its keys sorted and every tensor's dtype, shape and bytes; CRC-32 runs at
memory speed (2.2 GB/s on this project's machines), and a checkpoint is a few megabytes.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

# The parts a digest covers, as a damaged one is named; every other group is "metadata".
PARTS = {"model": "weights", "live": "training weights", "optimizer": "optimizer state",
         "scaler": "optimizer state", "ranks": "random-number state", "hidden": "carried hidden state"}
METADATA = "metadata"
_PARALLEL_BYTES = 32 << 20  # from this size on, tensors are summed on every core at once


def seal(d: dict[str, Any]) -> dict[str, Any]:
    """`d` (a checkpoint's plain dict) with its digest: a CRC-32 per part (`PARTS`)."""
    return {**{k: v for k, v in d.items() if k != "digest"}, "digest": {"algorithm": "crc32", "parts": digests(d)}}


def digests(d: dict[str, Any]) -> dict[str, str]:
    """A CRC-32 of each part of `d` (its groups, keys sorted; every tensor's dtype, shape and
    the CRC-32 of its bytes). The tensors' bytes are summed on every core at once: zlib lets
    go of the interpreter while it sums a large buffer."""
    tensors: list[torch.Tensor] = []
    _tensors(d, tensors)
    if sum(t.numel() * t.element_size() for t in tensors) < _PARALLEL_BYTES:  # threads would cost more
        sums = {id(t): _bytes_crc(t) for t in tensors}
    else:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            sums = dict(zip(map(id, tensors), pool.map(_bytes_crc, tensors), strict=True))
    crcs: dict[str, int] = {}
    for key in sorted(k for k in d if k != "digest"):
        part = PARTS.get(key, METADATA)
        crcs[part] = _crc(d[key], _crc(key, crcs.get(part, 0), sums), sums)
    return {part: f"{crc:08x}" for part, crc in sorted(crcs.items())}


def _tensors(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _tensors(v, out)


def _bytes_crc(t: torch.Tensor) -> int:
    t = t.detach().cpu().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data) if t.numel() else 0


def _crc(obj: Any, crc: int, sums: dict[int, int]) -> int:
    """`crc` updated with `obj`: tensors by dtype, shape and the CRC of their bytes (`sums`),
    containers in a fixed order (a tuple and a list alike: a checkpoint's tuples load back as
    lists), the rest by their repr."""
    if isinstance(obj, torch.Tensor):
        return zlib.crc32(f"T{obj.dtype}{tuple(obj.shape)}:{sums[id(obj)]:08x}".encode(), crc)
    if isinstance(obj, dict):
        crc = zlib.crc32(f"D{len(obj)}".encode(), crc)
        for k in sorted(obj, key=repr):
            crc = _crc(obj[k], _crc(k, crc, sums), sums)
        return crc
    if isinstance(obj, list | tuple):
        crc = zlib.crc32(f"L{len(obj)}".encode(), crc)
        for v in obj:
            crc = _crc(v, crc, sums)
        return crc
    return zlib.crc32(repr(obj).encode("utf-8", "surrogatepass"), crc)
