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


def test_the_readme_s_commands_are_the_ones_ci_and_a_newcomer_run():
    ci_test = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"\n{ci_test}\n" in README  # CI runs the README's test command, verbatim
    [run] = [line for line in README.splitlines() if line.startswith("python -m venv")]
    assert "pip install torch==2.13.0" in run and "charlm train --time 4m" in run and "charlm sample" in run
