"""The generation worker of `charlm serve`: the one thread that runs the model.

Every PyTorch call on the model happens in this thread, never two at once. All requests
are generated as one batch (`charlm.generation.batch.BatchSampler`: continuous batching):
a new request's prime is read and it joins at the next step, every step gives each of its
rows one character, and a request that ends, is cancelled (its client went away) or pauses
leaves between two steps without disturbing the others. Text goes to the request's handler
through a per-job buffer, handed over at the first step (the first character goes at once),
then every `chunk_steps` steps or `FLUSH_SECONDS`, whichever comes first; a job whose reader
has not taken `buffer_chars` characters yet steps out of the batch (not waited for), so a
slow client pauses only its own generation, and steps back in when it has read.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import torch

from charlm.api import CharLM
from charlm.config.sampling import SampleOptions
from charlm.config.serving import ServeSettings
from charlm.errors import CharLMError
from charlm.generation.batch import BatchSampler, Group

FLUSH_SECONDS = 0.02  # a request's text waits at most this long in the worker


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
    """One request's generation. The fields above `group` are guarded by the worker's lock;
    `group` and the ones below it belong to the worker thread."""

    def __init__(self, opts: SampleOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.opts, self.n, self.loop = opts, opts.num_samples, loop
        self.chunks: list[list[str]] = []  # handed over, not yet taken: per chunk, text per row
        self.buffered = 0  # characters in `chunks`
        self.finished = False  # generation over (length reached, every row stopped, or error)
        self.cancelled = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()  # set (from the worker, thread-safely) when state changes
        self.group: Group | None = None  # its rows in the batch
        self.paused = False  # out of the batch: its reader is `buffer_chars` behind
        self.held: list[list[str]] = []  # generated since the last hand-over: per step, text per row
        self.handed = 0.0  # when text was last handed over (0: never)

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.ready.set)


class GenerationWorker:
    """The one thread that runs the model: every active job is a group of one batch."""

    def __init__(self, lm: CharLM, settings: ServeSettings) -> None:
        self.lm, self.settings = lm, settings
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.active: list[Job] = []  # admitted and not finished: in the batch, or paused
        self.closing = False
        self.failure: BaseException | None = None
        self.cancelled_total = 0
        self.rows = 0  # rows in the batch after the last step
        # Something for the worker to apply (a request, a cancellation, a reader that caught up,
        # a buffer that filled): set under the lock, read without it between steps.
        self.dirty = False
        self.thread = threading.Thread(target=self._run, name="charlm-generate", daemon=True)

    # --- called from the event loop -------------------------------------------------------

    def start(self) -> None:
        if self.lm.device.type == "cpu":
            torch.set_num_threads(self.settings.threads)  # process-wide: the worker is its one user
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closing = self.dirty = True
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
            self.dirty = True
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self.cond:
            if not job.finished and not job.cancelled:
                job.cancelled = True
                self.cancelled_total += 1
                self.dirty = True
                self.cond.notify()

    def poll(self, job: Job) -> tuple[list[list[str]], bool]:
        """Take the text `job` generated so far: (chunks, finished). Raises the job's error."""
        with self.cond:
            chunks, job.chunks = job.chunks, []
            if job.buffered >= self.settings.buffer_chars:
                self.dirty = True  # the worker paused this job; it may go on now
                self.cond.notify()
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
            paused = sum(j.paused for j in self.active)
            return {"queued": len(self.pending), "generating": len(self.active) - paused, "paused": paused,
                    "batch_rows": self.rows, "cancelled_total": self.cancelled_total}

    # --- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = BatchSampler(self.lm.model, self.lm.vocab, self.lm.device, shared=True)
            while self._turn(engine):
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
            job.wake()

    def _turn(self, engine: BatchSampler) -> bool:
        """Apply what changed (joins, cancellations, pauses), then step the batch until
        something changes again; False when the server is closing."""
        cap = self.settings.buffer_chars
        with self.cond:
            while True:
                if self.closing:
                    return False
                self.dirty = False
                joining, self.pending = self.pending, []
                self.active.extend(joining)
                dropped = [j for j in self.active if j.cancelled]
                self.active = [j for j in self.active if not j.cancelled]
                pause = [j for j in self.active if not j.paused and j.group is not None and j.buffered >= cap]
                resume = [j for j in self.active if j.paused and j.buffered < cap]
                runnable = len(engine.groups) > len(pause) or resume or joining
                if dropped or runnable:
                    break
                self.cond.wait()  # nothing to do, or every reader is behind
        for job in dropped:
            if job.group is not None:
                engine.remove(job.group)
        for job in pause:
            assert job.group is not None
            engine.detach(job.group)
            job.paused = True
        for job in resume:
            assert job.group is not None
            engine.attach(job.group)
            job.paused = False
        for job in joining:
            if not job.cancelled:
                self._join(engine, job)
        self.rows = engine.rows  # (an int: /health may read it without the lock)
        jobs = {id(j.group): j for j in self.active if j.group is not None}
        while engine.groups and not self.dirty:  # read without the lock: at worst one step late
            now, handing = time.monotonic(), []
            for group, chars in engine.step():
                job = jobs[id(group)]
                job.held.append(chars)
                if (group.finished or not job.handed or len(job.held) >= self.settings.chunk_steps
                        or now - job.handed >= FLUSH_SECONDS):
                    handing.append(job)
            if handing:
                with self.cond:
                    for job in handing:
                        self._hand_over(job, now)
                    self.active = [j for j in self.active if not j.finished]
                    self.rows = engine.rows
                for job in handing:
                    job.wake()
        return True

    def _join(self, engine: BatchSampler, job: Job) -> None:
        """Read the job's prime and put its rows in the batch (a bad request ends here)."""
        error: BaseException | None = None
        try:
            job.group = engine.add(job.opts)
        except CharLMError as exc:
            error = from_charlm_error(exc)
        except Exception as exc:
            error = exc
        if error is not None or (job.group is not None and job.group.finished):  # an error, or length 0
            with self.cond:
                job.finished, job.error = True, error
                self.active.remove(job)
            job.wake()

    def _hand_over(self, job: Job, now: float) -> None:
        """Move the text the worker holds for `job` to its buffer (under the lock)."""
        parts = ["".join(step[row] for step in job.held) for row in range(job.n)]
        job.held, job.handed = [], now
        if any(parts):
            job.chunks.append(parts)
            job.buffered += sum(len(p) for p in parts)
            if job.buffered >= self.settings.buffer_chars:
                self.dirty = True  # its reader is behind: it steps out of the batch
        if job.group is not None and job.group.finished:
            job.finished = True
