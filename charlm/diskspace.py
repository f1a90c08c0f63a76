"""Disk space: what a run's checkpoints take, a warning when `--out` is short of it, and one
line (never a traceback) when a write fails, a full disk most often.

A checkpoint holds the weights and AdamW's two moments, all fp32, plus the carried hidden
state and a few kilobytes of RNG states and settings::

    checkpoint bytes ~ 12 x parameters + 4 x hidden-state values + 32 KiB

(`benchmarks/RESULTS.md`: within 1 % of real files above a million parameters; the 32 KiB
cover the rest for any size). A run keeps `--keep` step files besides `latest.pt` and
`best.pt`; while it saves, a new step file exists before the oldest is pruned, and each
file is written to a temporary file before it replaces the old one, so at the peak of a
save a run holds `--keep + 4` checkpoints (`keep + 3` with `--keep 0`).

Every write goes through `checkpoint.write_atomic`, which removes its temporary file when
it fails, so a failed write leaves the previous file intact; `write_failed` turns the
OSError into a `WriteFailed` that says what could not be written, how big it is, and how
much space is free there.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from charlm.errors import WriteFailed

CHECKPOINT_MARGIN = 32 * 1024  # RNG states, settings, vocabulary, zip headers
SMALL_FILES = 256 * 1024  # config.toml, metrics.jsonl and loss.png, generously


def checkpoint_bytes(parameters: int, hidden_values: int, ema: bool = False) -> int:
    """Estimated size of one checkpoint (see the module docstring; with --ema it also holds
    the live weights: 4 more bytes per parameter)."""
    return (16 if ema else 12) * parameters + 4 * hidden_values + CHECKPOINT_MARGIN


def files_at_peak(keep: int) -> int:
    """Checkpoints a run holds at the peak of a save with `--keep keep`."""
    return keep + 2 + (2 if keep > 0 else 1)


def free_bytes(folder: Path) -> int | None:
    """Free space for an unprivileged writer on the filesystem of `folder` (or of its nearest
    existing parent); None when it cannot be found out."""
    for p in (folder, *folder.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def human(n: float) -> str:
    """A byte count for people: 512 B, 3.4 kB, 1.2 MB, 5.6 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def space_warning(folder: Path, one_checkpoint: int, keep: int, existing: int = 0) -> str | None:
    """A warning when `folder` has less free space than the run's checkpoints will take
    (`existing`: bytes of the run's checkpoints already there, which saves replace)."""
    free = free_bytes(folder)
    files = files_at_peak(keep)
    need = files * one_checkpoint + SMALL_FILES - existing
    if free is None or free >= need:
        return None
    return (f"{folder}: {human(free)} free, but this run's checkpoints need about {human(need)} more "
            f"({files} files of {human(one_checkpoint)}: --keep {keep} step files, latest.pt and best.pt, and "
            "more while a save replaces them); a save may fail: free some space or lower --keep")


def write_failed(path: Path, size: int | None, exc: OSError) -> WriteFailed:
    """One line for a failed write of `size` bytes to `path`."""
    reason = exc.strerror or str(exc)
    what = f"could not write {path}" + (f" ({human(size)})" if size is not None else "")
    free = free_bytes(path.parent)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        reason += f" ({human(free)} free in {path.parent})"
    return WriteFailed(f"{what}: {reason}", str(path))
