"""The generation worker of `charlm serve`: the one thread that runs the model.

Every PyTorch call on the model happens in this thread, never two at once. Each request is a
job (one `Sampler.generate_batch` generator); the worker takes the active jobs in turn and
advances each by `chunk_steps` characters, so a short request finishes while a long one is
still running instead of waiting behind it. Text goes to the request's handler through a
per-job buffer; a job whose reader has not taken `buffer_chars` characters yet is skipped
(not waited for), so a slow client pauses only its own generation. A cancelled job (its
client went away) is dropped at the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator

import torch

from charlm.api import CharLM
from charlm.config.sampling import SampleOptions
from charlm.config.serving import ServeSettings
from charlm.errors import CharLMError


class RequestError(Exception):
    """A 4xx answer: `{"error": message, "field": field}`."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


_FLAG_VALUE = re.compile(r"--([a-z][a-z-]*) (\w+)")
_FLAG = re.compile(r"--([a-z][a-z-]*)")


def from_charlm_error(exc: CharLMError) -> RequestError:
    """The sampler's CLI-worded error ("--top-k: must be >= 0 ...") in JSON field names."""
    text = str(exc)
    m = _FLAG.match(text)
    field = m.group(1).replace("-", "_") if m else None
    text = _FLAG.sub(lambda m: m.group(1).replace("-", "_"), text, count=1) if m else text
    text = _FLAG_VALUE.sub(lambda m: f"'{m.group(1).replace('-', '_')}': '{m.group(2)}'", text)
    return RequestError(400 if field is None else 422, field, text)


class Job:
    """One request's generation. Its state is guarded by the worker's lock; `gen` is created
    and advanced only in the worker thread."""

    def __init__(self, opts: SampleOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.opts, self.n, self.loop = opts, opts.num_samples, loop
        self.gen: Iterator[list[str]] | None = None
        self.steps = 0
        self.chunks: list[list[str]] = []  # generated, not yet taken: per chunk, text per row
        self.buffered = 0  # characters in `chunks`
        self.finished = False  # generation over (length reached, every row stopped, or error)
        self.cancelled = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()  # set (from the worker, thread-safely) when state changes

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.ready.set)


class GenerationWorker:
    """The one thread that runs the model: advances every active job by a chunk in turn."""

    def __init__(self, lm: CharLM, settings: ServeSettings) -> None:
        self.lm, self.settings = lm, settings
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.active: list[Job] = []
        self.closing = False
        self.failure: BaseException | None = None
        self.cancelled_total = 0
        self.thread = threading.Thread(target=self._run, name="charlm-generate", daemon=True)

    # --- called from the event loop -------------------------------------------------------

    def start(self) -> None:
        if self.lm.device.type == "cpu":
            torch.set_num_threads(self.settings.threads)  # process-wide: the worker is its one user
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    def submit(self, opts: SampleOptions) -> Job:
        job = Job(opts, asyncio.get_running_loop())
        with self.cond:
            if self.closing or not self.alive:
                raise RequestError(503, None, "the generation worker is not running")
            self.pending.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self.cond:
            if not job.finished and not job.cancelled:
                job.cancelled = True
                self.cancelled_total += 1
                self.cond.notify()

    def poll(self, job: Job) -> tuple[list[list[str]], bool]:
        """Take the text `job` generated so far: (chunks, finished). Raises the job's error."""
        with self.cond:
            chunks, job.chunks = job.chunks, []
            if job.buffered >= self.settings.buffer_chars:
                self.cond.notify()  # the worker skipped this job; it may go on now
            job.buffered = 0
            finished, error = job.finished, job.error
        if error is not None:
            raise error
        return chunks, finished

    async def take(self, job: Job) -> tuple[list[list[str]], bool]:
        """Wait until `job` has new text or is finished: (chunks, finished)."""
        while True:
            job.ready.clear()  # before looking, so a wake-up after the look is not lost
            chunks, finished = self.poll(job)
            if chunks or finished:
                # Yield to the event loop once per piece: with text always waiting (a fast
                # worker), a reader would otherwise never let other requests run.
                await asyncio.sleep(0)
                return chunks, finished
            await job.ready.wait()

    def counts(self) -> dict[str, int]:
        with self.cond:
            return {"queued": len(self.pending), "generating": len(self.active),
                    "cancelled_total": self.cancelled_total}

    # --- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:
            self.failure = exc
        with self.cond:
            jobs, self.pending, self.active = self.pending + self.active, [], []
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.error = job.error or RequestError(503, None, "the server is shutting down")
        for job in jobs:
            self._close(job)
            job.wake()

    def _turn(self) -> bool:
        """One round over the active jobs; False when the server is closing."""
        cap = self.settings.buffer_chars
        with self.cond:
            while True:
                if self.closing:
                    return False
                self.active.extend(self.pending)
                self.pending.clear()
                dropped = [j for j in self.active if j.cancelled]
                runnable = [j for j in self.active if not j.cancelled and j.buffered < cap]
                if dropped or runnable:
                    break
                self.cond.wait()  # nothing to do, or every reader is behind
            self.active = [j for j in self.active if not j.cancelled]
        for job in dropped:
            self._close(job)
        for job in runnable:
            if job.cancelled:
                continue  # cancelled since the list was made: dropped next turn
            parts, finished, error = self._advance(job)
            with self.cond:
                if any(parts):
                    job.chunks.append(parts)
                    job.buffered += sum(len(p) for p in parts)
                if finished:
                    job.finished, job.error = True, error
                    self.active.remove(job)
            if finished:
                self._close(job)
            job.wake()
        return True

    def _advance(self, job: Job) -> tuple[list[str], bool, BaseException | None]:
        """Up to `chunk_steps` more characters per row: (text per row, finished, error). The
        sampler's generator ends by itself at the length, or once every row has stopped."""
        parts: list[list[str]] = [[] for _ in range(job.n)]
        try:
            if job.gen is None:
                job.gen = self.lm.sampler.generate_batch(job.opts)
            for _ in range(self.settings.chunk_steps):
                for row, ch in enumerate(next(job.gen)):
                    parts[row].append(ch)
                job.steps += 1
        except StopIteration:
            return ["".join(p) for p in parts], True, None
        except CharLMError as exc:
            return [], True, from_charlm_error(exc)
        except Exception as exc:
            return [], True, exc
        return ["".join(p) for p in parts], job.steps >= job.opts.length, None

    @staticmethod
    def _close(job: Job) -> None:
        close = getattr(job.gen, "close", None)  # a generator: runs the sampler's clean-up here
        if close is not None:
            close()
