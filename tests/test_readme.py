"""The README's command reference cannot drift from the CLI: every option is documented."""

from __future__ import annotations

import re

import typer
from conftest import ROOT

from charlm.cli import app

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(command: str) -> str:
    m = re.search(rf"^### `charlm {command}[^\n]*\n(.*?)(?=^### |^## )", README, re.S | re.M)
    assert m, f"README has no section for charlm {command}"
    return m.group(1)


def test_every_command_and_option_is_in_the_readme():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        section = _section(name)
        for param in command.params:
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt.startswith("--") and opt not in ("--help",):
                    assert f"`{opt}" in section or f"{opt}`" in section or f" {opt}" in section, (
                        f"README section for `charlm {name}` does not document {opt}")


def test_readme_shows_both_setup_commands():
    assert "charlm train" in README and "charlm sample" in README
    assert "python -m pytest" in README
