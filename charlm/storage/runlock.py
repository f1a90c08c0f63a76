"""One writer per run folder: an exclusive OS lock on `.lock` inside it.

`charlm train`, `charlm resume` (and `train --force`) hold the lock of their run folder for
as long as they may write into it; a second writer is refused at once, with one line that
names the process holding it (its pid and command are written into the lock file). Readers
(`sample`, `eval`, `info`, `plot`) never take it: every file they read is replaced
atomically, so they always see whole files.

The lock is `fcntl.flock` on the file, so the operating system releases it when the holder
exits in any way (a `kill -9` included): a dead run never leaves a stale lock behind. The
file itself is removed when the lock is released normally and is harmless when it stays
(the next writer locks it again); it never counts as "holds a run", and `--force` keeps it.

Removing a lock file is safe because a locker checks, once it holds the lock, that the path
still names the file it locked (`_same_file`); when it does not, the file was removed under
it and it locks the new one instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from charlm.errors import CharLMError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is then advisory only (see `RunLock`)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_READ_TRIES = 10  # the holder writes its pid just after locking: give it a moment to appear


class RunLock:
    """The exclusive lock of run folder `folder` (a context manager: `with RunDir(p).lock():`).

    `acquire` creates the folder (and its missing parents) when needed; `release` removes
    the folders it created when they hold nothing else, so a refused or failed start leaves
    no trace. Where the OS has no `flock` (Windows) the lock is not enforced.
    """

    def __init__(self, folder: Path | str, command: str | None = None, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(self.folder)  # how messages name the folder (`--out DIR`)
        self.path = self.folder / LOCK_FILE
        self.command = command if command is not None else command_line()
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, innermost last

    def acquire(self) -> RunLock:
        """Take the lock or raise `CharLMError` naming the process that holds it."""
        if self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise CharLMError(f"{self.label}: exists and is not a folder")
        self._make_folder()
        try:
            while True:
                fd = self._open()
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise CharLMError(
                        f"{self.label}: another charlm process is writing this run ({holder}); "
                        "wait for it to finish or stop it (Ctrl-C saves), or choose another folder") from None
                except OSError as exc:
                    # A filesystem without locks (some network mounts): say so instead of a traceback.
                    os.close(fd)
                    raise CharLMError(f"{self.path}: cannot lock the run folder: {exc.strerror}") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # its holder removed it between our open and our lock: lock the new one
            self._fd = fd
            # Who holds it, for a refused writer's message (informational: on a full disk the
            # lock holds without it).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {self.command}\n".encode("utf-8", "replace"))
        except BaseException:
            self._remove_created()
            raise
        return self

    def release(self) -> None:
        """Give the lock up (removing its file, and the folders `acquire` made if empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still locked: a locker that opened it before sees the path changed.
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder now: the file stays, and locks again next time
        finally:
            os.close(fd)
        self._remove_created()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a writer that failed to start
            self._make_folder()
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CharLMError(f"{self.label}: cannot write into the run folder: {exc.strerror}") from None

    def _make_folder(self) -> None:
        missing = []
        for p in (self.folder, *self.folder.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CharLMError(f"{self.label}: cannot create the folder: {exc.strerror}") from None
        self._created += [p for p in reversed(missing) if p not in self._created]

    def _remove_created(self) -> None:
        for p in reversed(self._created):
            try:
                p.rmdir()  # only when empty: a run that wrote anything keeps its folder
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def command_line() -> str:
    """This process's command as a user would type it (`charlm train ...`)."""
    argv = list(sys.argv) or ["python"]
    head = Path(argv[0])
    # `python -m charlm` and torchrun's `-m charlm` show the package's __main__.py.
    if head.name == "__main__.py" or head.name == "charlm":
        argv[0] = "charlm"
    return " ".join(argv)[:300]


def _holder(fd: int) -> str:
    """What the lock file says about its holder: `pid N: COMMAND`."""
    for _ in range(_READ_TRIES):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        pid, _, command = text.partition(" ")
        if pid.isdigit():
            return f"pid {pid}: {command}" if command else f"pid {pid}"
        time.sleep(0.02)
    return "its pid is not recorded"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
