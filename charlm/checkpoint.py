"""Self-contained checkpoints: atomic writes, `weights_only` loads, format validation.

A checkpoint is a dict of tensors and plain Python values only, so it always loads with
`torch.load(..., weights_only=True)`; nothing is ever unpickled any other way. Writes go
to a temporary file in the same folder, are flushed and fsynced, renamed over the target
with `os.replace`, and the folder is fsynced, so a crash at any moment leaves the previous
file intact.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from charlm.errors import CharLMError

FORMAT = "charlm"
VERSION = 1  # bump when the layout changes; older versions are upgraded in `_upgrade`
TMP_PREFIX = ".tmp-"
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
RUN_FILES = ("latest.pt", "best.pt", "config.toml", "metrics.jsonl")


def serialize(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def clean_temporary(folder: Path) -> list[Path]:
    """Remove temporary files left by a writer that was killed mid-save."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def step_files(folder: Path) -> list[Path]:
    """Step-numbered checkpoints in `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_steps(folder: Path, keep: int) -> None:
    """Keep the newest `keep` step files; called only after the newest one is written."""
    files = step_files(folder)
    for p in files[: max(0, len(files) - keep)]:
        p.unlink(missing_ok=True)


def load(path: Path | str) -> dict[str, Any]:
    """Load and validate a charlm checkpoint on the CPU; never modifies the file.

    Raises `CharLMError` with one line saying what is wrong for missing, truncated,
    corrupt, unsafe (pickled objects), foreign or too-new files.
    """
    path = Path(path)
    if not path.exists():
        raise CharLMError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CharLMError(f"{path}: is a folder, not a checkpoint file")
    # Open it here: an OSError from opening is a real read problem, while torch.load raises
    # OSError(EINVAL) for a truncated file (a seek past the end), which is corruption.
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise CharLMError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with fh:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y": a pickled object that
        # weights_only refused. Garbage bytes fail too ("Unsupported operand N"): not unsafe.
        msg = str(exc)
        if "unsupported global" in msg.lower():
            raise CharLMError(
                f"{path}: refused: it holds pickled Python objects, which charlm never loads "
                "(only tensors and plain values)"
            ) from None
        raise CharLMError(f"{path}: not a checkpoint (corrupt or not a PyTorch file)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError):
        raise CharLMError(f"{path}: corrupt or truncated checkpoint") from None
    except Exception:  # noqa: BLE001 - any other decoder failure on random bytes
        raise CharLMError(f"{path}: not a checkpoint (corrupt or not a PyTorch file)") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CharLMError(f"{path}: not a charlm checkpoint (a PyTorch file of another kind)")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CharLMError(f"{path}: charlm checkpoint with an invalid format version {version!r}")
    if version > VERSION:
        raise CharLMError(
            f"{path}: written by a newer charlm (checkpoint format {version}, this charlm reads "
            f"up to {VERSION}); upgrade charlm"
        )
    obj = _upgrade(obj)
    missing = [k for k in ("model", "config", "vocab", "step") if k not in obj]
    if missing:
        raise CharLMError(f"{path}: incomplete charlm checkpoint (missing {', '.join(missing)})")
    return obj


def _upgrade(obj: dict[str, Any]) -> dict[str, Any]:
    """Bring an older supported format up to `VERSION` (version 1 is the first)."""
    return obj
