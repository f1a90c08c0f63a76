"""The documentation cannot drift: every command's option is in its section of
docs/commands.md, the README's set-up commands are the ones CI and a newcomer run, every
relative link in README.md and docs/*.md resolves, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from conftest import ROOT

from charlm.cli import app

README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")


def _section(command: str) -> str:
    m = re.search(rf"^### `charlm {command}[^\n]*\n(.*?)(?=^### |^## |\Z)", COMMANDS, re.S | re.M)
    assert m, f"docs/commands.md has no section for charlm {command}"
    return m.group(1)


def test_every_command_and_option_is_in_the_command_reference():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        section = _section(name)
        for param in command.params:
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt.startswith("--") and opt not in ("--help",):
                    assert f"`{opt}" in section or f"{opt}`" in section or f" {opt}" in section, (
                        f"docs/commands.md section for `charlm {name}` does not document {opt}")


def test_the_readme_s_commands_are_the_ones_ci_and_a_newcomer_run():
    ci_test = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"\n{ci_test}\n" in README  # CI runs the README's test command, verbatim
    [run] = [line for line in README.splitlines() if line.startswith("python -m venv")]
    assert "pip install torch==2.13.0" in run and "charlm train --time 4m" in run and "charlm sample" in run


def test_the_readme_is_short():
    assert len(README.splitlines()) < 400


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation removed, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    count: dict[str, int] = {}
    anchors: set[str] = set()
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        m = None if fence else re.match(r"^#{1,6} +(.*?)\s*#*\s*$", line)
        if m:
            anchor = _anchor(m.group(1))
            anchors.add(f"{anchor}-{count[anchor]}" if anchor in count else anchor)
            count[anchor] = count.get(anchor, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            checked += 1
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
                broken.append(f"{where} (no such heading)")
    assert checked > 50, checked  # the README and the docs do link to each other
    assert not broken, "\n".join(broken)
