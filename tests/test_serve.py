"""`charlm serve`: the real server (the installed `charlm serve`, uvicorn on 127.0.0.1 and a
free port, in a subprocess) talked to with a real HTTP client (http.client / urllib).

Checks: generated text equals the library's for the same seed; streamed chunks arrive while
generation is still running and concatenate to the non-streamed text; /info and /health;
every class of bad request gets a 4xx JSON error naming the field and the server still
answers; concurrent clients get exactly their own text; a client that disconnects mid-stream
is cancelled and does not hold others up; a short request finishes while a long one runs;
over --max-in-flight is a 503; a slow reader pauses only its own job (the worker, in
process); the playground page in headless Chromium streams text into the page.

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
import urllib.error
import urllib.request
from dataclasses import fields
from importlib.util import find_spec
from typing import Any

import pytest
import typer
from browser import WebDriver, needs_webdriver
from conftest import charlm_cmd, subprocess_env
from typer.testing import CliRunner

from charlm.cli import app

HAVE_SERVE = find_spec("fastapi") is not None and find_spec("uvicorn") is not None
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="needs the serve extra (fastapi, uvicorn)")

# The server's limits in this module (small ones, so each limit is reachable by a test).
LIMITS = {"max_length": 1_000_000, "max_samples": 4, "max_prime": 50, "max_body": 4096,
          "max_in_flight": 8, "chunk_steps": 32}
LONG = 1_000_000  # a request that cannot finish during a test: it is cancelled by closing
PRIME = "The state of "


class Server:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    def conn(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """(status, headers, parsed JSON body) of one request; 4xx/5xx are returned too."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            status, hdrs, payload = exc.code, dict(exc.headers), exc.read()
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
        self.conn.request("POST", "/generate", json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json"})
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


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    if not HAVE_SERVE:
        pytest.skip("needs the serve extra (fastapi, uvicorn)")
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    flags = [a for k, v in LIMITS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    with open(log, "wb") as err:
        proc = subprocess.Popen([*charlm_cmd(), "serve", str(ckpt), "--port", "0", *flags],
                                stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"at http://127\.0\.0\.1:(\d+)/", log.read_text())):
            assert proc.poll() is None, f"charlm serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "charlm serve did not start"
            time.sleep(0.1)
        srv = Server("127.0.0.1", int(m.group(1)))
        srv.wait_for(lambda h: h["status"] == "ok", "ready")
        yield srv
        assert proc.poll() is None, f"the server died: {log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)



# --- generate, stream, info, health ------------------------------------------------------------


def test_generate_is_the_library_sample(server, lm):
    data = server.generate(prime=PRIME, length=120, temperature=0.8, seed=5)
    assert data["seed"] == 5
    assert data["text"] == lm.sample(prime=PRIME, length=120, temperature=0.8, seed=5)
    assert data["samples"] == [data["text"]]
    # top-k, top-p, stop and several samples go through as they are.
    opts = {"prime": PRIME, "length": 200, "temperature": 1.2, "top_k": 5, "top_p": 0.9, "stop": "e", "seed": 9}
    data = server.generate(num_samples=3, **opts)
    assert data["samples"] == lm.sample(num_samples=3, **opts)
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
        assert results[i] == lm.sample(prime=PRIME, length=300 + 10 * i, seed=100 + i), i


def test_over_the_in_flight_limit_is_503_then_served_again(server):
    server.wait_idle()
    before = server.health()["cancelled_total"]
    streams = [Stream(server, length=LONG, seed=i) for i in range(LIMITS["max_in_flight"])]
    try:
        for s in streams:
            assert s.event()[0] == "message"  # admitted and generating
        status, headers, data = server.request("POST", "/generate", {"length": 10})
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
            # The slow job generated up to the bound and no further (64 + one chunk of 8).
            assert 64 <= slow.buffered < 64 + 8 and not slow.finished
            chunks, _ = await worker.take(slow)  # the reader catches up...
            taken = sum(len(c[0]) for c in chunks)
            await worker.take(slow)  # ...and the job goes on
            assert slow.steps > taken
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
