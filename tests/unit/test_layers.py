"""The pure core imports nothing that does I/O: read from the source, not by importing it.

decide.py (the rules), ports.py (the interfaces) and model.py (plain facts) may import only
each other and a few standard modules without side effects. An import under
`if TYPE_CHECKING:` is for the type checker only and never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "repmgr_vip"
PURE = ("decide", "ports", "model")
ALLOWED_STDLIB = {"__future__", "collections", "collections.abc", "contextlib", "dataclasses",
                  "enum", "typing", "abc", "math", "ipaddress"}


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Module names imported at run time, anywhere in the file, but not under TYPE_CHECKING."""
    type_only = {id(inner) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for stmt in node.body for inner in ast.walk(stmt)}
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "repmgr_vip":
                names.extend(f"repmgr_vip.{alias.name}" for alias in node.names)
            else:
                names.append(node.module or "")
    return names


def impure_imports(source: str) -> list[str]:
    bad = []
    for name in _runtime_imports(ast.parse(source)):
        if name.startswith("repmgr_vip."):
            if name.removeprefix("repmgr_vip.") not in PURE:
                bad.append(name)
        elif name not in ALLOWED_STDLIB:
            bad.append(name)
    return bad


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    source = (SRC / f"{module}.py").read_text(encoding="utf-8")
    assert impure_imports(source) == []


def test_the_check_sees_io_imports() -> None:
    source = ("import socket\nfrom repmgr_vip.cluster import NodeView\n"
              "from repmgr_vip import network\nimport subprocess as sp\n"
              "def f():\n    import psycopg\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from repmgr_vip.cluster import NodeRecord\n")
    assert impure_imports(source) == ["socket", "repmgr_vip.cluster", "repmgr_vip.network",
                                      "subprocess", "psycopg"]
