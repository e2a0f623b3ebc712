"""The layering rules of docs/architecture.md, checked on the source: server never imports delivery, delivery
never imports server, only queue (and the composition root) opens the spool's database."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "mailhop"


def imports_of(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (SRC / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against mailhop.<package>
                    parts = ["mailhop", *path.relative_to(SRC).parts[:-1]]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names.add(base)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        out[str(path.relative_to(SRC))] = names
    return out


@pytest.mark.parametrize(("package", "forbidden"), [("server", "mailhop.delivery"), ("delivery", "mailhop.server")])
def test_layers(package: str, forbidden: str) -> None:
    bad = {f: sorted(n for n in names if n.startswith(forbidden)) for f, names in imports_of(package).items()}
    assert not {f: n for f, n in bad.items() if n}, f"{package} must not import {forbidden}"


def test_only_queue_and_auth_open_databases() -> None:
    """Mail goes to storage through the queue only; the user store is the one other database."""
    openers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "sqlite3.connect(" in p.read_text())
    assert all(f.startswith(("queue/", "auth/")) for f in openers), openers
