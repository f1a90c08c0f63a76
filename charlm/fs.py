"""Files: the one place a file is replaced, free space, and a failed write as one line.

Every file charlm writes for the user (checkpoints, the run's config and plot, the corpus
cache and its novelty index, the inspect page, ONNX exports) replaces its target
atomically: the bytes go to a temporary file beside it (`TMP_PREFIX`), are flushed and
fsynced, the temporary file is renamed over the target with `os.replace`, and the folder
is fsynced. A reader sees the old file or the new one, never half of one; a crash or a full
disk at any moment leaves the old file intact and no temporary file behind (a run folder's
leftovers from a `kill -9` are swept by `RunDir.clean_temporary`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from charlm.errors import WriteFailed

TMP_PREFIX = ".tmp-"  # a temporary file beside its target: `.tmp-<pid>-<name>`


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to fill; when the block ends without an
    error it replaces `path` (durably), otherwise it is removed and `path` is untouched.

    The temporary file exists (empty) when the block starts, so an unwritable folder fails
    before any slow work is done."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        tmp.open("wb").close()
        yield tmp
        with open(tmp, "rb+") as fh:  # durable before it takes the target's name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path | str, data: bytes) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: it is only once the directory entry reaches the disk."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


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


def write_failed(path: Path, size: int | None, exc: OSError) -> WriteFailed:
    """One line for a failed write of `size` bytes to `path`: what, how big, why, and how much
    space is free there when the disk is full."""
    reason = exc.strerror or str(exc)
    what = f"could not write {path}" + (f" ({human(size)})" if size is not None else "")
    free = free_bytes(path.parent)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        reason += f" ({human(free)} free in {path.parent})"
    return WriteFailed(f"{what}: {reason}", str(path))


def replace_file(path: Path, data: bytes) -> None:
    """`write_atomic`, with a failure (a full disk) as a `WriteFailed` naming the file and its size."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise write_failed(path, len(data), exc) from None
