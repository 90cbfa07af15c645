"""The docstring examples of the packages run as tests, so an example that rots fails ``make test``.

Modules are found by walking the package directories for ``>>>`` (never ``simulations/``: its
scripts run federations when imported). Each such module is imported and its examples run with
:mod:`doctest`; every ``>>>`` line of the file must be an example that ran, so an example doctest
cannot see (in a string, on an object imported from elsewhere) fails instead of passing unrun.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "privacy", "attacks", "client", "server")
# Modules left out on purpose, each with the reason; empty when every example passes.
EXCLUDED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_with_examples() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts and ">>>" in path.read_text(encoding="utf-8"):
                found.append(_module_name(path))
    return sorted(set(found) - set(EXCLUDED))


MODULES = modules_with_examples()


def run_examples(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}:\n" + "".join(report)
    return results


def test_the_packages_hold_examples():
    """Guards the walk itself: it finds the modules known to carry examples."""
    assert {"privacy.accounting", "distill.kernels", "distill.nas"} <= set(MODULES)
    assert len(MODULES) >= 10


def prompt_lines(name: str) -> int:
    source = Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")
    return sum(line.lstrip().startswith(">>>") for line in source.splitlines())


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    attempted = run_examples(name).attempted
    assert attempted == prompt_lines(name) > 0, f"{name}: {prompt_lines(name)} '>>>' lines, {attempted} examples ran"


def test_a_wrong_example_fails(tmp_path, monkeypatch):
    """The runner reports a failing example (so the tests above can fail)."""
    (tmp_path / "wrong_example_mod.py").write_text('"""\n>>> 1 + 1\n3\n"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AssertionError, match="1 of 1 examples failed"):
        run_examples("wrong_example_mod")
