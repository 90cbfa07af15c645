"""Tables in the docs are generated from their raw JSON: a hand edit, or JSON the docs lag, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.reliability_table import TABLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("BENCHMARKS.md", "docs/reliability.md")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_reliability_table_in_the_docs_is_its_generated_markdown(name):
    generated = subprocess.run([sys.executable, str(ROOT / "simulations" / "reliability_table.py"), name],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert generated.startswith(f"<!-- {name}:")
    assert any(generated in (ROOT / doc).read_text() for doc in DOCS), \
        f"the {name} table in {DOCS} differs from `python simulations/reliability_table.py {name}`"
