"""`charlm serve`: the real server (the installed `charlm serve`, uvicorn on 127.0.0.1 and a
free port, in a subprocess) talked to with a real HTTP client (http.client).

Checks: generated text equals the library's for the same seed; streamed chunks arrive while
generation is still running and concatenate to the non-streamed text; /info and /health;
every class of bad request gets a 4xx JSON error naming the field and the server still
answers; concurrent clients get exactly their own text; a client that disconnects mid-stream
is cancelled and does not hold others up; a short request finishes while a long one runs;
over --max-in-flight is a 503; a slow reader pauses only its own job (the worker, in
process); the playground page in headless Chromium streams text into the page.

Who may ask (a second server, with a token from CHARLM_SERVE_TOKEN, allowed host names, an
allowed origin and a per-client share): a Host header naming another site is refused (DNS
rebinding), so is a page of another site, even its simple text/plain POST; an allowed origin
gets CORS headers and its preflight; no token or a wrong one is a 401 with WWW-Authenticate,
streaming too; one client over its share gets 429 while another is served; listening beyond
this machine with no token is refused before the port is taken, and --no-auth starts; the
playground asks for the token in the page and then streams.

One tiny checkpoint and one server for the module. Nothing here measures time: the waits
below are bounded polls for a state, never assertions about speed.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import typer
from browser import WebDriver, needs_webdriver
from conftest import charlm_cmd, one_line_error, served_alone, subprocess_env
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config.serving import TOKEN_ENV, ServeAccess
from charlm.errors import CharLMError

HAVE_SERVE = find_spec("fastapi") is not None and find_spec("uvicorn") is not None
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="needs the serve extra (fastapi, uvicorn)")

# The server's limits in this module (small ones, so each limit is reachable by a test).
LIMITS = {"max_length": 1_000_000, "max_samples": 4, "max_prime": 50, "max_body": 4096,
          "max_in_flight": 8, "max_per_client": 8, "chunk_steps": 32}
LONG = 1_000_000  # a request that cannot finish during a test: it is cancelled by closing
PRIME = "The state of "


class Server:
    """A running server as a client sees it; with `token`, every request carries it."""

    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.host, self.port, self.token = host, port, token
        self.url = f"http://{host}:{port}"

    def conn(self, timeout: float = 60, source: str | None = None) -> http.client.HTTPConnection:
        """A connection, from the client address `source` (another loopback address) if given."""
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout,
                                          source_address=(source, 0) if source else None)

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {"Content-Type": "application/json", **auth, **(extra or {})}

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, source: str | None = None
                ) -> tuple[int, dict[str, str], Any]:
        """(status, headers with lowercase names, parsed JSON body) of one request; 4xx/5xx
        are returned too. `headers` add to or replace the usual ones (Host included)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = self.conn(source=source)
        try:
            conn.request(method, path, body=data, headers=self.headers(headers))
            resp = conn.getresponse()
            status, hdrs, payload = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()
        ctype = hdrs.get("content-type", "")
        return status, hdrs, json.loads(payload) if "json" in ctype else payload.decode()

    def generate(self, **body: Any) -> dict[str, Any]:
        status, _, data = self.request("POST", "/generate", body)
        assert status == 200, data
        return data

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[2]

    def wait_for(self, predicate, what: str, limit: float = 60) -> dict[str, Any]:
        """Poll /health until predicate(health) holds (bounded, not a speed check)."""
        deadline = time.monotonic() + limit
        while True:
            h = self.health()
            if predicate(h):
                return h
            assert time.monotonic() < deadline, f"server never reached: {what}; last /health {h}"
            time.sleep(0.05)

    def wait_idle(self) -> dict[str, Any]:
        return self.wait_for(lambda h: h["in_flight"] == 0 and h["generating"] == 0
                             and h["queued"] == 0, "idle")


class Stream:
    """A streaming POST /generate read event by event (server-sent events)."""

    def __init__(self, server: Server, **body: Any) -> None:
        self.conn = server.conn()
        self.conn.request("POST", "/generate", json.dumps({**body, "stream": True}), server.headers())
        self.resp = self.conn.getresponse()

    def event(self) -> tuple[str, dict[str, Any]] | None:
        name, data = "message", ""
        while True:
            line = self.resp.readline().decode()
            if not line:
                return None
            line = line.rstrip("\n")
            if line == "":
                return name, json.loads(data)
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        while (ev := self.event()) is not None:
            out.append(ev)
        return out

    def close(self) -> None:
        # Close the socket itself (not only the response), so the server sees the client go.
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def limit_flags(limits: dict[str, int]) -> list[str]:
    return [a for k, v in limits.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@contextmanager
def serving(ckpt: Path, log: Path, *args: str, token: str | None = None, host: str = "127.0.0.1"
            ) -> Iterator[int]:
    """`charlm serve CKPT --port 0 ARGS` in a subprocess (with `token` in CHARLM_SERVE_TOKEN,
    else none there), until the block ends; yields its port once it answers."""
    env = subprocess_env()
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token
    with open(log, "wb") as err:
        proc = subprocess.Popen([*charlm_cmd(), "serve", str(ckpt), "--port", "0", *args],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(rf"at http://{re.escape(host)}:(\d+)/", log.read_text())):
            assert proc.poll() is None, f"charlm serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "charlm serve did not start"
            time.sleep(0.1)
        port = int(m.group(1))
        Server("127.0.0.1", port).wait_for(lambda h: h["status"] == "ok", "ready")
        yield port
        assert proc.poll() is None, f"the server died: {log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    if not HAVE_SERVE:
        pytest.skip("needs the serve extra (fastapi, uvicorn)")
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    with serving(ckpt, log, *limit_flags(LIMITS)) as port:
        yield Server("127.0.0.1", port)


# --- generate, stream, info, health ------------------------------------------------------------


def test_generate_is_the_library_sample(server, lm):
    data = server.generate(prime=PRIME, length=120, temperature=0.8, seed=5)
    assert data["seed"] == 5
    assert data["text"] == served_alone(lm, prime=PRIME, length=120, temperature=0.8, seed=5)
    assert data["samples"] == [data["text"]]
    # top-k, top-p, stop and several samples go through as they are.
    opts = {"prime": PRIME, "length": 200, "temperature": 1.2, "top_k": 5, "top_p": 0.9, "stop": "e", "seed": 9}
    data = server.generate(num_samples=3, **opts)
    assert data["samples"] == served_alone(lm, num_samples=3, **opts)
    assert all(s.endswith("e") and s.count("e") == 1 for s in data["samples"])
    # No seed: the server picks one and says which, so the text can be had again.
    data = server.generate(prime=PRIME, length=60)
    assert data["text"] == server.generate(prime=PRIME, length=60, seed=data["seed"])["text"]


def test_stream_arrives_in_chunks_and_matches_the_plain_answer(server):
    whole = server.generate(prime=PRIME, length=300, seed=11)["text"]
    s = Stream(server, prime=PRIME, length=300, seed=11)
    assert s.resp.status == 200
    assert s.resp.getheader("Content-Type").startswith("text/event-stream")
    events = s.events()
    s.close()
    texts = [d["text"] for name, d in events if name == "message"]
    assert [d["sample"] for name, d in events if name == "message"] == [0] * len(texts)
    assert "".join(texts) == whole
    # An event holds the text generated since the last one (a worker turn or several).
    assert all(texts)
    assert events[-1] == ("end", {"seed": 11, "chars": [300]})
    # Several samples: each event names its sample; each sample's text as in the plain answer.
    plain = server.generate(prime=PRIME, length=100, seed=3, num_samples=2)["samples"]
    events = Stream(server, prime=PRIME, length=100, seed=3, num_samples=2).events()
    for row in (0, 1):
        assert "".join(d["text"] for n, d in events if n == "message" and d["sample"] == row) == plain[row]


def test_first_chunk_comes_while_generation_runs_and_a_disconnect_cancels_it(server):
    before = server.wait_idle()["cancelled_total"]
    s = Stream(server, prime=PRIME, length=LONG, seed=1)
    name, first = s.event()
    assert name == "message" and 0 < len(first["text"]) < LONG
    # The text arrived incrementally: the request is still being generated.
    h = server.health()
    assert h["in_flight"] == 1 and h["generating"] == 1
    # Others are not held up by it: a short request finishes while it runs.
    assert len(server.generate(prime=PRIME, length=50, seed=2)["text"]) == 50
    assert server.health()["cancelled_total"] == before
    s.close()  # the client goes away mid-stream
    h = server.wait_for(lambda h: h["in_flight"] == 0 and h["generating"] == 0, "the job cancelled")
    assert h["cancelled_total"] == before + 1
    assert len(server.generate(length=20)["text"]) == 20


def test_a_plain_request_whose_client_leaves_is_cancelled(server):
    before = server.wait_idle()["cancelled_total"]
    conn = server.conn()
    conn.request("POST", "/generate", json.dumps({"length": LONG}), {"Content-Type": "application/json"})
    server.wait_for(lambda h: h["generating"] == 1, "the request generating")
    conn.sock.shutdown(socket.SHUT_RDWR)  # gone before the answer
    conn.close()
    h = server.wait_for(lambda h: h["in_flight"] == 0 and h["generating"] == 0, "the job cancelled")
    assert h["cancelled_total"] == before + 1


def test_info_and_health(server, lm):
    status, _, info = server.request("GET", "/info")
    assert status == 200
    assert info == json.loads(json.dumps(lm.info()))  # what `charlm info --json` prints
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert {k: health["limits"][k] for k in LIMITS} == LIMITS


# --- bad requests ------------------------------------------------------------------------------

BAD = [
    # unknown fields and wrong types
    ({"lenght": 5}, 422, "lenght"),
    ({"adapt": True, "prime": "The state of"}, 422, "adapt"),  # the CLI's and the API's, not the server's
    ({"length": "5"}, 422, "length"),
    ({"length": 5.0}, 422, "length"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"seed": 1.5}, 422, "seed"),
    ({"stream": 1}, 422, "stream"),
    ({"prime": 7}, 422, "prime"),
    # out of range: the sampler's own rules, then the server's limits
    ({"temperature": -1}, 422, "temperature"),
    ({"top_k": -1}, 422, "top_k"),
    ({"top_p": 0}, 422, "top_p"),
    ({"top_p": 1.5}, 422, "top_p"),
    ({"length": -1}, 422, "length"),
    ({"seed": -1}, 422, "seed"),
    ({"seed": 2**64}, 422, "seed"),
    ({"unknown": "maybe"}, 422, "unknown"),
    ({"length": LIMITS["max_length"] + 1}, 422, "length"),
    ({"num_samples": 0}, 422, "num_samples"),
    ({"num_samples": LIMITS["max_samples"] + 1}, 422, "num_samples"),
    # the prime: characters outside the vocabulary, too long
    ({"prime": "The state €"}, 422, "prime"),
    ({"prime": "a" * (LIMITS["max_prime"] + 1)}, 422, "prime"),
    # not a JSON object at all
    (b"{bad", 400, "body"),
    (b"", 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
    (b'{"prime": "\\ud800"}', 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b'{"length": 10} trailing', 400, "body"),
    # too big: the declared size is refused before the body is read
    (b'{"prime": "' + b"a" * LIMITS["max_body"] + b'"}', 413, "body"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{s}-{f}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_bad_request_gets_a_json_error_naming_the_field(server, body, status, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, data = server.request("POST", "/generate", raw=raw)
    assert got == status, data
    assert headers["content-type"] == "application/json"
    assert data["field"] == field and data["error"].startswith(f"{field}: ")
    assert "--" not in data["error"].split(" (")[0]  # JSON names, not the CLI's flags
    # Streamed requests are refused the same way, before any event.
    if isinstance(body, dict) and "stream" not in body:
        got, _, data = server.request("POST", "/generate", {**body, "stream": True})
        assert (got, data["field"]) == (status, field)


def test_a_chunked_body_over_the_limit_is_refused(server):
    conn = server.conn()
    chunks = iter([b'{"prime": "', b"a" * LIMITS["max_body"], b'"}'])
    conn.request("POST", "/generate", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["field"] == "body"
    conn.close()


def test_other_errors_are_json_and_the_server_still_answers(server):
    assert server.request("GET", "/nowhere")[::2] == (404, {"error": "Not Found", "field": None})
    assert server.request("GET", "/generate")[0] == 405
    # After every bad request above the server is alive and generates.
    assert server.health()["status"] == "ok"
    assert len(server.generate(prime=PRIME, length=30)["text"]) == 30


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_text(server, lm):
    server.wait_idle()
    n = LIMITS["max_in_flight"]
    results: dict[int, Any] = {}

    def client(i: int) -> None:
        try:
            if i % 2:
                results[i] = server.generate(prime=PRIME, length=300 + 10 * i, seed=100 + i)["text"]
            else:
                s = Stream(server, prime=PRIME, length=300 + 10 * i, seed=100 + i)
                results[i] = "".join(d["text"] for name, d in s.events() if name == "message")
                s.close()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    for i in range(n):
        assert results[i] == served_alone(lm, prime=PRIME, length=300 + 10 * i, seed=100 + i), i


def test_over_the_in_flight_limit_is_503_then_served_again(server):
    server.wait_idle()
    before = server.health()["cancelled_total"]
    streams = [Stream(server, length=LONG, seed=i) for i in range(LIMITS["max_in_flight"])]
    try:
        for s in streams:
            assert s.event()[0] == "message"  # admitted and generating
        # Another client: this one holds its whole share (--max-per-client 8), which is a 429.
        status, headers, data = server.request("POST", "/generate", {"length": 10}, source="127.0.0.2")
        assert status == 503 and headers["retry-after"] == "1"
        assert data["field"] is None and "--max-in-flight 8" in data["error"]
    finally:
        for s in streams:
            s.close()
    h = server.wait_idle()
    assert h["cancelled_total"] == before + LIMITS["max_in_flight"]
    assert len(server.generate(length=10)["text"]) == 10


@needs_serve
def test_a_slow_reader_pauses_only_its_own_job(lm):
    """In process: a job whose text is not taken stops at the buffer bound (the worker skips
    it rather than waiting), while another job runs to its end; taking the text resumes it."""
    from charlm.config.sampling import SampleOptions
    from charlm.config.serving import ServeSettings
    from charlm.serving.worker import GenerationWorker

    settings = ServeSettings(chunk_steps=8, buffer_chars=64)
    worker = GenerationWorker(lm, settings)

    async def main() -> None:
        worker.start()
        try:
            slow = worker.submit(SampleOptions(length=10_000, seed=1))
            fast = worker.submit(SampleOptions(length=2_000, seed=2))
            text = []
            while True:
                chunks, finished = await worker.take(fast)
                text.extend(c[0] for c in chunks)
                if finished:
                    break
            assert len("".join(text)) == 2_000
            # The slow job generated up to the bound and no further (64 + one chunk of 8), and
            # stepped out of the batch.
            assert 64 <= slow.buffered < 64 + 8 and not slow.finished
            assert slow.paused and slow.group is not None and slow.group.steps < 64 + 16
            chunks, _ = await worker.take(slow)  # the reader catches up...
            taken = sum(len(c[0]) for c in chunks)
            await worker.take(slow)  # ...and the job goes on, back in the batch
            assert slow.group.steps > taken
            worker.cancel(slow)
        finally:
            worker.stop()
        assert not worker.active and not worker.thread.is_alive()

    asyncio.run(main())


# --- the command line --------------------------------------------------------------------------


def test_every_setting_is_a_serve_flag_with_its_default():
    from charlm.config.serving import ServeSettings

    command = typer.main.get_command(app).commands["serve"]
    defaults = {p.name: p.default for p in command.params}
    settings = ServeSettings()
    for f in fields(settings):
        assert defaults[f.name] == getattr(settings, f.name), f.name
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000


def test_serve_without_the_extra_says_how_to_install_it(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` raises ImportError
    res = CliRunner().invoke(app, ["serve", str(ckpt)])
    assert res.exit_code == 2
    missing = "uvicorn" if find_spec("fastapi") is not None else "fastapi and uvicorn"
    assert res.output.strip() == f"charlm: error: charlm serve needs {missing}: pip install 'charlm[serve]'"


@needs_serve
def test_serve_bad_flags_and_a_busy_port_exit_2(ckpt):
    res = CliRunner().invoke(app, ["serve", str(ckpt), "--max-length", "0"])
    assert res.exit_code == 2
    assert res.output.strip() == "charlm: error: --max-length: must be an integer >= 1, got 0"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", str(ckpt), "--port", str(port)])
    assert res.exit_code == 2
    assert res.output.startswith(f"charlm: error: --host/--port: cannot listen on 127.0.0.1:{port}: ")


# --- who may ask: Host, Origin, token, one client's share ----------------------------------------

TOKEN = "t0ken-for-the-tests_9f2c"
CORS = "https://app.example.com"
GUARDED = {**LIMITS, "max_per_client": 2}
HOST_REFUSED = "is not a name of this server (it answers to localhost, the address it serves and each --allowed-host)"


@pytest.fixture(scope="module")
def guarded(ckpt, tmp_path_factory):
    """A server with a token (from CHARLM_SERVE_TOKEN), two allowed host names, an allowed
    origin and a share of 2 requests in flight per client."""
    if not HAVE_SERVE:
        pytest.skip("needs the serve extra (fastapi, uvicorn)")
    log = tmp_path_factory.mktemp("serve-guarded") / "stderr.txt"
    with serving(ckpt, log, *limit_flags(GUARDED), "--allowed-host", "charlm.test,*.example.org",
                 "--cors-origin", CORS, token=TOKEN) as port:
        assert TOKEN not in log.read_text() and "token required" in log.read_text()
        yield Server("127.0.0.1", port, token=TOKEN)


def test_a_host_header_naming_another_site_is_refused(server):
    port = server.port
    # What a page of evil.example sends once its name points at this machine (DNS rebinding).
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "localhost.evil.example"):
        for method, path in (("GET", "/health"), ("POST", "/generate"), ("GET", "/")):
            status, headers, data = server.request(method, path, {"length": 5}, headers={"Host": host})
            assert status == 400 and headers["content-type"] == "application/json", (host, path)
            assert data == {"error": f"Host {host!r} {HOST_REFUSED}", "field": None}
    # The address served and localhost, with or without the port, in any case.
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "localhost", f"LocalHost:{port}",
                 f"[::1]:{port}"):
        status, _, data = server.request("GET", "/health", headers={"Host": host})
        assert status == 200 and data["status"] == "ok", host
    assert server.generate(length=5, seed=1)["text"]


def test_an_allowed_host_name_is_answered(guarded):
    for host in ("charlm.test", f"charlm.test:{guarded.port}", "CHARLM.test:443", "api.example.org",
                 "a.b.example.org:8443", f"localhost:{guarded.port}"):
        assert guarded.request("GET", "/info", headers={"Host": host})[0] == 200, host
    for host in ("example.org", "charlm.test.evil.example", "xcharlm.test", "evil.example"):
        status, _, data = guarded.request("GET", "/info", headers={"Host": host})
        assert (status, data["error"]) == (400, f"Host {host!r} {HOST_REFUSED}")


def test_a_page_of_another_site_cannot_make_the_server_generate(server):
    port = server.port
    before = server.wait_idle()
    # A cross-site form or fetch(mode: "no-cors") sends text/plain with no preflight: CORS
    # headers alone would let it run and only hide the answer. It is refused before it runs.
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", "http://127.0.0.1:1",
                   f"https://127.0.0.1.evil.example:{port}"):
        status, headers, data = server.request("POST", "/generate", raw=b'{"length": 2000}',
                                               headers={"Origin": origin, "Content-Type": "text/plain"})
        assert status == 403 and data["field"] is None, origin
        assert data["error"].startswith(f"Origin {origin!r}: pages of other sites may not use this server")
        assert "access-control-allow-origin" not in headers
    after = server.health()
    assert after["in_flight"] == 0 and after["cancelled_total"] == before["cancelled_total"]
    # Its preflight, and a GET, are refused the same way.
    status, headers, _ = server.request("OPTIONS", "/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    assert server.request("GET", "/info", headers={"Origin": "http://evil.example"})[0] == 403
    # The server's own page (its origin is the host it asks) is served, whatever name it uses.
    for netloc in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, _, data = server.request("POST", "/generate", {"length": 10, "seed": 4},
                                         headers={"Origin": f"http://{netloc}", "Host": netloc})
        assert status == 200 and len(data["text"]) == 10


def test_an_allowed_origin_gets_cors_headers_and_its_preflight(guarded):
    anon = Server(guarded.host, guarded.port)
    # The browser's preflight carries no token; the answer lets the origin send one.
    status, headers, _ = anon.request("OPTIONS", "/generate", headers={
        "Origin": CORS, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 200 and headers["access-control-allow-origin"] == CORS
    assert "POST" in headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= set(headers["access-control-allow-headers"].lower().split(", "))
    status, headers, data = guarded.request("POST", "/generate", {"length": 10, "seed": 2}, headers={"Origin": CORS})
    assert status == 200 and len(data["text"]) == 10
    assert headers["access-control-allow-origin"] == CORS and "Retry-After" in headers["access-control-expose-headers"]
    # Without the token the page can read that it needs one.
    status, headers, _ = anon.request("POST", "/generate", {"length": 10}, headers={"Origin": CORS})
    assert status == 401 and headers["access-control-allow-origin"] == CORS
    # Another origin is refused even with the token.
    assert guarded.request("POST", "/generate", {"length": 10}, headers={"Origin": "https://evil.example"})[0] == 403


def test_the_token_is_needed_everywhere_but_the_page_and_health(guarded, lm):
    anon = Server(guarded.host, guarded.port)
    wrong = Server(guarded.host, guarded.port, token=TOKEN[:-1] + "x")
    for method, path in (("POST", "/generate"), ("GET", "/info"), ("GET", "/openapi.json"), ("GET", "/nowhere")):
        status, headers, data = anon.request(method, path, {"length": 5})
        assert (status, headers["www-authenticate"]) == (401, "Bearer"), path
        assert data == {"error": "this server needs a token: send the header Authorization: Bearer TOKEN",
                        "field": None}
        status, headers, data = wrong.request(method, path, {"length": 5})
        assert (status, headers["www-authenticate"], data["error"]) == (401, 'Bearer error="invalid_token"',
                                                                          "wrong token"), path
    for header in (f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer", f"Bearer {TOKEN[:-1]}"):
        assert anon.request("GET", "/info", headers={"Authorization": header})[0] == 401, header
    # The right token (the scheme in any case), plain and streamed.
    assert anon.request("GET", "/info", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    expected = served_alone(lm, prime=PRIME, length=80, seed=6)
    assert guarded.generate(prime=PRIME, length=80, seed=6)["text"] == expected
    events = Stream(guarded, prime=PRIME, length=80, seed=6).events()
    assert "".join(d["text"] for name, d in events if name == "message") == expected
    refused = Stream(anon, prime=PRIME, length=80)
    assert refused.resp.status == 401 and refused.resp.getheader("WWW-Authenticate") == "Bearer"
    refused.close()
    # Open: the page (it asks for the token) and liveness, which tells nothing of the token.
    status, _, page = anon.request("GET", "/")
    assert status == 200 and 'id="token-form"' in page
    status, _, health = anon.request("GET", "/health")
    assert status == 200 and TOKEN not in json.dumps(health) and "token" not in health["limits"]


def test_one_client_cannot_take_every_slot(guarded):
    guarded.wait_idle()
    assert guarded.health()["limits"]["max_per_client"] == 2
    mine = [Stream(guarded, length=LONG, seed=i) for i in range(2)]
    try:
        for s in mine:
            assert s.event()[0] == "message"  # admitted and generating
        status, headers, data = guarded.request("POST", "/generate", {"length": 10})
        assert (status, headers["retry-after"], data["field"]) == (429, "1", None)
        assert data["error"] == ("too many requests from this client: 2 in flight (--max-per-client 2); "
                                 "retry when one ends")
        # Another client (another loopback address) is served while the first holds its share...
        status, _, data = guarded.request("POST", "/generate", {"length": 10, "seed": 3}, source="127.0.0.2")
        assert status == 200 and len(data["text"]) == 10
        # ...and so is one a proxy on this machine speaks for (uvicorn reads its X-Forwarded-For).
        status, _, _ = guarded.request("POST", "/generate", {"length": 10}, headers={"X-Forwarded-For": "203.0.113.7"})
        assert status == 200
        assert guarded.health()["in_flight"] == 2
    finally:
        for s in mine:
            s.close()
    guarded.wait_idle()
    assert len(guarded.generate(length=10)["text"]) == 10


def test_which_addresses_need_a_token():
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert ServeAccess(host=host).check().host == host
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "example.com", "::ffff:10.0.0.1"):
        shown = re.escape(host if host and ":" not in host else repr(host))
        with pytest.raises(CharLMError, match=rf"^--host {shown}: .*{TOKEN_ENV}.*--token.*--no-auth"):
            ServeAccess(host=host).check()
        ServeAccess(host=host, token="x").check()
        ServeAccess(host=host).check(no_auth=True)
    with pytest.raises(CharLMError, match="^--no-auth: a token is set"):
        ServeAccess(token="x").check(no_auth=True)
    assert "s3cr3t" not in repr(ServeAccess(token="s3cr3t"))


@needs_serve
def test_serving_beyond_this_machine_without_a_token_is_refused_before_listening(ckpt):
    env = subprocess_env()
    env.pop(TOKEN_ENV, None)
    with socket.socket() as busy:  # the port is taken: had the command tried to listen, it would say so
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([*charlm_cmd(), "serve", str(ckpt), "--host", "0.0.0.0", "--port", str(port)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr.splitlines() == [
        f"charlm: error: --host 0.0.0.0: other machines could use this server with no token: set one in "
        f"the environment variable {TOKEN_ENV} (or --token, which other users see in ps), or pass --no-auth "
        "to serve without one"]


@needs_serve
def test_with_no_auth_it_listens_everywhere_and_answers_the_address_dialled(ckpt, tmp_path):
    with serving(ckpt, tmp_path / "stderr.txt", "--host", "0.0.0.0", "--no-auth", host="0.0.0.0") as port:
        assert "no token" in (tmp_path / "stderr.txt").read_text()
        srv = Server("127.0.0.2", port)  # another of this machine's addresses
        for host, status in ((f"127.0.0.2:{port}", 200), (f"0.0.0.0:{port}", 200), (f"localhost:{port}", 200),
                             (f"127.0.0.3:{port}", 400), (f"evil.example:{port}", 400)):
            assert srv.request("GET", "/health", headers={"Host": host})[0] == status, host
        assert len(srv.generate(length=10)["text"]) == 10


@needs_serve
def test_the_access_flags_reach_the_app_and_the_token_is_never_shown(ckpt, monkeypatch):
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_create_app(lm: Any, settings: Any, access: ServeAccess) -> object:
        seen["access"] = access
        return object()

    monkeypatch.setattr("charlm.serving.app.create_app", fake_create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: [s.close() for s in sockets])
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    args = ["serve", str(ckpt), "--port", "0", "--allowed-host", "A.example, b.example", "--allowed-host",
            "*.c.example", "--cors-origin", "https://App.example.com", "--cors-origin", "http://localhost:3000"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert seen["access"] == ServeAccess(host="127.0.0.1", token="from-the-environment",
                                         allowed_hosts=("a.example", "b.example", "*.c.example"),
                                         cors_origins=("https://app.example.com", "http://localhost:3000"))
    assert "from-the-environment" not in res.output + repr(seen["access"]) and "token required" in res.stderr
    res = CliRunner().invoke(app, ["serve", str(ckpt), "--port", "0", "--token", "from-the-flag"])
    assert res.exit_code == 0 and seen["access"].token == "from-the-flag"  # the flag wins
    assert "from-the-flag" not in res.output
    # The help says where a token is safe, and shows none.
    res = CliRunner().invoke(app, ["serve", "--help"])
    assert "from-the-environment" not in res.output
    assert "(ps): set CHARLM_SERVE_TOKEN" in " ".join(res.output.split())


def test_bad_access_flags_are_one_line_naming_each_and_the_token_is_never_shown(ckpt, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    res = CliRunner().invoke(app, ["serve", str(ckpt), "--token", "two words-secret", "--allowed-host",
                                   "https://x.example,a.*.example,x.example:8000,*.ok.example,[::1]",
                                   "--cors-origin", "https://app.example.com/,app.example.com,https://ok.example"])
    line = one_line_error(res, "--token/CHARLM_SERVE_TOKEN: must be visible ASCII characters without spaces",
                          "--allowed-host: 'https://x.example' is not a host name",
                          "--allowed-host: 'a.*.example' is not a host pattern",
                          "--allowed-host: 'x.example:8000' has a port",
                          "--cors-origin: 'https://app.example.com/' is not an origin",
                          "--cors-origin: 'app.example.com' is not an origin")
    assert "secret" not in line and "ok.example" not in line and "::1" not in line


# --- the playground in a real browser ----------------------------------------------------------

@needs_webdriver
def test_playground_streams_text_into_the_page(server, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    browser = WebDriver(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        for css, value in (("#prime", "The state of the"), ("#length", "400"), ("#seed", "21"),
                           ("#temperature", "0.9")):
            browser.type(css, value)
        browser.click(browser.element("#generate"))
        deadline = time.monotonic() + 60
        while browser.script("return document.getElementById('status').dataset.state") != "done":
            assert time.monotonic() < deadline, browser.script("return document.body.innerText")
            time.sleep(0.1)
        shown = browser.script("return document.getElementById('output').textContent")
        generated = browser.script("return document.querySelector('#output .generated').textContent")
        status = browser.script("return document.getElementById('status').textContent")
        model = browser.script("return document.getElementById('model').textContent")
        png = browser.screenshot()
    finally:
        browser.quit()
    expected = server.generate(prime="The state of the", length=400, temperature=0.9, seed=21)["text"]
    assert generated == expected
    assert shown == "The state of the" + expected
    assert status.startswith("400 characters in ") and status.endswith(" · seed 21")
    assert model.startswith("1x32 LSTM · ")
    # The screenshot is a real render: the page's size, and many colours (text, not a blank page).
    (tmp_path / "playground.png").write_bytes(png)
    image = PIL.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] == 1200 and 600 <= image.size[1] <= 800  # the window, less its frame
    assert len(image.getcolors(maxcolors=1 << 24)) > 50


@needs_webdriver
def test_playground_asks_for_the_token_then_streams(guarded, tmp_path):
    browser = WebDriver(tmp_path / "profile")

    def wait(js: str, what: str) -> None:
        deadline = time.monotonic() + 60
        while not browser.script(js):
            assert time.monotonic() < deadline, f"{what}: {browser.script('return document.body.innerText')}"
            time.sleep(0.05)

    asking = "return !document.getElementById('token-form').hidden"
    try:
        browser.open(guarded.url + "/")
        wait(asking, "the page never asked for the token")  # /info answered 401
        browser.type("#token", "not-the-token")
        browser.click(browser.element("#token-submit"))
        wait("return document.getElementById('token-message').textContent.includes('refused')",
             "a wrong token was not asked again")
        browser.type("#token", TOKEN)
        browser.click(browser.element("#token-submit"))
        wait("return document.getElementById('model').textContent.startsWith('1x32 LSTM')", "no model info")
        assert not browser.script(asking)
        for css, value in (("#prime", "The state of the"), ("#length", "300"), ("#seed", "8"),
                           ("#temperature", "0.9")):
            browser.type(css, value)
        browser.click(browser.element("#generate"))
        wait("return document.getElementById('status').dataset.state === 'done'", "generation never finished")
        generated = browser.script("return document.querySelector('#output .generated').textContent")
        kept = browser.script("return sessionStorage.getItem('charlm-token')")
        url = browser.script("return location.href")
    finally:
        browser.quit()
    assert generated == guarded.generate(prime="The state of the", length=300, temperature=0.9, seed=8)["text"]
    assert kept == TOKEN and TOKEN not in url  # kept for the tab, never put in the address
