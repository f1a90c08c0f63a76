"""Abuse of a real `charlm serve` on 127.0.0.1 does not hurt other clients: streams abandoned
after a few bytes stop taking steps at once, half-sent requests held open, a huge body,
malformed JSON, wrong methods and paths; during each a normal request is still served
promptly, and its text is the text it gets alone."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
from conftest import served_alone
from test_serve import LONG, PRIME, Stream, server  # noqa: F401  (the module's server fixture)

PROMPT_S = 10.0  # "promptly": far above a normal request's time here, far below a hang


def _normal(srv, lm) -> None:
    """A normal request, served in time and with its own text."""
    start = time.monotonic()
    got = srv.generate(prime=PRIME, length=40, seed=77)["text"]
    assert time.monotonic() - start < PROMPT_S
    assert got == served_alone(lm, prime=PRIME, length=40, seed=77)


def test_abandoned_streams_stop_taking_steps_at_once(server, lm):  # noqa: F811
    server.wait_idle()
    before = server.health()["cancelled_total"]
    streams = [Stream(server, length=LONG, seed=i) for i in range(6)]
    for s in streams:
        assert s.event() is not None  # a few bytes of each, then the client goes
    h = server.wait_for(lambda h: h["batch_rows"] >= 6, "six rows in the batch")
    assert h["generating"] == 6
    for s in streams:
        s.close()
    h = server.wait_for(lambda h: h["batch_rows"] == 0 and h["generating"] == 0, "the rows gone", limit=5)
    assert h["cancelled_total"] - before == 6
    _normal(server, lm)


def test_half_sent_requests_held_open_do_not_block_others(server, lm):  # noqa: F811
    server.wait_idle()
    socks = []
    try:
        for i in range(40):
            s = socket.create_connection((server.host, server.port), timeout=10)
            head = (f"POST /generate HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n")
            s.sendall(head.encode() + b'{"length": 10' if i % 2 else head[:30].encode())  # body or headers cut
            socks.append(s)
        _normal(server, lm)
        assert server.health()["in_flight"] == 0  # a request not yet read takes no slot
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("what", ["huge body", "malformed JSON", "wrong method", "wrong path", "not JSON"])
def test_bad_requests_beside_a_stream_get_errors_and_others_go_on(server, lm, what):  # noqa: F811
    server.wait_idle()
    running = Stream(server, prime=PRIME, length=LONG, seed=5)
    try:
        assert running.event() is not None
        if what == "huge body":  # announced: refused before the body is read, and the connection closed
            with socket.create_connection((server.host, server.port), timeout=10) as s:
                s.sendall(f"POST /generate HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n".encode())
                s.sendall(b'{"prime": "' + b"a" * 10_000)
                answer = b""  # the answer comes before the body: headers, then its JSON
                with contextlib.suppress(OSError):
                    while b'"field"' not in answer and (part := s.recv(65536)):
                        answer += part
                with contextlib.suppress(OSError):  # the rest finds the connection closed
                    for _ in range(50):
                        s.sendall(b"a" * 100_000)
                answer_text = answer.decode(errors="replace")
            assert answer_text.startswith("HTTP/1.1 413") and '"field":"body"' in answer_text
        elif what == "malformed JSON":
            status, _, body = server.request("POST", "/generate", raw=b'{"length": 5,')
            assert status == 400 and body["field"] == "body"
        elif what == "wrong method":
            status, _, body = server.request("PUT", "/generate", {"length": 5})
            assert status == 405 and "error" in body
        elif what == "wrong path":
            status, _, body = server.request("POST", "/nothing/here", {"length": 5})
            assert status == 404 and "error" in body
        else:
            status, _, body = server.request("POST", "/generate", raw=b"\xff\xfe not json at all",
                                             headers={"Content-Type": "text/plain"})
            assert status in (400, 422) and "error" in body
        _normal(server, lm)
        assert running.event() is not None  # the stream beside them still flows
    finally:
        running.close()


def test_many_clients_at_once_each_get_their_text_from_one_batch(server, lm):  # noqa: F811
    """Clients that share the batch (several rows in it at once) each get the text they get alone."""
    server.wait_idle()
    n, results, peak = 6, {}, [0]  # (--max-per-client: this one address may have 8 in flight)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.health()["batch_rows"])
            time.sleep(0.01)

    def client(i: int) -> None:
        try:
            s = Stream(server, prime=PRIME, length=3000 + 100 * i, seed=300 + i, num_samples=1 + i % 2)
            rows: dict[int, list[str]] = {}
            for name, data in s.events():
                if name == "message":
                    rows.setdefault(data["sample"], []).append(data["text"])
            s.close()
            results[i] = ["".join(rows[r]) for r in sorted(rows)]
        except Exception as exc:
            results[i] = exc

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join()
    assert peak[0] >= 4, peak  # generated together, not one request after another
    for i in range(n):
        want = served_alone(lm, prime=PRIME, length=3000 + 100 * i, seed=300 + i, num_samples=1 + i % 2)
        assert results[i] == (want if isinstance(want, list) else [want]), i
    assert json.loads(json.dumps(server.health()))["status"] == "ok"
