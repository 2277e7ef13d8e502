"""The layers hold: the pure core imports nothing that does I/O, and arrows point down only.

`lint-imports` (import-linter, run by `make lint` in CI) enforces cli -> app -> adapters ->
config -> core between our own packages. It cannot see the standard library, so this file
reads the core's source and allows only modules without side effects. An import under
`if TYPE_CHECKING:` is for the type checker only and never runs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "repmgr_vip"
CORE = sorted(p.name for p in (SRC / "core").glob("*.py"))
LAYERS = ("core", "config", "adapters", "app", "cli")
ALLOWED_STDLIB = {"__future__", "collections", "collections.abc", "contextlib", "dataclasses",
                  "enum", "functools", "typing", "abc", "math", "ipaddress", "urllib.parse",
                  "_json"}  # json's C half (core/jsonline.py): a codec, no I/O


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
            module = node.module or ""
            if module == "repmgr_vip" or (module.startswith("repmgr_vip.") and \
                    module.count(".") == 1):
                names.extend(f"{module}.{alias.name}" for alias in node.names)
            else:
                names.append(module)
    return names


def impure_imports(source: str) -> list[str]:
    bad = []
    for name in _runtime_imports(ast.parse(source)):
        if name.startswith("repmgr_vip."):
            if not name.startswith("repmgr_vip.core."):
                bad.append(name)
        elif name not in ALLOWED_STDLIB:
            bad.append(name)
    return bad


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_io(module: str) -> None:
    source = (SRC / "core" / module).read_text(encoding="utf-8")
    assert impure_imports(source) == []


def test_the_check_sees_io_imports() -> None:
    source = ("import socket\nfrom repmgr_vip.adapters.cluster import NodeView\n"
              "from repmgr_vip.adapters import network\nimport subprocess as sp\n"
              "from repmgr_vip.core import decide\n"
              "def f():\n    import psycopg\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from repmgr_vip.adapters.cluster import Anything\n")
    assert impure_imports(source) == ["socket", "repmgr_vip.adapters.cluster",
                                      "repmgr_vip.adapters.network", "subprocess", "psycopg"]


def test_every_module_lives_in_a_layer() -> None:
    """A module dropped next to the layers would escape the contract."""
    loose = {p.name for p in SRC.glob("*.py")} - {"__init__.py", "__main__.py", "testing.py"}
    assert loose == set()
    assert {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(LAYERS)


def _lint_imports() -> Path:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) \
        or shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports is missing: `make setup` installs import-linter")
    return Path(found)


def test_import_linter_contract_holds_and_catches_an_upward_import(tmp_path: Path) -> None:
    """The contract passes on the tree, and fails on a copy with one arrow pointing up."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    shutil.copytree(SRC, tmp_path / "src" / "repmgr_vip",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = subprocess.run([_lint_imports(), "--no-cache"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert clean.returncode == 0, clean.stdout[-2000:]
    decide = tmp_path / "src" / "repmgr_vip" / "core" / "decide.py"
    decide.write_text(decide.read_text(encoding="utf-8")
                      + "\nfrom repmgr_vip.app import hooks  # noqa\n", encoding="utf-8")
    broken = subprocess.run([_lint_imports(), "--no-cache"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert broken.returncode != 0
