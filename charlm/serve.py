"""`charlm serve`: an HTTP API and a playground page for one loaded model.

    POST /generate   JSON sampling options -> {"text", "samples", "seed"}; with
                     "stream": true, server-sent events as the text is generated
    GET  /info       what `charlm info --json` prints
    GET  /health     liveness, requests in flight, the server's limits
    GET  /           the playground (self-contained HTML/JS/CSS, no network needed)

Concurrency. One generation worker thread owns the model: every PyTorch call on it happens
in that thread, never two at once. Each request becomes a job (one `Sampler.generate_batch`
generator); the worker takes the active jobs in turn and advances each by `chunk_steps`
characters, so a short request finishes while a long one is still running instead of
waiting behind it. Text goes to the request's handler through a per-job buffer; a job whose
reader has not taken `buffer_chars` characters yet is skipped (not waited for), so a slow
client pauses only its own generation. A client that disconnects cancels its job. Every
limit is a `ServeSettings` field and a `charlm serve` flag.

Bad requests get a 4xx JSON error `{"error": ..., "field": ...}` naming the field: the
request schema is a pydantic model (strict types, unknown fields refused) and the sampling
rules are the sampler's own (`SampleOptions.check`), their flag names mapped to JSON fields.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charlm import __version__
from charlm.api import CharLM
from charlm.errors import CharLMError
from charlm.sample import SampleOptions

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest value


@dataclass
class ServeSettings:
    """Limits of `charlm serve`; each field but `buffer_chars` is the flag of the same name
    (`max_length`: `--max-length`)."""

    max_length: int = 10_000  # characters per sample (the request's "length")
    max_samples: int = 8  # samples per request ("num_samples")
    max_prime: int = 10_000  # characters of "prime"
    max_body: int = 131_072  # bytes of a request body
    max_in_flight: int = 64  # requests being generated or sent at once; more get 503
    chunk_steps: int = 32  # characters a job advances per turn of the worker
    # PyTorch CPU threads: one row at a time gains nothing from more, and on a busy machine a
    # second thread that must meet the first at every operation makes each step many times
    # slower (measured: 330 vs 6,500 chars/s for a 2x256 LSTM on 2 loaded cores).
    threads: int = 1
    buffer_chars: int = 8_192  # characters generated ahead of a slow reader before its job pauses

    def check(self) -> ServeSettings:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharLMError(f"--{f.name.replace('_', '-')}: must be an integer >= 1, got {value!r}")
        return self


class GenerateRequest(BaseModel):
    """The body of POST /generate. Defaults are the sampler's; `check` holds the rules."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prime: str = SampleOptions.prime
    length: int = SampleOptions.length
    temperature: float = SampleOptions.temperature
    top_k: int = SampleOptions.top_k
    top_p: float = SampleOptions.top_p
    stop: str = SampleOptions.stop
    seed: int | None = None
    num_samples: int = 1
    unknown: str = SampleOptions.unknown
    stream: bool = False


class RequestError(Exception):
    """A 4xx answer: `{"error": message, "field": field}`."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def error_response(status: int, field: str | None, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    # ensure_ascii: a field name or value may hold lone surrogates, which UTF-8 cannot encode.
    body = json.dumps({"error": message, "field": field}, ensure_ascii=True, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


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


def from_validation_error(exc: ValidationError) -> RequestError:
    """The first pydantic problem as one message naming its field."""
    e = exc.errors()[0]
    loc = [str(p) for p in e["loc"]]
    if e["type"] == "json_invalid":
        return RequestError(400, "body", f"body: not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})")
    if not loc:
        return RequestError(422, "body", "body: must be a JSON object of sampling options")
    field = loc[0]
    if e["type"] == "extra_forbidden":
        known = ", ".join(GenerateRequest.model_fields)
        return RequestError(422, field, f"{field}: unknown field (known: {known})")
    got = json.dumps(e.get("input"), ensure_ascii=True)
    got = got if len(got) <= 60 else got[:57] + "..."
    return RequestError(422, field, f"{field}: {e['msg'].lower()}, got {got}")


def sample_options(req: GenerateRequest, lm: CharLM, settings: ServeSettings) -> SampleOptions:
    """Checked sampling options for a request (server limits, then the sampler's rules)."""
    if not 1 <= req.num_samples <= settings.max_samples:
        raise RequestError(422, "num_samples", f"num_samples: must be between 1 and "
                           f"{settings.max_samples} (--max-samples), got {req.num_samples}")
    if req.length > settings.max_length:
        raise RequestError(422, "length", f"length: must be <= {settings.max_length} "
                           f"(--max-length), got {req.length}")
    if len(req.prime) > settings.max_prime:
        raise RequestError(422, "prime", f"prime: at most {settings.max_prime} characters "
                           f"(--max-prime), got {len(req.prime)}")
    if req.seed is not None and req.seed > MAX_SEED:
        raise RequestError(422, "seed", f"seed: must be <= {MAX_SEED}, got {req.seed}")
    try:
        opts = SampleOptions(req.length, req.temperature, req.top_k, req.top_p, req.prime,
                             req.seed, req.stop, req.unknown).check()
        lm.sampler.prime_ids(req.prime, req.unknown)  # characters outside the vocabulary
    except CharLMError as exc:
        raise from_charlm_error(exc) from None
    if opts.seed is None:  # pick one here so the answer can say which: the text is reproducible
        opts.seed = int.from_bytes(os.urandom(8), "little") >> 1
    return opts


# --- the generation worker ------------------------------------------------------------------


class Job:
    """One request's generation. Its state is guarded by the worker's lock; `gen` is created
    and advanced only in the worker thread."""

    def __init__(self, opts: SampleOptions, num_samples: int, loop: asyncio.AbstractEventLoop) -> None:
        self.opts, self.n, self.loop = opts, num_samples, loop
        self.gen: Iterator[list[str]] | None = None
        self.steps = 0
        self.tails = [""] * num_samples  # last len(stop) characters of each row
        self.chunks: list[list[str]] = []  # generated, not yet taken: per chunk, text per row
        self.buffered = 0  # characters in `chunks`
        self.finished = False  # generation over (length reached, every row stopped, or error)
        self.cancelled = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()  # set (from the worker, thread-safely) when state changes

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass


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

    def submit(self, opts: SampleOptions, num_samples: int) -> Job:
        job = Job(opts, num_samples, asyncio.get_running_loop())
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
        except BaseException as exc:  # noqa: BLE001 (a bug: fail every job, leave none hanging)
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
        """Up to `chunk_steps` more characters per row: (text per row, finished, error)."""
        opts = job.opts
        parts: list[list[str]] = [[] for _ in range(job.n)]
        ended = False
        try:
            if job.gen is None:
                job.gen = self.lm.sampler.generate_batch(job.n, **asdict(opts))
            for _ in range(self.settings.chunk_steps):
                if job.steps >= opts.length:
                    break
                chars = next(job.gen)
                job.steps += 1
                for row, ch in enumerate(chars):
                    if ch:
                        parts[row].append(ch)
                        if opts.stop:
                            job.tails[row] = (job.tails[row] + ch)[-len(opts.stop):]
                if opts.stop and all(t == opts.stop for t in job.tails):
                    break
        except StopIteration:
            ended = True
        except CharLMError as exc:
            return [], True, from_charlm_error(exc)
        except Exception as exc:  # noqa: BLE001 (a bug: this request fails, the server lives)
            return [], True, exc
        # Finished when the length is reached or every row has produced the stop string,
        # found here so the reader learns it now rather than a turn later.
        done = (ended or job.steps >= opts.length
                or bool(opts.stop) and all(t == opts.stop for t in job.tails))
        return ["".join(p) for p in parts], done, None

    @staticmethod
    def _close(job: Job) -> None:
        close = getattr(job.gen, "close", None)  # a generator: runs the sampler's clean-up here
        if close is not None:
            close()


# --- HTTP ---------------------------------------------------------------------------------


class BodyLimit:
    """Refuses request bodies over `max_body` bytes with 413, whether the size is announced
    (Content-Length: refused before reading) or not (chunked: refused once exceeded)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"body: larger than {self.max_body} bytes (--max-body)"

    def _too_large(self) -> Response:
        return error_response(413, "body", self._message(), {"Connection": "close"})


class _JobStream(StreamingResponse):
    """A streaming response that always releases its job, however it ends (finished, client
    gone, or cancelled before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], release: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event; the JSON is ASCII, so it never holds a newline."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode("ascii")


def _merge(chunks: list[list[str]], n: int) -> list[str]:
    return ["".join(c[row] for c in chunks) for row in range(n)]


def create_app(lm: CharLM, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving `lm`; run it with uvicorn (`charlm serve` does)."""
    settings = (settings or ServeSettings()).check()
    info = lm.info()  # now, in the caller's thread: the worker owns the model from here on
    worker = GenerationWorker(lm, settings)
    page = resources.files("charlm").joinpath("templates/playground.html").read_text("utf-8")
    in_flight = 0  # requests admitted and not yet answered (the event loop's thread only)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    # No /docs: FastAPI's docs pages load their scripts from a CDN, and this server needs no
    # network. The schema itself is at /openapi.json.
    app = FastAPI(title="charlm", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_body=settings.max_body)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc.status, exc.field, exc.message, headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        field = "body" if exc.status_code == 413 else None
        return error_response(exc.status_code, field, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        return error_response(500, None, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/info")
    async def get_info() -> JSONResponse:
        return JSONResponse(info)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "error", "in_flight": in_flight,
                             **worker.counts(), "limits": asdict(settings)},
                            status_code=200 if ok else 503)

    @app.post("/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request) -> Response:
        """Generate text: JSON {"text", "samples", "seed"}, or server-sent events when
        "stream" is true (see the README)."""
        nonlocal in_flight
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        opts = sample_options(req, lm, settings)
        if in_flight >= settings.max_in_flight:
            raise RequestError(503, None, f"server busy: {in_flight} requests in flight "
                               f"(--max-in-flight {settings.max_in_flight}); retry later")
        job = worker.submit(opts, req.num_samples)
        in_flight += 1
        released = False

        def release() -> None:
            nonlocal in_flight, released
            if not released:
                released = True
                in_flight -= 1
                worker.cancel(job)  # a no-op when it finished

        if not req.stream:
            try:
                return await _collect(request, job)
            finally:
                release()
        try:
            # Wait for the first text (or the job's error) so the status code can tell.
            first, finished = await worker.take(job)
        except BaseException:
            release()
            raise
        return _JobStream(_events(job, first, finished), release)

    async def _events(job: Job, first: list[list[str]], finished: bool) -> AsyncIterator[bytes]:
        chars = [0] * job.n
        chunks = first
        while True:
            for row, text in enumerate(_merge(chunks, job.n)):
                if text:
                    chars[row] += len(text)
                    yield sse({"sample": row, "text": text})
            if finished:
                break
            try:
                chunks, finished = await worker.take(job)
            except RequestError as exc:  # after the 200: say so in the stream
                yield sse({"error": exc.message, "field": exc.field}, event="error")
                return
            except Exception as exc:  # noqa: BLE001 (a bug, reported in the stream)
                yield sse({"error": f"generation failed: {exc}", "field": None}, event="error")
                return
        yield sse({"seed": job.opts.seed, "chars": chars}, event="end")

    async def _collect(request: Request, job: Job) -> Response:
        loop = asyncio.get_running_loop()
        parts: list[list[str]] = []
        next_check = loop.time() + 0.5
        while True:
            job.ready.clear()
            chunks, finished = worker.poll(job)
            parts.extend(chunks)
            if finished:
                break
            if loop.time() >= next_check:
                # A client that went away cancels its job (looked at twice a second).
                if await request.is_disconnected():
                    worker.cancel(job)
                    return Response(status_code=499)
                next_check = loop.time() + 0.5
            if chunks:
                await asyncio.sleep(0)  # let other requests run between pieces
                continue
            try:
                await asyncio.wait_for(job.ready.wait(), timeout=0.5)
            except TimeoutError:
                pass
        samples = _merge(parts, job.n)
        return JSONResponse({"text": samples[0], "samples": samples, "seed": job.opts.seed})

    return app
