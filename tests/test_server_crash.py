"""Real crashes inside run-store writes (issue 20): a run SIGKILLs itself part-way through a write
(half the bytes in the temp file; written but not fsynced; fsynced but not renamed; renamed but its
folder not fsynced), another process resumes it, and no accepted set is lost and the result equals
an uninterrupted run with the same seed (metrics lines, accuracy, every set's arrays, every model).

The simulated kills of ``test_server_resume.py`` raise before the write; these are real kills of a
child process (``tests/kill_harness.py``). Four points run by default (one per phase, over a set,
a round checkpoint and both metrics lines); the other 44 of the 12 writes x 4 phases and one run
in fresh interpreters are ``slow``. ``simulations/bench_kills.py`` runs all of them for BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.kill_harness import (ALL_POINTS, DEFAULT_POINTS, PHASES, WRITE_LABELS, Outcome, Reference, Zygote,
                                exec_launch, exercise, no_config_yet, reference)

OUTCOMES: list[Outcome] = []  # every point this session exercised, summarised at the module's end


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One warm process that forks a fresh process per run (a fresh interpreter costs ~5 s each)."""
    zygote = Zygote(tmp_path_factory.mktemp("ledgers"), tmp_path_factory.mktemp("zygote") / "zygote.log")
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def ref(launch: Zygote, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run, once per module, in a child process like the others."""
    return reference(launch, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module", autouse=True)
def kill_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many kill points ran and what they found (the figures BENCHMARKS.md quotes)."""
    yield
    if not OUTCOMES:
        return
    resumed = [o for o in OUTCOMES if not no_config_yet(o)]
    line = (f"kill points: {len(OUTCOMES)} exercised, {sum(o.killed for o in OUTCOMES)} SIGKILLed at their point, "
            f"{sum(len(o.sets_lost) for o in OUTCOMES)} accepted sets lost of "
            f"{sum(o.sets_accepted_at_kill for o in OUTCOMES)} accepted at the kill, "
            f"{sum(o.matches_reference for o in resumed)}/{len(resumed)} resumed runs identical to the uninterrupted one")
    report_line(request, line)


def report_line(request: pytest.FixtureRequest, line: str) -> None:
    """Write past pytest's output capture, so the count shows in a passing run too."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")


def check(out: Outcome) -> None:
    """What every kill point must end with."""
    OUTCOMES.append(out)
    assert out.killed, out.resume
    if no_config_yet(out):  # nothing accepted yet: the resume says why it cannot go on
        assert out.resume.startswith("refused") and "config.json" in out.resume, out.resume
        assert out.sets_accepted_at_kill == 0 and out.sets_listed == 0
        return
    assert out.resume == "ok", out.resume
    assert out.sets_lost == [], "an accepted set was lost or changed"
    assert out.interrupted_not_kept == [], "an interrupted round's set was neither replayed nor kept"
    assert out.resumed_after == [out.rounds_complete_at_kill]
    assert out.metrics_identical and out.accuracy_identical, "metrics differ from the uninterrupted run"
    assert out.sets_identical and out.models_identical, "sets or models differ from the uninterrupted run"
    assert out.temp_files_left == [] and out.quarantined == []


def test_the_run_makes_the_writes_the_kill_points_name(ref: Reference) -> None:
    """The points cover every kind of file the store writes; a reordered server shows up here first."""
    assert tuple(w.label for w in ref.writes) == WRITE_LABELS
    assert [w.n for w in ref.writes] == list(range(1, len(WRITE_LABELS) + 1))
    assert all(w.streamed > 0 for w in ref.writes)
    kinds = {w.path.split("/")[0] if "/" in w.path else w.path for w in ref.writes}
    assert kinds == {"config.json", "sets", "models", "global_model.pt", "metrics.jsonl", "summary.json"}
    defaults = [p.split(":") for p in DEFAULT_POINTS]
    assert {phase for _, phase in defaults} == set(PHASES)
    assert len({ref.write(label).path.split("/")[0] for label, _ in defaults}) == 3  # sets, models, metrics


@pytest.mark.parametrize("point", DEFAULT_POINTS)
def test_a_run_sigkilled_inside_a_write_resumes_to_the_uninterrupted_result(point: str, launch: Zygote,
                                                                          ref: Reference, tmp_path: Path) -> None:
    out = exercise(launch, tmp_path, ref, point)
    check(out)
    assert out.temp_left_by_kill == (out.phase != "before-dir-fsync")  # the kill really cut a write short
    if out.phase == "mid-write":
        assert 0 < out.temp_bytes_at_kill < ref.write(point.split(":")[0]).streamed


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in ALL_POINTS if p not in DEFAULT_POINTS])
def test_every_other_kill_point_resumes_to_the_uninterrupted_result(point: str, launch: Zygote, ref: Reference,
                                                                     tmp_path: Path) -> None:
    check(exercise(launch, tmp_path, ref, point))


@pytest.mark.slow
def test_a_kill_and_resume_in_fresh_interpreters_match_the_forked_reference(ref: Reference, tmp_path: Path) -> None:
    """Nothing the warm zygote shares with its forks changes the result: killed and resumed in new
    interpreters, the run still equals the reference."""
    check(exercise(exec_launch(tmp_path / "ledgers"), tmp_path / "run", ref, "set-r2-a:mid-write"))
