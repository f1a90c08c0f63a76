"""`--tensorboard`: a session's metrics and live samples as TensorBoard event files.

`TensorBoardLog` is a `Callbacks` that writes what a run already records into the run
folder's `tensorboard/` (`charlm.storage.rundir.TENSORBOARD`), through
`torch.utils.tensorboard.SummaryWriter`, at the optimizer step as global step:

    train/bpc           mean training bpc of the last `EVERY` steps (at every EVERY-th step)
    train/lr            learning rate at that step
    train/chars_per_s   training speed over those steps
    eval/val_bpc        held-out bpc at each evaluation (as in metrics.jsonl)
    eval/train_bpc      mean training bpc since the evaluation before (as in metrics.jsonl)
    preview/temperature_T   each evaluation's live sample at temperature T (text)

Each session writes one event file; a resumed session starts it with a purge step, so a
TensorBoard reader drops what a crashed session wrote after the checkpoint the run resumed
from (those steps are trained again). The tensorboard package is an optional extra:
`require` refuses `--tensorboard` without it, before a session writes anything. A write that
fails (a full disk) costs the run its event files, never its training: one warning, and the
session goes on without them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from charlm.errors import CharLMWarning, require_extra
from charlm.training.events import Callbacks, EvalRecord, StartInfo, StepStats

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# Measured on the tests' tiny model (2 CPU cores): the three training scalars at every step
# cost ~20 % of its steps/s (the writer's thread competes for the interpreter), at every 10th
# ~1.5 %, within the noise; the mean of the ten keeps the trend.
EVERY = 10


def require(wanted: bool) -> None:
    """Refuse `--tensorboard` (when `wanted`) without the tensorboard package (which
    torch.utils.tensorboard needs): one line."""
    if wanted:
        require_extra("--tensorboard", "tensorboard", "tensorboard", hint=" (or pass --no-tensorboard)")


class TensorBoardLog(Callbacks):
    """Event files in `folder`, opened when training starts; `close` flushes and closes them
    (call it when the session ends, however it ends)."""

    def __init__(self, folder: Path, every: int = EVERY) -> None:
        self.folder = folder
        self.every = every
        self.writer: SummaryWriter | None = None
        # The steps since the last point: their summed bpc and seconds per character (1 / speed),
        # how many, and the last one's step and learning rate.
        self._bpc, self._seconds_per_char, self._steps = 0.0, 0.0, 0
        self._step, self._lr = 0, 0.0

    def on_start(self, info: StartInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with self._guard():
            # The session's first step is info.step + 1: a reader drops the events at or after it
            # written before, a crashed session's for the steps this one trains again.
            self.writer = SummaryWriter(str(self.folder), purge_step=info.step + 1)

    def on_step(self, stats: StepStats) -> None:
        self._bpc += stats.bpc
        self._seconds_per_char += 1.0 / stats.chars_per_s if stats.chars_per_s > 0 else 0.0
        self._steps += 1
        self._step, self._lr = stats.step, stats.lr
        if stats.step % self.every == 0:  # multiples of EVERY: a resumed run stays on the same grid
            self._point()

    def on_eval(self, record: EvalRecord, previews: list[tuple[float, str]]) -> None:
        with self._guard():
            if self.writer is None:
                return
            self.writer.add_scalar("eval/val_bpc", record.val_bpc, record.step)
            self.writer.add_scalar("eval/train_bpc", record.train_bpc, record.step)
            for temperature, text in previews:
                self.writer.add_text(f"preview/temperature_{temperature:g}", as_markdown(text), record.step)
            self.writer.flush()  # a TensorBoard watching the run shows each evaluation as it happens

    def close(self) -> None:
        """Write the steps since the last point, then flush and close the event file."""
        if self._steps:
            self._point()
        with self._guard():
            if self.writer is not None:
                self.writer.close()
        self.writer = None

    def _point(self) -> None:
        """One point of each training curve, at the last step, over the steps since the last point."""
        with self._guard():
            if self.writer is not None:
                self.writer.add_scalar("train/bpc", self._bpc / self._steps, self._step)
                self.writer.add_scalar("train/lr", self._lr, self._step)
                if self._seconds_per_char > 0:
                    # Their characters over their seconds (their batches are the same size).
                    self.writer.add_scalar("train/chars_per_s", self._steps / self._seconds_per_char, self._step)
        self._bpc, self._seconds_per_char, self._steps = 0.0, 0.0, 0

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An event file that cannot be written stops the events, not the training."""
        try:
            yield
        except OSError as exc:
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()
            warnings.warn(f"{self.folder}: could not write TensorBoard events ({exc}); training goes on "
                          "without them", CharLMWarning, stacklevel=2)


def as_markdown(text: str) -> str:
    """`text` as a Markdown code block (TensorBoard renders text as Markdown): a sample's
    line breaks, spaces and `*` `#` characters shown as they were generated."""
    return "\n".join("    " + line for line in text.split("\n"))
