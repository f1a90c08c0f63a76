"""A run folder's files: their names, what makes a folder hold a run, the order of a save,
retention of step files, leftover temporaries, and `metrics.jsonl`.

    latest.pt            newest checkpoint (written last in every save)
    best.pt              lowest validation bpc so far
    step-NNNNNNN.pt      the last `--keep` evaluations
    config.toml          the resolved config
    metrics.jsonl        one JSON object per evaluation
    loss.png             the loss plot (when matplotlib is installed)
    tensorboard/         TensorBoard event files (with --tensorboard)
    report.html          the run's report page (`charlm.analysis.report`)
    README.md            its card in text, starting with `CARD_MARK` (a README without it is the user's)
    .lock                held by the one process writing the run (`charlm.storage.runlock`)

A write that fails (a full disk) raises `WriteFailed` naming the file; the file's previous
version stays intact (every write is atomic, or undone for the metrics' appends).

While a save runs, a new step file exists before the oldest is pruned, and each file is
written to a temporary file before it replaces the old one, so at the peak of a save a run
holds `--keep + 4` checkpoints (`keep + 3` with `--keep 0`): `space_warning` says so when
the folder is short of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from charlm.errors import CharLMError, WriteFailed
from charlm.fs import TMP_PREFIX, free_bytes, human, replace_file, write_failed
from charlm.storage.runlock import RunLock

LATEST, BEST, CONFIG, METRICS, PLOT = "latest.pt", "best.pt", "config.toml", "metrics.jsonl", "loss.png"
TENSORBOARD = "tensorboard"  # a folder: one event file per session
REPORT, CARD = "report.html", "README.md"
CARD_MARK = "<!-- charlm run card: `charlm report` rewrites this file; keep your notes elsewhere -->"
RUN_FILES = (LATEST, BEST, CONFIG, METRICS)  # any of these means the folder holds a run
SMALL_FILES = 256 * 1024  # config.toml, metrics.jsonl and loss.png, generously
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class RunDir:
    """The output folder of one run."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def latest(self) -> Path:
        return self.path / LATEST

    @property
    def to_sample(self) -> Path:
        """The checkpoint to sample from: best.pt (the lowest held-out bpc), else latest.pt."""
        best = self.path / BEST
        return best if best.exists() else self.latest

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    def lock(self, label: str | None = None) -> RunLock:
        """The folder's writer lock (not yet taken): `with run_dir.lock(): ...` around
        everything that writes, taken before `check_new` so two starts cannot both pass it."""
        return RunLock(self.path, label=label)

    def step_file(self, step: int) -> Path:
        return self.path / f"step-{step:07d}.pt"

    def step_files(self) -> list[Path]:
        """Step-numbered checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.glob("step-*.pt") if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def holds_run(self) -> Path | None:
        """The first file showing that the folder already holds a run, if any."""
        for name in RUN_FILES:
            if (self.path / name).exists():
                return self.path / name
        steps = self.step_files()
        return steps[0] if steps else None

    def check_new(self, force: bool) -> None:
        """Refuse a folder that holds a run (unless `force`); never touches other files."""
        if self.path.exists() and not self.path.is_dir():
            raise CharLMError(f"--out {self.path}: exists and is not a folder")
        found = self.holds_run()
        if found is not None and not force:
            raise CharLMError(
                f"--out {self.path}: already holds a run ({found.name}); continue it with "
                f"`charlm resume {self.latest}`, or pass --force to start over, or choose another --out"
            )

    def create(self, force: bool) -> None:
        """Make the folder ready for a new run: with `force`, the old run's files go."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()
        if force:
            for p in (*(self.path / n for n in (*RUN_FILES, PLOT, REPORT)), *self.step_files()):
                p.unlink(missing_ok=True)
            if self.holds_card():
                (self.path / CARD).unlink(missing_ok=True)
            # TensorBoard reads every event file of the folder: the old run's would show as this run's.
            if self.tensorboard.is_dir() and not self.tensorboard.is_symlink():
                shutil.rmtree(self.tensorboard)

    def holds_card(self) -> bool:
        """Whether the folder's README.md is a charlm run card (else it is the user's, or none)."""
        try:
            with open(self.path / CARD, encoding="utf-8", errors="replace") as fh:
                return fh.read(len(CARD_MARK)) == CARD_MARK
        except OSError:
            return False

    def clean_temporary(self) -> list[Path]:
        """Remove temporary files left by a writer that was killed mid-save."""
        removed = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def save_targets(self, best: bool, step: int | None) -> list[Path]:
        """Where one save writes, in order. latest.pt is last: a kill between files leaves
        latest.pt at the previous save, so the resumed run redoes this step exactly and
        rewrites the others; the other way round latest.pt would claim a best val that best.pt
        never received."""
        targets = [self.path / BEST] if best else []
        if step is not None:
            targets.append(self.step_file(step))
        return [*targets, self.latest]

    def save(self, data: bytes, best: bool, step: int | None, keep: int) -> list[Path]:
        """Write one checkpoint to its targets (each atomically); an evaluation's save (`step`
        given) also writes a step file and then prunes them to the newest `keep`."""
        targets = self.save_targets(best, step if keep > 0 else None)
        for i, path in enumerate(targets):
            try:
                replace_file(path, data)
            except WriteFailed as exc:
                exc.written = [str(p) for p in targets[:i]]
                raise
        if step is not None:
            # Older step files go only after the new one is safely on disk.
            files = self.step_files()
            for p in files[: max(0, len(files) - keep)]:
                p.unlink(missing_ok=True)
        return targets

    def write_config(self, text: str) -> None:
        replace_file(self.path / CONFIG, text.encode("utf-8"))

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        end: int | None = None
        try:
            fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_failed(self.metrics, len(line), exc) from None
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            # Undo a line cut short by a full disk: the next append must start a line.
            if end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            raise write_failed(self.metrics, len(line), exc) from None
        finally:
            os.close(fd)

    def _metric_lines(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                row = None  # a line cut short by a crash
            yield line, row if isinstance(row, dict) else None

    def evaluations(self) -> list[dict[str, Any]]:
        """Every evaluation recorded so far (lines cut short by a crash are skipped; none
        without a metrics.jsonl)."""
        if not self.metrics.exists():
            return []
        return [row for _, row in self._metric_lines() if row is not None]

    def read_metrics(self) -> list[dict[str, Any]]:
        """`evaluations`, or `CharLMError` when there are none to show."""
        if not self.metrics.exists():
            raise CharLMError(f"{self.path}: no metrics.jsonl (is it a charlm run folder?)")
        rows = self.evaluations()
        if not rows:
            raise CharLMError(f"{self.metrics}: holds no evaluations yet")
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop lines written after `step` (the run continues from that checkpoint)."""
        if not self.metrics.exists():
            return
        lines = list(self._metric_lines())
        keep = [line for line, row in lines if row is not None and isinstance(row.get("step"), int)
                and row["step"] <= step]
        if len(keep) != len(lines):
            replace_file(self.metrics, "".join(line + "\n" for line in keep).encode("utf-8"))


def left_to_resume(last_saved: tuple[Path, int] | None, written: list[str], step: int) -> str:
    """What a session whose save failed leaves to continue from, for its message: the last
    checkpoint it saved (and its step), or the files of the failed save (at `step`) written
    before the failure."""
    if last_saved is not None:
        path, saved_at = last_saved
        return f"{path} (step {saved_at}) is intact: free some space, then `charlm resume {path}`"
    if written:  # the first save of the run got as far as best.pt
        return f"only {written[0]} (step {step}) was saved: free some space, then `charlm resume {written[0]}`"
    return "no checkpoint of this run was saved"


def files_at_peak(keep: int) -> int:
    """Checkpoints a run holds at the peak of a save with `--keep keep`."""
    return keep + 2 + (2 if keep > 0 else 1)


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
