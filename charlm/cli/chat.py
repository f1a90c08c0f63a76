"""`charlm chat`: an interactive session with a loaded model (a CLI-layer module: it prints).

Each line typed is a prime and its continuation streams back; lines that start with `/`
change the sampling options (`/temperature 0.7`, `/length 300`, ...). `ChatSession` holds
the options and turns one input line into a `Reply` without touching a terminal; `run`
is the loop around it that reads, prints and handles Ctrl-C / Ctrl-D.

Streams: stdout gets the prompt (on a terminal) and generated text only; the banner,
messages and warnings go to stderr. When stdin is a pipe there is no prompt and no
banner, and stdout holds one continuation (plus a newline) per input line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from charlm.config.sampling import SampleOptions
from charlm.errors import CharLMError

PROMPT = "> "

def _number(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    return parse


def _seed(text: str) -> int | None:
    return None if text.lower() in ("off", "none", "random") else _number(int)(text)


# /command -> (SampleOptions field, parser of the value text); the rules on the values
# are SampleOptions.check's.
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", _number(float)),
    "length": ("length", _number(int)),
    "top-k": ("top_k", _number(int)),
    "top-p": ("top_p", _number(float)),
    "seed": ("seed", _seed),
}

HELP = """\
Type a prime and press Enter: the model continues it (an empty line: no prime).
  /temperature T   0 = greedy, 1 = as trained, higher = wilder
  /length N        characters to generate per line
  /top-k K         sample among the K most likely characters (0 = off)
  /top-p P         sample from the smallest set with probability >= P (1 = off)
  /seed N | off    same seed, same prime: same text (off: random each time)
  /adapt on | off  first adapt a copy of the model to each prime, then continue it with
                   that copy (the loaded model is never changed)
  /help            this list and the current values
  /quit            end the session (or Ctrl-D)
A command without a value shows it. Ctrl-C stops a generation. Start a prime with
"//" to begin it with a literal "/"."""


@dataclass
class Reply:
    """What to do with one input line: generate from `text` (a prime), say `text`
    (a message for stderr), or quit."""

    action: str  # "generate" | "say" | "quit"
    text: str = ""


class ChatSession:
    """The session's sampling options and the meaning of each input line."""

    def __init__(self, options: SampleOptions | None = None, adapt: bool = False) -> None:
        self.options = (options or SampleOptions()).check()
        # Kept beside the options: they hold no prime, which --adapt needs (the lines give it).
        self.adapt = adapt

    def handle(self, line: str) -> Reply:
        """Interpret one input line (without its newline)."""
        if line.startswith("//"):
            return Reply("generate", line[1:])
        if not line.startswith("/"):
            return Reply("generate", line)
        name, _, value = line[1:].strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name in ("quit", "exit", "q"):
            return Reply("quit")
        if name in ("help", "h", "?"):
            return Reply("say", f"{HELP}\nnow: {self.describe()}")
        if name == "adapt":
            if value.lower() not in ("", "on", "off"):
                return Reply("say", f"/adapt: on or off, got {value!r}")
            self.adapt = value.lower() == "on" if value else self.adapt
            return Reply("say", f"/adapt {self._adapt_shown()}")
        if name not in _OPTIONS:
            return Reply("say", f"unknown command /{name} (/help lists them)")
        field, parse = _OPTIONS[name]
        if not value:
            return Reply("say", f"/{name} {self._show(field)}")
        try:
            new = dataclasses.replace(self.options, **{field: parse(value)}).check()
        except ValueError as exc:
            return Reply("say", f"/{name}: {exc}")
        except CharLMError as exc:  # SampleOptions.check names the flag: --top-p: must be ...
            msg = str(exc)
            return Reply("say", "/" + msg[2:] if msg.startswith("--") else msg)
        self.options = new
        return Reply("say", f"/{name} {self._show(field)}")

    def describe(self) -> str:
        shown = [f"{name} {self._show(field)}" for name, (field, _) in _OPTIONS.items()]
        return ", ".join([*shown, f"adapt {self._adapt_shown()}"])

    def _adapt_shown(self) -> str:
        return "on" if self.adapt else "off"

    def _show(self, field: str) -> str:
        value = getattr(self.options, field)
        return "off" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    def generation(self, prime: str) -> dict[str, Any]:
        """Keyword arguments for `CharLM.stream` for this prime (unknown characters dropped)."""
        return dict(dataclasses.asdict(self.options), prime=prime, unknown="skip")


def run(lm: Any, session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None, interactive: bool | None = None) -> None:
    """The session loop: read lines until /quit or end of input (Ctrl-D)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if interactive is None:
        interactive = stdin.isatty()

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (line editing and up-arrow history for input())
        cfg = lm.model.cfg
        say(f"charlm chat: {lm.path} ({cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, "
            f"{len(lm.vocab)} characters); {session.describe()}")
        say("Type a prime and press Enter; /help lists commands; Ctrl-C stops a generation; "
            "Ctrl-D quits.")
    for line in _lines(stdin, stdout, stderr, interactive):
        reply = session.handle(line)
        if reply.action == "quit":
            return
        if reply.action == "say":
            say(reply.text)
            continue
        prime = reply.text
        missing = lm.vocab.unknown(prime)
        if missing:
            say("not in the vocabulary, left out: " + " ".join(repr(c) for c in missing))
        if interactive:
            stdout.write(lm.vocab.decode(lm.vocab.encode(prime, unknown="skip")))
            stdout.flush()
        model = lm
        if session.adapt:
            try:
                model = lm.adapted(prime, unknown="skip")
                say(model.adaptation_summary())
            except CharLMError as exc:  # fewer than 2 known characters to adapt to
                say(f"{str(exc).replace('--adapt', '/adapt', 1)}: continuing with the loaded model")
        chars = model.stream(**session.generation(prime))
        try:
            for ch in chars:
                stdout.write(ch)
                stdout.flush()
        except KeyboardInterrupt:
            if not interactive:  # a script's whole pipeline got the signal: stop it
                raise
            chars.close()
            stdout.write("\n")
            stdout.flush()
            say("(stopped)")
            continue
        stdout.write("\n")
        stdout.flush()


def _lines(stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> Iterator[str]:
    """Input lines without their newline; on a terminal with a prompt, and Ctrl-C at the
    prompt only starts a new one."""
    if not interactive:
        for line in stdin:
            yield line.rstrip("\r\n") if line.endswith("\n") else line
        return
    # input() shows its prompt on stdout and edits with readline only when both streams
    # are the terminal; with stdout redirected the prompt goes to stderr instead.
    use_input = stdin is sys.stdin and stdout is sys.stdout and stdout.isatty()
    while True:
        try:
            if use_input:
                yield input(PROMPT)
                continue
            stderr.write(PROMPT)
            stderr.flush()
            line = stdin.readline()
            if not line:
                raise EOFError
            yield line.rstrip("\r\n")
        except KeyboardInterrupt:
            (stdout if use_input else stderr).write("\n")
        except EOFError:
            (stdout if use_input else stderr).write("\n")
            return
