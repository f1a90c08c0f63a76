"""Declared options: a dataclass field carries its default, its `--help` text and its rule.

Configs (`charlm.config.run`) and sampling options (`charlm.config.sampling`) declare every setting once
with `opt(...)`; from the field the CLI derives its flag, `validate` derives the check, and a
test checks the README against the same fields. Every problem is collected and reported in
one line that names each flag (`--lr: must be ...; --seq-len: must be ...`).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import Field, field, fields
from typing import Any, TypeVar

from charlm.errors import CharLMError

T = TypeVar("T")


def opt(default: T, help: str, *, choices: tuple[str, ...] | None = None, at_least: float | None = None,
        below: float | None = None, above: float | None = None, at_most: float | None = None,
        check: Callable[[Any], None] | None = None, short: str | None = None) -> T:
    """A dataclass field with its help text and its rule: `choices` for strings; for numbers
    a range given by `at_least` / `above` (lower bound) and `at_most` / `below` (upper);
    `check` raises `CharLMError` for anything else. `short` is a one-letter flag alias."""
    meta = {"help": help, "choices": choices, "at_least": at_least, "above": above,
            "at_most": at_most, "below": below, "check": check, "short": short}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line spelling of a field name: `seq_len` -> `--seq-len`."""
    return "--" + name.replace("_", "-")


def base_type(annotation: Any) -> type:
    """`int` for `int` and for `int | None` (the type a value must have when it is set)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def declared(cls: type) -> Iterator[tuple[Field[Any], type]]:
    """Each field of a dataclass declared with `opt`, with the type its values have."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" in f.metadata:
            yield f, base_type(hints[f.name])


def coerce(cls: type, name: str, value: Any) -> Any:
    """TOML writes 3 for 3.0: an integer is accepted where a float is expected."""
    kind = dict((f.name, t) for f, t in declared(cls)).get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def problems(obj: Any) -> list[str]:
    """What is wrong with each option of the dataclass instance `obj`, naming its flag."""
    found = []
    for f, kind in declared(type(obj)):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue  # optional and unset
        message = _problem(value, kind, f.metadata)
        if message:
            found.append(f"{flag(f.name)}: {message}")
    return found


def validate(*objs: Any) -> None:
    """Raise one `CharLMError` listing every problem of every option in `objs`."""
    found = [p for obj in objs for p in problems(obj)]
    if found:
        raise CharLMError("; ".join(found))


def _problem(value: Any, kind: type, meta: Any) -> str | None:
    if kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind is str:
        if not isinstance(value, str):
            return f"must be text, got {value!r}"
        if meta["choices"] and value not in meta["choices"]:
            return f"{value!r} is not one of {', '.join(meta['choices'])}"
    elif kind in (int, float):
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not _in_range(value, meta):
            return f"must be {_describe(kind, meta)}, got {value!r}"
    if meta["check"] is not None:
        try:
            meta["check"](value)
        except CharLMError as exc:
            return str(exc)
    return None


def _in_range(value: float, meta: Any) -> bool:
    return ((meta["at_least"] is None or value >= meta["at_least"])
            and (meta["above"] is None or value > meta["above"])
            and (meta["at_most"] is None or value <= meta["at_most"])
            and (meta["below"] is None or value < meta["below"]))


def _describe(kind: type, meta: Any) -> str:
    """`an integer >= 1`, `a number in (0, 1]`, `a number > 0`, ..."""
    noun = "an integer" if kind is int else "a number"
    lo = ("[", meta["at_least"]) if meta["at_least"] is not None else ("(", meta["above"])
    hi = ("]", meta["at_most"]) if meta["at_most"] is not None else (")", meta["below"])
    if lo[1] is not None and hi[1] is not None:
        return f"{noun} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo[1] is not None:
        return f"{noun} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi[1] is not None:
        return f"{noun} {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return noun


def _num(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"
