"""The package tree is the layering (docs/architecture.md): a package imports only from the
packages below it. Read from the source with ``ast``, every import counts, the ones inside
functions (loaded lazily) too, so an arrow that runs back up fails here even if no test runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pmlmd"

# What each layer may import from pmlmd; "" is the package's face (pmlmd/__init__.py: __version__).
MAY_IMPORT = {
    "core": {"", "core"},
    "node": {"", "core", "node"},
    "broker": {"", "core", "broker"},
    "engine": {"", "core", "node", "broker", "engine"},
    "daemon": {"", "core", "node", "broker", "engine", "daemon"},
    "client": {"", "core", "node", "broker", "engine", "client"},
    "agent": {""},  # workers import it: ZeroMQ and the standard library only
    "__main__": {"daemon"},
    "__init__": set(),
}
# The one arrow that runs up, lazily: checking a submit's AMQP URL needs pika's own parser, which
# lives with the intake; it is loaded only for a queue batch.
EXCEPTIONS = {("core/protocol.py", "broker")}


def layer_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_layers(source: str, relative: Path) -> set[str]:
    """The layers of pmlmd that the module at ``relative`` (to pmlmd/) with ``source`` imports from."""
    here = relative.parent.parts  # () at the top
    found = set()
    for node in ast.walk(ast.parse(source, str(relative))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".") if node.module else []
                if not parts or parts[0] != "pmlmd":
                    continue
                target = parts[1:]
            else:
                base = list(here[:len(here) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
            if not target:  # from pmlmd import x, or from .. import x: x names modules or packages
                found |= {alias.name if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()
                          else "" for alias in node.names}
            else:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pmlmd":
                    found.add(parts[1] if len(parts) > 1 else "")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert MODULES
    for path in MODULES:
        assert layer_of(path.relative_to(PACKAGE)) in MAY_IMPORT, f"{path}: which layer is it? see docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers(path):
    relative = path.relative_to(PACKAGE)
    layer = layer_of(relative)
    wrong = {target for target in imported_layers(path.read_text(), relative) - MAY_IMPORT[layer]
             if (str(relative), target) not in EXCEPTIONS}
    assert not wrong, f"pmlmd/{relative} ({layer}) imports from {sorted(wrong)}"


def test_the_check_sees_an_arrow_that_runs_up():
    """The reading of imports itself: lazy and relative imports are found, and named."""
    source = ("import pmlmd.engine\n"
              "def f():\n    from ..daemon.store import Store\n    from . import cgroup\n"
              "    from .. import __version__, client\n")
    assert imported_layers(source, Path("node/probe.py")) == {"engine", "daemon", "node", "", "client"}
