"""`charlm serve`: an HTTP API and a playground page for one loaded model.

    POST /generate   JSON sampling options -> {"text", "samples", "seed"}; with
                     "stream": true, server-sent events as the text is generated
    GET  /info       what `charlm info --json` prints
    GET  /health     liveness, requests in flight, the server's limits
    GET  /           the playground (self-contained HTML/JS/CSS, no network needed)

Concurrency: one generation worker thread owns the model (`charlm.serving.worker`); a client that
disconnects cancels its request's job. Every limit is a `ServeSettings` field and a
`charlm serve` flag; one client address may hold only its share of the requests in flight.

Who may ask: `charlm.serving.security` (Host, Origin and token checks in front of the app, as
`ServeAccess` says; closed by default).

Bad requests get a 4xx JSON error `{"error": ..., "field": ...}` naming the field: the
request schema is a pydantic model (strict types, unknown fields refused) and the sampling
rules are the sampler's own (`SampleOptions.check`), their flag names mapped to JSON fields.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from charlm import __version__
from charlm.api import CharLM
from charlm.config.sampling import SampleOptions
from charlm.config.serving import ServeAccess, ServeSettings
from charlm.errors import CharLMError
from charlm.serving.security import error_response, guard
from charlm.serving.worker import GenerationWorker, Job, RequestError, from_charlm_error


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


def from_validation_error(exc: ValidationError) -> RequestError:
    """The first pydantic problem as one message naming its field."""
    e = exc.errors()[0]
    loc = [str(p) for p in e["loc"]]
    if e["type"] == "json_invalid":
        return RequestError(400, "body", f"body: not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})")
    if not loc:
        return RequestError(422, "body", "body: must be a JSON object of sampling options")
    field = loc[0]
    if e["type"] == "extra_forbidden" and field == "adapt":
        # Adapting a copy takes seconds of the one worker thread, which every request shares,
        # and an adapted copy's rows cannot share the batch: the CLI and the API offer it.
        return RequestError(422, field, "adapt: not offered by charlm serve (adapting would stall every other "
                            "request); use charlm sample --adapt, charlm chat --adapt or CharLM.sample(adapt=True)")
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
    try:
        opts = SampleOptions(length=req.length, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                             prime=req.prime, stop=req.stop, seed=req.seed, num_samples=req.num_samples,
                             unknown=req.unknown).check()
        lm.sampler.prime_ids(req.prime, req.unknown)  # characters outside the vocabulary
    except CharLMError as exc:
        raise from_charlm_error(exc) from None
    if opts.seed is None:  # pick one here so the answer can say which: the text is reproducible
        opts.seed = int.from_bytes(os.urandom(8), "little") >> 1
    return opts


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


class InFlight:
    """Requests admitted and not yet answered: at most `limit` in all (--max-in-flight) and
    `per_client` from one client address (--max-per-client), so one client cannot take every
    slot. Touched by the event loop's thread only."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit, self.per_client, self.count = limit, per_client, 0
        self.clients: dict[str, int] = {}  # only clients with requests in flight

    def check(self, client: str) -> None:
        """Refuse a request from `client` when it holds its share (429) or the server is full (503)."""
        held = self.clients.get(client, 0)
        if held >= self.per_client:
            raise RequestError(429, None, f"too many requests from this client: {held} in flight "
                               f"(--max-per-client {self.per_client}); retry when one ends")
        if self.count >= self.limit:
            raise RequestError(503, None, f"server busy: {self.count} requests in flight "
                               f"(--max-in-flight {self.limit}); retry later")

    def enter(self, client: str) -> None:
        self.count += 1
        self.clients[client] = self.clients.get(client, 0) + 1

    def leave(self, client: str) -> None:
        self.count -= 1
        self.clients[client] -= 1
        if not self.clients[client]:
            del self.clients[client]


class Server:
    """What the app's handlers share: the model's worker, the limits and the admission count."""

    def __init__(self, lm: CharLM, settings: ServeSettings) -> None:
        self.lm, self.settings = lm, settings
        self.info = lm.info()  # now, in the caller's thread: the worker owns the model from here on
        self.worker = GenerationWorker(lm, settings)
        self.page = resources.files("charlm").joinpath("templates/playground.html").read_text("utf-8")
        self.in_flight = InFlight(settings.max_in_flight, settings.per_client())

    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def get_info(self) -> JSONResponse:
        return JSONResponse(self.info)

    async def health(self) -> JSONResponse:
        ok = self.worker.alive
        return JSONResponse({"status": "ok" if ok else "error", "in_flight": self.in_flight.count,
                             **self.worker.counts(),
                             "limits": {**asdict(self.settings), "max_per_client": self.in_flight.per_client}},
                            status_code=200 if ok else 503)

    async def generate(self, request: Request) -> Response:
        """Generate text: JSON {"text", "samples", "seed"}, or server-sent events when
        "stream" is true (docs/commands.md, `charlm serve`)."""
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        opts = sample_options(req, self.lm, self.settings)
        # The client's address (behind a proxy on this machine, the one it forwards: uvicorn
        # trusts X-Forwarded-For from 127.0.0.1 and ::1).
        client = request.client.host if request.client else ""
        self.in_flight.check(client)
        job = self.worker.submit(opts)
        release = self._admitted(job, client)
        if not req.stream:
            try:
                return await self._collect(request, job)
            finally:
                release()
        try:
            # Wait for the first text (or the job's error) so the status code can tell.
            first, finished = await self.worker.take(job)
        except BaseException:
            release()
            raise
        return _JobStream(self._events(job, first, finished), release)

    def _admitted(self, job: Job, client: str) -> Callable[[], None]:
        """Count `job`'s request (from `client`) in flight; the function returned ends it once,
        however it ends (and cancels the job: a no-op when it finished)."""
        self.in_flight.enter(client)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight.leave(client)
                self.worker.cancel(job)

        return release

    async def _events(self, job: Job, first: list[list[str]], finished: bool) -> AsyncIterator[bytes]:
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
                chunks, finished = await self.worker.take(job)
            except RequestError as exc:  # after the 200: say so in the stream
                yield sse({"error": exc.message, "field": exc.field}, event="error")
                return
            except Exception as exc:
                yield sse({"error": f"generation failed: {exc}", "field": None}, event="error")
                return
        yield sse({"seed": job.opts.seed, "chars": chars}, event="end")

    async def _collect(self, request: Request, job: Job) -> Response:
        loop = asyncio.get_running_loop()
        parts: list[list[str]] = []
        next_check = loop.time() + 0.5
        while True:
            job.ready.clear()
            chunks, finished = self.worker.poll(job)
            parts.extend(chunks)
            if finished:
                break
            if loop.time() >= next_check:
                # A client that went away cancels its job (looked at twice a second).
                if await request.is_disconnected():
                    self.worker.cancel(job)
                    return Response(status_code=499)
                next_check = loop.time() + 0.5
            if chunks:
                await asyncio.sleep(0)  # let other requests run between pieces
                continue
            with suppress(TimeoutError):
                await asyncio.wait_for(job.ready.wait(), timeout=0.5)
        samples = _merge(parts, job.n)
        return JSONResponse({"text": samples[0], "samples": samples, "seed": job.opts.seed})


def create_app(lm: CharLM, settings: ServeSettings | None = None, access: ServeAccess | None = None) -> FastAPI:
    """The ASGI app serving `lm`, answering whom `access` lets in (by default: this machine's
    requests to 127.0.0.1, no token); run it with uvicorn (`charlm serve` does)."""
    server = Server(lm, (settings or ServeSettings()).check())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    # No /docs: FastAPI's docs pages load their scripts from a CDN, and this server needs no
    # network. The schema itself is at /openapi.json.
    app = FastAPI(title="charlm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = server.worker
    app.add_middleware(BodyLimit, max_body=server.settings.max_body)
    guard(app, access or ServeAccess())  # added after BodyLimit, so its checks run first
    app.add_exception_handler(RequestError, _request_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _bug)
    app.add_api_route("/", server.playground, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/info", server.get_info, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/generate", server.generate, methods=["POST"], openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    return app


async def _request_error(request: Request, exc: RequestError) -> Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return error_response(exc.status, exc.field, exc.message, headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    field = "body" if exc.status_code == 413 else None
    return error_response(exc.status_code, field, str(exc.detail), exc.headers)


async def _bug(request: Request, exc: Exception) -> Response:
    return error_response(500, None, f"internal error: {type(exc).__name__}: {exc}")
