"""The dependency direction of shared/DESIGN.md holds in every import, lazy ones included.

distill <- privacy <- client; attacks -> distill, privacy; server -> distill (+ the task schema
in client/task.py, which both ends of the protocol read); no Flower in distill, privacy, attacks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "distill": {"flwr", "opacus", "privacy", "client", "server", "attacks", "simulations"},
    "privacy": {"flwr", "client", "server", "attacks", "simulations"},
    "attacks": {"flwr", "client", "server", "simulations"},
    "client": {"server", "attacks", "simulations"},
    "server": {"attacks", "simulations", "privacy", "opacus"},
}
ALLOWED = {"server": {"client.task"}}  # the task's wire schema and dataset cache: Flower-free


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_dependency_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] and module not in ALLOWED.get(package, set()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from client.task import class_budget\n    import flwr.app\n")
    assert imports_of(src) == [(2, "client.task"), (3, "flwr.app")]
