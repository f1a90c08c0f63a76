"""`charlm chat`: the session's command parsing on its own, the loop through a pipe (exact
stdout against `charlm sample`), and a real pseudo-terminal (prompt, streamed text, Ctrl-C
during a long generation, Ctrl-D).

One tiny checkpoint is trained once for the module.
"""

from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import charlm_cmd, subprocess_env
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.cli.chat import ChatSession, run
from charlm.config.sampling import SampleOptions

PRIMES = ["The state of ", "Our economy is", ""]


def sample_cli(ckpt: Path, *args: str) -> str:
    """stdout of `charlm sample --no-echo ARGS` (the continuation alone, then a newline)."""
    res = CliRunner().invoke(app, ["sample", "-c", str(ckpt), "--no-echo", *args])
    assert res.exit_code == 0, res.output
    return res.stdout


# --- the session without a terminal -----------------------------------------------------------


def test_commands_change_the_options():
    s = ChatSession()
    assert s.options == SampleOptions()
    assert s.handle("/temperature 0.7").text == "/temperature 0.7"
    assert s.handle("/length 300").text == "/length 300"
    assert s.handle("/top-p 0.9").text == "/top-p 0.9"
    assert s.handle("/top-k 5").text == "/top-k 5"
    assert s.handle("/seed 42").text == "/seed 42"
    assert (s.options.temperature, s.options.length, s.options.top_p, s.options.top_k,
            s.options.seed) == (0.7, 300, 0.9, 5, 42)
    assert s.handle("/seed off").text == "/seed off" and s.options.seed is None
    assert s.handle("/length").text == "/length 300"  # no value: show it
    assert s.describe() == "temperature 0.7, length 300, top-k 5, top-p 0.9, seed off, adapt off"
    assert s.handle("/adapt on").text == "/adapt on" and s.adapt and s.options.adapt is False
    assert s.handle("/adapt").text == "/adapt on"
    assert s.handle("/adapt maybe").text == "/adapt: on or off, got 'maybe'" and s.adapt
    assert s.handle("/adapt off").text == "/adapt off" and not s.adapt
    assert s.generation("abc") == {"length": 300, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
                                   "prime": "abc", "seed": None, "stop": "", "unknown": "skip", "num_samples": 1,
                                   "adapt": False}


@pytest.mark.parametrize("line, message", [
    ("/temperature -1", "/temperature: must be a number >= 0, got -1.0"),
    ("/temperature nan", "/temperature: must be a number >= 0, got nan"),
    ("/temperature hot", "/temperature: 'hot' is not a number"),
    ("/length -5", "/length: must be an integer >= 0, got -5"),
    ("/length 2.5", "/length: '2.5' is not an integer"),
    ("/top-p 0", "/top-p: must be a number in (0, 1], got 0.0"),
    ("/top-k -1", "/top-k: must be an integer >= 0, got -1"),
    ("/seed -3", "/seed: must be an integer in [0, 18446744073709551615], got -3"),
    ("/sed 3", "unknown command /sed (/help lists them)"),
])
def test_bad_commands_say_one_line_and_change_nothing(line, message):
    s = ChatSession()
    before = SampleOptions(**vars(s.options))
    reply = s.handle(line)
    assert (reply.action, reply.text) == ("say", message)
    assert s.options == before


def test_lines_that_are_primes_help_and_quit():
    s = ChatSession()
    assert (s.handle("My fellow Americans").action, s.handle("My fellow Americans").text) == (
        "generate", "My fellow Americans")
    assert s.handle("").action == "generate" and s.handle("").text == ""
    assert s.handle("//usr/bin").text == "/usr/bin"  # "//" starts a prime with "/"
    assert s.handle("  leading spaces ").text == "  leading spaces "  # primes are kept as typed
    help_text = s.handle("/help").text
    for command in ("/temperature", "/length", "/top-k", "/top-p", "/seed", "/help", "/quit"):
        assert command in help_text
    assert "/adapt" in help_text
    assert help_text.endswith("now: temperature 1, length 500, top-k 0, top-p 1, seed off, adapt off")
    assert s.handle("/quit").action == "quit" and s.handle("/exit").action == "quit"


def test_starting_options_are_checked():
    with pytest.raises(charlm.CharLMError, match="--top-p"):
        ChatSession(SampleOptions(top_p=1.5))


def test_run_in_process_streams_and_skips_unknown_characters(ckpt, lm):
    stdin = io.StringIO("/temperature 0\n/length 40\nThe state of €\n/quit\nnever read\n")
    out, errs = io.StringIO(), io.StringIO()
    run(lm, ChatSession(), stdin, out, errs, interactive=False)
    assert out.getvalue() == sample_cli(ckpt, "-t", "0", "-n", "40", "--prime", "The state of ")
    assert errs.getvalue().splitlines() == [
        "/temperature 0", "/length 40", "not in the vocabulary, left out: '€'"]


def test_adapt_continues_each_line_with_a_copy_adapted_to_it_and_leaves_the_model_alone(ckpt, lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    line = "My fellow Americans, the state of our Union is strong. " * 3
    stdin = io.StringIO(f"/seed 4\n/length 60\n{line}\n/adapt on\n{line}\nM\n/adapt off\n{line}\n")
    out, errs = io.StringIO(), io.StringIO()
    run(lm, ChatSession(), stdin, out, errs, interactive=False)
    plain, adapted, short, again = out.getvalue().splitlines()
    assert plain == again == lm.sample(prime=line, length=60, seed=4)  # off: the loaded model, unchanged
    assert adapted == lm.sample(prime=line, length=60, seed=4, adapt=True) != plain
    assert short == lm.sample(prime="M", length=60, seed=4)  # nothing to adapt to: the loaded model
    said = errs.getvalue().splitlines()
    assert said[3].startswith(f"adapted a copy of the model to the prime's {len(line):,} characters (")
    assert said[4] == "/adapt: the prime needs at least 2 characters the model knows: continuing with the loaded model"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_chat_adapt_flag_starts_the_session_adapting(ckpt):
    res = chat_pipe(ckpt, "The state of our Union\n", "--adapt", "--seed", "3", "--length", "30")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("adapted a copy of the model to the prime's 22 characters (")
    assert len(res.stdout) == 31


# --- through a pipe -------------------------------------------------------------------------


def chat_pipe(ckpt: Path, text: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*charlm_cmd(), "chat", str(ckpt), *args], input=text, text=True, check=False,
                          capture_output=True, env=subprocess_env(), timeout=120)


def test_pipe_one_greedy_continuation_per_line_equal_to_sample(ckpt):
    lines = ["/temperature 0", "/length 120", "/bogus", "/top-p 2", "/length many", *PRIMES]
    res = chat_pipe(ckpt, "\n".join(lines) + "\n")
    assert res.returncode == 0, res.stderr
    expected = "".join(sample_cli(ckpt, "-t", "0", "-n", "120", "--prime", p) for p in PRIMES)
    assert res.stdout == expected  # no prompt, no banner: only the continuations
    assert res.stderr.splitlines() == [
        "/temperature 0", "/length 120", "unknown command /bogus (/help lists them)",
        "/top-p: must be a number in (0, 1], got 2.0", "/length: 'many' is not an integer"]


def test_pipe_seed_and_starting_options_give_samples_text(ckpt):
    # Same seed, same prime: the same text each time, and the text `charlm sample` gives.
    res = chat_pipe(ckpt, "The state of \nThe state of \n/seed off\n", "--seed", "5",
                    "--temperature", "0.8", "--length", "80", "--top-k", "10")
    assert res.returncode == 0, res.stderr
    one = sample_cli(ckpt, "--seed", "5", "-t", "0.8", "-n", "80", "--top-k", "10",
                     "--prime", "The state of ")
    assert len(one) == 81 and res.stdout == one + one
    assert res.stderr == "/seed off\n"


def test_pipe_without_trailing_newline_and_missing_checkpoint(ckpt, tmp_path):
    res = chat_pipe(ckpt, "/temperature 0\n/length 30\nOur economy is")
    assert res.returncode == 0, res.stderr
    assert res.stdout == sample_cli(ckpt, "-t", "0", "-n", "30", "--prime", "Our economy is")
    res = chat_pipe(tmp_path / "none.pt", "hello\n")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"charlm: error: {tmp_path / 'none.pt'}: no such checkpoint\n"


# --- through a pseudo-terminal ----------------------------------------------------------------


class Terminal:
    """`charlm chat` on a pseudo-terminal: type into it, read what the screen gets."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes charlm, with the terminal as stdin/out/err
            try:
                # As in a terminal's foreground job: a test run started in the background
                # (`cmd &` in a script) ignores SIGINT, and exec would pass that on.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = ""
        self.running = True

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        """Read until `pattern` (a regex) matches what arrived since the last match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen, re.DOTALL)
            if m:
                before, self.seen = self.seen[:m.end()], self.seen[m.end():]
                return before
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"never saw {pattern!r}; the screen got: {self.seen[-2000:]!r}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], min(timeout, 1.0))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child is gone (EIO)
            return False
        self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.running = False
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"charlm chat did not exit; the screen got: {self.seen[-2000:]!r}")

    def kill(self) -> None:
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.running = False
        os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_terminal_prompt_stream_ctrl_c_and_ctrl_d(ckpt, lm):
    term = Terminal([*charlm_cmd(), "chat", str(ckpt), "--temperature", "0", "--length", "60"],
                    subprocess_env(TERM="dumb"))
    try:
        banner = term.expect(r"\n> $")
        assert f"charlm chat: {ckpt} (lstm 1x32, {len(lm.vocab)} characters)" in banner
        # A prime: the terminal shows it again with the streamed greedy continuation.
        term.send("The state of \n")
        shown = term.expect(r"\n> $")
        greedy = lm.sample(length=60, temperature=0, prime="The state of ")
        assert f"The state of \nThe state of {greedy}\n" in shown
        # Ctrl-C during a long generation stops it; the session goes on with its options.
        term.send("/length 100000\n")
        term.expect(r"/length 100000\n> $")
        term.send("Our economy\n")
        streamed = term.expect(r"Our economy\nOur economy.{300}")  # text is arriving
        assert len(streamed) > 300
        term.send("\x03")
        term.expect(r"\(stopped\)\n> $")
        term.send("/length\n")
        term.expect(r"/length\n/length 100000\n> $")
        term.send("/temperature\n")
        term.expect(r"/temperature 0\n> $")
        term.send("\x04")  # Ctrl-D: end of input, the session ends normally
        assert term.wait() == 0
    finally:
        term.kill()
