"""The package's layout holds: groups by concern whose imports run one way (docs/architecture.md).

Every import of every module is read with `ast` (function-level and TYPE_CHECKING imports
too: a cycle in the types is still a cycle). A module may import its own group and the groups
of lower levels; groups of one level are peers and import neither each other. The settings
package loads none of PyTorch, FastAPI or Typer, so the CLI can build its flags from it
without them; the subpackages' `__init__` files import nothing, so importing one module of a
group never loads the rest of it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "charlm"
# Lowest first. "charlm" is the package's own `__init__` (the lazy public API and __version__).
LEVELS: list[set[str]] = [
    {"charlm", "errors"},  # the leaves: the error family first, then what only needs it
    {"fs", "device"},
    {"config"},
    {"data"},
    {"storage"},
    {"model"},
    {"generation"},
    {"api", "training"},
    {"analysis", "serving"},
    {"cli"},
    {"__main__"},  # python -m charlm
]
LEVEL = {group: i for i, groups in enumerate(LEVELS) for group in groups}
HEAVY = {"torch", "fastapi", "starlette", "typer", "uvicorn", "onnx", "onnxscript"}
MAX_TOP = 16  # modules and folders at the top of the package
MAX_LINES = 400


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of everything `path` (module `name`) imports: charlm's modules by their
    dotted name (`from charlm.x import y` is charlm.x.y when that is a module), others by
    their top-level package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def group(module: str) -> str:
    """charlm.training.session -> training; charlm -> charlm."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(package: Path) -> list[str]:
    """Every import that runs up, sideways between peers, or pulls a heavy library into the
    settings; every subpackage `__init__` that imports."""
    mods = modules(package)
    found = []
    for name, path in mods.items():
        mine = group(name)
        for line, target in imports(path, name, set(mods)):
            where = f"{path.relative_to(package.parent)}:{line} imports {target}"
            top = target.split(".")[0]
            if top != "charlm":
                if mine == "config" and top in HEAVY:
                    found.append(f"{where}: the settings must not load {top}")
                continue
            theirs = group(target)
            if theirs == mine:
                continue
            if LEVEL[theirs] > LEVEL[mine]:
                found.append(f"{where}: {mine} is below {theirs}")
            elif LEVEL[theirs] == LEVEL[mine]:
                found.append(f"{where}: {mine} and {theirs} are peers")
        if path.name == "__init__.py" and name.count(".") == 1 and mine != "cli" and imports(path, name, set(mods)):
            found.append(f"{path.relative_to(package.parent)}: a group's __init__ imports nothing")
    return found


def test_every_import_runs_down_the_layers():
    assert violations(PACKAGE) == []


def test_every_module_belongs_to_a_layer():
    assert {group(name) for name in modules(PACKAGE)} <= set(LEVEL)


def test_an_import_up_the_layers_is_found(tmp_path):
    """The check can fail: a data module that imports the trainer, a setting that loads
    PyTorch, a peer import and an importing `__init__` are each reported."""
    copy = tmp_path / "charlm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for file, line in [("data/vocab.py", "from charlm.training.trainer import Trainer"),
                       ("config/run.py", "import torch"),
                       ("serving/app.py", "from charlm.analysis import novelty"),
                       ("model/__init__.py", "from charlm.model.network import CharRNN")]:
        with open(copy / file, "a", encoding="utf-8") as fh:
            fh.write(f"\n\ndef _late():\n    {line}\n")
    found = violations(copy)
    assert len(found) == 4, found
    assert any("data/vocab.py" in f and "data is below training" in f for f in found)
    assert any("config/run.py" in f and "must not load torch" in f for f in found)
    assert any("serving/app.py" in f and "serving and analysis are peers" in f for f in found)
    assert any("model/__init__.py" in f for f in found)


def test_the_package_is_grouped_and_its_modules_short():
    top = [p for p in PACKAGE.iterdir() if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())]
    assert len(top) <= MAX_TOP, sorted(p.name for p in top)
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
