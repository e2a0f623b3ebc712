"""mailhop.smtp must stay sans-IO: no module of it (or mailhop module it imports) may import I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import mailhop
import mailhop.smtp

FORBIDDEN = {"asyncio", "socket", "ssl", "select", "selectors", "threading", "dns", "subprocess"}
SMTP_DIR = Path(mailhop.smtp.__file__).parent
MAILHOP_DIR = Path(mailhop.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) for every import statement; level > 0 for relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and not node.module:
                found.extend((node.level, alias.name) for alias in node.names)
            else:
                found.append((node.level, node.module or ""))
    return found


def _module_files() -> list[Path]:
    return sorted(SMTP_DIR.glob("*.py"))


def test_smtp_package_has_modules() -> None:
    names = {p.name for p in _module_files()}
    assert {"__init__.py", "server.py", "commands.py", "data.py", "state.py", "limits.py"} <= names


def test_no_io_imports_in_smtp_or_its_mailhop_dependencies() -> None:
    offenders: list[str] = []
    seen: set[Path] = set()
    todo = list(_module_files())
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for level, module in _imports(path):
            if level == 0:
                if module.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.name}: import {module}")
                if module.startswith("mailhop."):
                    todo.append(MAILHOP_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py"))
                continue
            # Follow relative imports inside mailhop so a helper module cannot smuggle I/O in.
            base = path.parent
            for _ in range(level - 1):
                base = base.parent
            target = base.joinpath(*module.split(".")) if module else base
            if target.with_suffix(".py").exists():
                todo.append(target.with_suffix(".py"))
            elif (target / "__init__.py").exists():
                todo.append(target / "__init__.py")
    assert SMTP_DIR / "server.py" in seen
    assert MAILHOP_DIR / "address.py" in seen
    assert not offenders, offenders


def test_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom socket import socket\nimport dns.resolver\n", encoding="utf-8")
    names = {module.split(".")[0] for _, module in _imports(bad)}
    assert names & FORBIDDEN == {"asyncio", "socket", "dns"}
