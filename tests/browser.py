"""Headless Chromium for the page tests: where it is, the flags this machine needs, and just
enough of the W3C WebDriver protocol (over chromedriver's HTTP port, standard library only:
no selenium, no websockets) to load a page, type, click, hover and read the DOM."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMEDRIVER = shutil.which("chromedriver")
# No GPU, no sandbox (tests run as root), and none of Chromium's own network traffic: this
# machine's closed network would refuse it, many connections at a time.
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the WebDriver element reference key

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
needs_webdriver = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver)")


class WebDriver:
    """One headless Chromium session driven through chromedriver."""

    def __init__(self, profile: Path, width: int = 1200, height: int = 800) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        assert CHROMEDRIVER is not None and CHROMIUM is not None
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        args = [*HEADLESS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.session = "/session/" + self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def do(self, method: str, path: str, body: Any = None) -> Any:
        """A call within this browser session."""
        return self.call(method, self.session + path, body)

    def open(self, url: str) -> None:
        self.do("POST", "/url", {"url": url})

    def element(self, css: str) -> dict[str, str]:
        return self.do("POST", "/element", {"using": "css selector", "value": css})

    def find(self, css: str) -> str:
        return self.element(css)[ELEMENT]

    def script(self, js: str) -> Any:
        return self.do("POST", "/execute/sync", {"script": js, "args": []})

    def hover(self, element: dict[str, str]) -> None:
        move = {"type": "pointerMove", "duration": 0, "origin": element, "x": 0, "y": 0}
        self.do("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse",
                                                  "parameters": {"pointerType": "mouse"}, "actions": [move]}]})

    def click(self, element: dict[str, str]) -> None:
        self.do("POST", f"/element/{element[ELEMENT]}/click")

    def type(self, css: str, text: str) -> None:
        el = self.find(css)
        self.do("POST", f"/element/{el}/clear")
        self.do("POST", f"/element/{el}/value", {"text": text})

    def screenshot(self) -> bytes:
        import base64

        return base64.b64decode(self.do("GET", "/screenshot"))

    def quit(self) -> None:
        try:
            self.call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
