"""Units that track properties of the text: the unit finder of `charlm inspect`.

For simple properties a reader of the text knows at every character (inside quotes, inside
brackets, position in the line, start of a word, after a newline or a sentence end, inside
a number, indentation depth), every unit's activation over a passage is correlated with the
property, and the units that track it best are named with the strength of the relation
(|Pearson r|; point-biserial r for the 0/1 properties).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_STRENGTH = 0.2  # |r| below this is not reported as a unit that tracks a property
TOP_UNITS = 5  # units listed per property

# Text properties the unit finder looks for: name -> what it means (shown on the page).
PROPERTIES = {
    "in_quotes": "inside double quotes",
    "in_brackets": "inside ( ), [ ] or { }",
    "line_position": "position in the line (characters since the newline)",
    "word_start": "first character of a word",
    "after_newline": "just after a newline (only spaces read since)",
    "after_sentence_end": "just after . ! or ? (only spaces, newlines, closing quotes or brackets since)",
    "in_number": "inside a number (digits, with . or , between digits)",
    "indent_depth": "indentation of the line (leading spaces; a tab counts 4)",
}
CONTINUOUS = {"line_position", "indent_depth"}  # the others are 0/1


@dataclass
class UnitMatch:
    """A unit whose activation tracks a text property: Pearson r over the passage."""

    layer: int
    kind: str  # h, c or a gate letter
    unit: int
    r: float  # signed Pearson correlation (point-biserial for 0/1 properties)


def text_properties(text: str) -> dict[str, np.ndarray]:
    """Per character of `text`, each of `PROPERTIES`, as known right after reading it.

    Values describe the state a reader is in once it has read character p (what the
    model's state after reading p could encode): an opening quote is inside its quotes, a
    closing one is not; a newline's line position is 0.
    """
    n = len(text)
    props = {name: np.zeros(n, dtype=np.float32) for name in PROPERTIES}
    in_quote = False
    depth = 0
    column = 0
    indent = 0
    leading = True  # still in the line's leading whitespace
    after_nl = after_end = False
    prev = "\n"
    for p, ch in enumerate(text):
        if ch == '"':
            in_quote = not in_quote
        elif ch == "\u201c":
            in_quote = True
        elif ch == "\u201d":
            in_quote = False
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        nxt = text[p + 1] if p + 1 < n else ""
        if ch == "\n":
            column, indent, leading = 0, 0, True
            after_nl = True
        else:
            column += 1
            if leading and ch in " \t":
                indent += 4 if ch == "\t" else 1
            else:
                leading = False
            if not ch.isspace():
                after_nl = False
        if ch in ".!?" and not (prev.isdigit() and nxt.isdigit()):  # not a decimal point
            after_end = True
        elif not (ch.isspace() or ch in "\"')]}\u201d\u2019"):
            after_end = False
        props["in_quotes"][p] = in_quote
        props["in_brackets"][p] = depth > 0
        props["line_position"][p] = column
        props["word_start"][p] = ch.isalnum() and not prev.isalnum()
        props["after_newline"][p] = after_nl
        props["after_sentence_end"][p] = after_end
        props["in_number"][p] = ch.isdigit() or (ch in ".," and prev.isdigit() and nxt.isdigit())
        props["indent_depth"][p] = indent
        prev = ch
    return props


def correlations(acts: np.ndarray, props: np.ndarray) -> np.ndarray:
    """Pearson r of every activation column with every property column: (K, U) for
    acts (M, U) and props (M, K); 0 where either side is constant."""
    a = acts.astype(np.float64)
    p = props.astype(np.float64)
    a = a - a.mean(axis=0)
    p = p - p.mean(axis=0)
    a_norm = np.sqrt((a * a).sum(axis=0))
    p_norm = np.sqrt((p * p).sum(axis=0))
    r = (p.T @ a) / np.maximum(np.outer(p_norm, a_norm), 1e-30)
    r[:, a_norm < 1e-9] = 0.0
    r[p_norm < 1e-9, :] = 0.0
    return r


def find_units(states: dict[tuple[int, str], np.ndarray], props: dict[str, np.ndarray],
               top: int = TOP_UNITS, min_strength: float = MIN_STRENGTH
               ) -> tuple[dict[str, list[UnitMatch]], dict[str, str]]:
    """For each property, the units (any layer, h / c / gate) whose activation best predicts
    it, by |Pearson r| over the characters (point-biserial r for 0/1 properties).

    Returns the matches with |r| >= `min_strength`, strongest first (at most `top`), and per
    property "" when it was searched or the reason it was not (absent from the text).
    """
    keys = list(states)
    acts = np.concatenate([states[k] for k in keys], axis=1)  # (M, U_all)
    owner = [(k, u) for k in keys for u in range(states[k].shape[1])]
    names, columns, status = [], [], {}
    for name, values in props.items():
        if name in CONTINUOUS:
            ok = np.ptp(values) > 0 if len(values) else False
            reason = "" if ok else "constant in this text"
        else:
            on = int(values.sum())
            ok = on >= 5 and len(values) - on >= 5
            reason = "" if ok else f"occurs at {on} characters of {len(values)} (needs 5 both ways)"
        status[name] = reason
        if ok:
            names.append(name)
            columns.append(values)
    found: dict[str, list[UnitMatch]] = {name: [] for name in props}
    if not names:
        return found, status
    r = correlations(acts, np.stack(columns, axis=1))
    for row, name in enumerate(names):
        order = np.argsort(-np.abs(r[row]), kind="stable")[:top]
        for col in order:
            if abs(r[row, col]) < min_strength:
                break
            (layer, kind), unit = owner[col]
            found[name].append(UnitMatch(layer, kind, int(unit), float(r[row, col])))
    return found, status
