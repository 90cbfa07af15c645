"""What the README and docs/ promise a reader holds: links resolve, the example runs, the demo output is real."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks opened with ```lang (a bare ``` when lang is empty)."""
    blocks, body, opened = [], [], None
    for line in text.split("\n"):
        if opened is None and line.startswith("```"):
            opened, body = line[3:].strip(), []
        elif opened is not None and line == "```":
            if opened == lang:
                blocks.append("\n".join(body) + "\n")
            opened = None
        elif opened is not None:
            body.append(line)
    return blocks


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text()):
        path = target.split("#")[0]
        if not path or re.match(r"[a-z]+:", path):
            continue
        if not (doc.parent / path).exists():
            broken.append(target)
    assert broken == []


def test_the_readme_shows_a_measured_result_on_its_first_screen():
    lines = README.read_text().split("\n")
    first_row = next(i for i, line in enumerate(lines) if line.startswith("| "))
    assert first_row < 40
    assert lines[first_row - 1].startswith("<!-- generated: headline ")  # from raw JSON, not typed


def test_the_make_targets_the_readme_names_exist():
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", README.read_text()))
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test", "deploy", "bench-quick"} <= named
    assert named <= targets, named - targets


def test_the_readme_demo_output_is_what_the_demo_run_printed():
    """The block is rebuilt from that run's raw files by run.py's own formatting, for `make demo`'s arguments."""
    from server.settings import RunSettings
    from simulations.run import final_table, overrides_from_args, parse_args, progress_line

    recipe = re.search(r"^demo:.*\n\t\$\(PY\) simulations/run\.py (.*)$", (ROOT / "Makefile").read_text(), re.M)
    args = parse_args(shlex.split(recipe.group(1)))
    settings = RunSettings.from_run_config({}, **overrides_from_args(args))
    raw = ROOT / "docs" / "benchmarks"
    summary = json.loads((raw / "demo_summary.json").read_text())
    first_round = json.loads((raw / "demo_metrics.jsonl").read_text().split("\n")[0])
    printed = "\n".join([progress_line(first_round), final_table(summary, settings, args.clients)])
    assert printed + "\n" in code_blocks(README.read_text(), "")


def _python_example() -> str:
    return next(b for b in code_blocks(README.read_text(), "python") if "from distill import" in b)


def _run_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> dict:
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(source, "README.md", "exec"), scope)  # noqa: S102  (our own README)
    return scope


def _check_saved(tmp_path: Path, scope: dict) -> None:
    from distill import SyntheticSet

    loaded = SyntheticSet.load(tmp_path / "dm10.npz")
    assert loaded.images.shape == (100, 1, 28, 28)
    assert loaded.labels.tolist() == scope["syn"].labels.tolist()


def test_the_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every call of the five lines, with the real signatures; the work itself is made small underneath
    (a narrow embedder, 8 real images per class, one epoch, 200 test images), so the test stays fast."""
    import dataclasses
    import inspect

    import distill
    from distill import evaluate as real_evaluate
    from distill import distill as real_distill

    def small_distill(*args, **kwargs):
        bound = inspect.signature(real_distill).bind(*args, **kwargs)
        data, config = bound.arguments["real_data"], bound.arguments["config"]
        return real_distill(data, dataclasses.replace(config, iterations=1, batch_real=8, arch_kwargs={"width": 8}))

    def small_evaluate(*args, **kwargs):
        bound = inspect.signature(real_evaluate).bind(*args, **kwargs)
        a = bound.arguments
        config = dataclasses.replace(a["config"], epochs=1, arch_kwargs={"width": 8})
        return real_evaluate(a["images"], a["labels"], a["test"].subset(range(200)), config, seeds=(0,))

    monkeypatch.setattr(distill, "distill", small_distill)
    monkeypatch.setattr(distill, "evaluate", small_evaluate)
    scope = _run_example(tmp_path, monkeypatch, _python_example())
    assert scope["syn"].meta.method == "dm" and scope["syn"].meta.ipc == 10
    _check_saved(tmp_path, scope)


@pytest.mark.slow
def test_the_readme_python_example_runs_unchanged_but_for_its_iterations(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    example = _python_example()
    small = example.replace("iterations=200", "iterations=2").replace("epochs=300", "epochs=1")
    assert small != example
    _check_saved(tmp_path, _run_example(tmp_path, monkeypatch, small))
