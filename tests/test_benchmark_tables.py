"""The docs' result tables are generated from their raw JSON: a hand edit, or JSON the docs lag, fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import benchmark_tables as bt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the docs and the raw JSON the tables come from (no images)."""
    for doc in bt.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    (tmp_path / bt.RAW).mkdir(parents=True, exist_ok=True)
    for raw in (ROOT / bt.RAW).glob("*.json"):
        shutil.copy(raw, tmp_path / bt.RAW / raw.name)
    return tmp_path


def test_every_table_in_the_docs_is_what_its_json_gives():
    assert bt.problems() == [], "run `python simulations/benchmark_tables.py` (or fix the JSON)"


def test_every_generated_table_reads_raw_json_that_git_keeps():
    """Not bench_results/ or runs/ (git-ignored): a table must survive a fresh clone."""
    wanted = sorted({f"{bt.RAW.as_posix()}/{s}.json" for t in bt.TABLES.values() for s in t.sources})
    assert all((ROOT / w).is_file() for w in wanted)
    ignored = subprocess.run(["git", "check-ignore", *wanted], capture_output=True, text=True, cwd=ROOT)
    assert ignored.returncode in (0, 1), ignored.stderr  # 128: not a git checkout
    assert ignored.stdout.split() == []


def test_a_hand_edited_number_is_reported_and_the_rewrite_restores_it(tree: Path):
    doc = tree / "BENCHMARKS.md"
    text = doc.read_text()
    row = next(line for line in text.split("\n") if line.startswith("| IID | FedAvg | 50 |"))
    doc.write_text(text.replace(row, row.replace("98.50", "99.50")))
    assert any("'federated'" in p for p in bt.problems(tree)), bt.problems(tree)

    new, names = bt.update(doc.read_text(), "BENCHMARKS.md", tree)
    assert "federated" in names and new == text
    doc.write_text(new)
    assert bt.problems(tree) == []


def test_a_changed_json_makes_every_table_that_reads_it_stale(tree: Path):
    raw = tree / bt.RAW / "federated.json"
    data = json.loads(raw.read_text())
    data["oneshot-0.5"]["wall-seconds"] = 749.0  # a figure typed by hand once, where the run took 759.8 s
    raw.write_text(json.dumps(data))
    stale = {name for name in bt.TABLES if any(f"'{name}'" in p for p in bt.problems(tree))}
    assert stale == {"federated", "federated-dp"}  # the two tables that show that wall time

    assert subprocess.run([sys.executable, str(ROOT / "simulations" / "benchmark_tables.py"), "--check",
                           "--root", str(tree)], capture_output=True, cwd=ROOT).returncode == 1
    assert subprocess.run([sys.executable, str(ROOT / "simulations" / "benchmark_tables.py"), "--root", str(tree)],
                          capture_output=True, cwd=ROOT).returncode == 0
    assert "| Dirichlet 0.5 | fedistill one-shot, IPC 10 | 1 | 97.35 | 0.215 | 749 s |" in \
        (tree / "BENCHMARKS.md").read_text()
    assert bt.problems(tree) == []


def test_a_table_typed_outside_the_markers_is_reported(tree: Path):
    doc = tree / "BENCHMARKS.md"
    doc.write_text(doc.read_text() + "\n| method | accuracy |\n| --- | --- |\n| DM | 99.9 % |\n")
    assert [p for p in bt.problems(tree) if "outside a generated block" in p] != []
    assert bt.hand_tables("```\n| in a code block |\n```\n") == []


def test_unknown_or_unterminated_blocks_are_errors_and_unused_tables_are_reported(tree: Path):
    with pytest.raises(ValueError, match="unknown generated table 'no-such-table'"):
        bt.update("<!-- generated: no-such-table x -->\n<!-- end generated: no-such-table -->", "BENCHMARKS.md", tree)
    with pytest.raises(ValueError, match="no '<!-- end generated: kills -->' line"):
        bt.update("<!-- generated: kills x -->\n| figure | value |\n", "BENCHMARKS.md", tree)

    doc = tree / "docs" / "reliability.md"
    text = doc.read_text()
    start = text.index("<!-- generated: chunks ")
    end = text.index("<!-- end generated: chunks -->") + len("<!-- end generated: chunks -->")
    doc.write_text(text[:start] + text[end:])
    assert "table 'chunks' is in none of README.md, BENCHMARKS.md, docs/reliability.md" in bt.problems(tree)


def test_links_in_a_block_are_relative_to_the_doc_and_name_the_raw_json(tree: Path):
    assert "[chunk_inflation.json](benchmarks/chunk_inflation.json)" in bt.render("chunks", "docs/reliability.md", tree)
    assert "[chunk_inflation.json](docs/benchmarks/chunk_inflation.json)" in bt.render("chunks", "BENCHMARKS.md", tree)
    headline = bt.render("headline", "README.md", tree)
    assert "[federated.json](docs/benchmarks/federated.json)" in headline
    assert "Raw:" not in headline  # the README's table carries its links in a column instead


def test_the_fedavg_crossover_is_the_first_round_at_or_above_the_one_shot_accuracy():
    def curve(accs):
        return [{"round": i + 1, "accuracy": a, "mb-per-client": 0.3 * (i + 1)} for i, a in enumerate(accs)]
    fed = {"oneshot-iid": {"accuracy": 0.95, "mb-per-client": 0.1},
           "fedavg-iid": {"curve": curve([0.90, 0.96, 0.94, 0.97])},
           "oneshot-0.5": {"accuracy": 0.99, "mb-per-client": 0.1},
           "fedavg-0.5": {"curve": curve([0.90, 0.91])},
           "oneshot-0.1": {"accuracy": 0.90, "mb-per-client": 0.2},
           "fedavg-0.1": {"curve": curve([0.90])}}
    rows = bt.crossover_table(fed).split("\n")[2:]
    assert rows[0] == "| IID | IPC 10 | 95.00 | 0.100 | round 2 (96.00 %) | 0.600 | 6x |"
    assert rows[1] == "| Dirichlet 0.5 | IPC 10 | 99.00 | 0.100 | not reached | - | - |"
    assert rows[2].startswith("| Dirichlet 0.1 | IPC 10 | 90.00 | 0.200 | round 1 (90.00 %) |")


def test_equal_bytes_compares_each_fedistill_round_with_fedavgs_best_within_its_bytes():
    def curve(accs, mb):
        return [{"round": i + 1, "accuracy": a, "mb-per-client": mb * (i + 1)} for i, a in enumerate(accs)]
    fed = {"oneshot-0.5": {"curve": curve([0.40], 1.0)},
           "iterative-0.5": {"curve": curve([0.40, 0.45], 1.0), "accuracy": 0.45, "mb-per-client": 2.0},
           "fedavg-0.5": {"curve": curve([0.20, 0.30, 0.50, 0.35, 0.33] + [0.6] * 15, 0.35)},
           "oneshot-0.1": {"curve": curve([0.30], 0.2)},
           "fedavg-0.1": {"curve": curve([0.25], 0.35)}}
    rows = bt.equal_bytes_table(fed).split("\n")[2:]
    # 1.0 MB buys FedAvg rounds 1-2 (0.35, 0.70 MB); round 3 (1.05 MB) does not fit
    assert rows[0] == "| Dirichlet 0.5 | one-shot, round 1 | 1.000 | 40.00 | 30.00 (round 2, 0.700 MB) | +10.00 |"
    # 2.0 MB buys rounds 1-5; the best of them is round 3, not the last
    assert rows[2] == "| Dirichlet 0.5 | iterative, round 2 | 2.000 | 45.00 | 50.00 (round 3, 1.050 MB) | -5.00 |"
    assert rows[3].startswith("| Dirichlet 0.5 | iterative, last round against FedAvg's 20 rounds | 2.000 / 7.000 |")
    assert rows[3].endswith("| 60.00 (round 20) | -15.00 |")
    assert rows[4] == "| Dirichlet 0.1 | one-shot, round 1 | 0.200 | 30.00 | no round fits | - |"
