"""Run-store names and config format (distill/store_format.py): one name format made and parsed in one
place, config.json stamped with its format, format-1 stores migrated, newer formats refused by every reader."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attacks.store_audit import read_store
from distill.data import load_dataset
from distill.store_format import (FORMAT_KEY, STORE_FORMAT, SetName, StoreFormatError, migrate_config,
                                  parse_set_name, read_config, set_name, set_path, stored_sets)
from distill.synthetic import SetMetadata, SyntheticSet
from server.resume import ResumeError, resume_settings
from server.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
INFO = load_dataset().info


def _set(n: int = 2, round_: int = 1) -> SyntheticSet:
    return SyntheticSet(torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long),
                        SetMetadata(INFO, "dm", 1, client="0", round=round_))


def _config_file(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


@given(st.integers(1, 10**6), st.integers(-2**63, 2**64))
def test_a_set_name_parses_back_to_its_round_and_node(round_, node):
    assert parse_set_name(set_name(round_, node)) == SetName(round_, node)
    assert SetName(round_, node).path == set_path(round_, node) == f"sets/{set_name(round_, node)}"


@pytest.mark.parametrize("name", ["round1-node5.npz", "round001-node05.npz", "round000-node5.npz",
                                  "round001-node-0.npz", "round001-node5.npz.tmp", ".round001-node5.npz.x1.tmp",
                                  "round001-node5.npy", "round001_node5.npz", "sets/round001-node5.npz", ""])
def test_only_names_the_store_makes_parse(name):
    with pytest.raises(ValueError, match="not a stored set's name"):
        parse_set_name(name)


@pytest.mark.parametrize("round_, node", [(0, 5), (-1, 5), (True, 5), (1.0, 5), (1, 5.0), ("1", 5)])
def test_a_set_name_needs_a_round_from_1_and_integer_ids(round_, node):
    with pytest.raises(ValueError):
        set_name(round_, node)


def test_the_store_saves_under_the_name_the_readers_parse(tmp_path):
    store = RunStore(tmp_path)
    path = store.save_set(_set(), 7, 123)
    assert path == tmp_path / set_path(7, 123) and parse_set_name(path.name) == SetName(7, 123)


def test_stored_sets_are_the_stores_own_files_in_round_order(tmp_path):
    store = RunStore(tmp_path)
    for round_, node in [(1000, 1), (999, 2), (2, -4), (2, 3)]:  # round1000 sorts before round999 as text
        store.save_set(_set(), round_, node)
    sets = tmp_path / "sets"
    (sets / "round1-node9.npz").write_bytes(b"not the store's name")
    (sets / ".round001-node9.npz.abc.tmp").write_bytes(b"an interrupted write")
    (sets / "quarantined").mkdir()
    (sets / "quarantined" / "round001-node8.npz").write_bytes(b"set aside")
    (sets / "round003-node1.npz").mkdir()  # a folder with a set's name is no set
    assert [n for n, _ in stored_sets(tmp_path)] == [SetName(2, -4), SetName(2, 3), SetName(999, 2),
                                                     SetName(1000, 1)]
    assert all(p.parent == sets for _, p in stored_sets(tmp_path))
    assert stored_sets(tmp_path / "empty") == []


def test_config_json_is_stamped_with_the_format_and_reads_back_as_the_run_config(tmp_path):
    store = RunStore(tmp_path)
    store.write_config({"method": "dm", "dm.lr-img": 0.5, "ipc": 2})
    assert json.loads((tmp_path / "config.json").read_text())[FORMAT_KEY] == STORE_FORMAT == 2
    assert read_config(tmp_path) == store.read_config() == {"method": "dm", "dm.lr-img": 0.5, "ipc": 2}


def test_a_format_1_config_moves_dms_flat_settings_under_dm(tmp_path):
    raw = {"method": "dm", "lr-img": 0.25, "batch-real": 16, "ipc": 2}
    _config_file(tmp_path, raw)  # format 1: every store written before the format key existed
    assert read_config(tmp_path) == {"method": "dm", "dm.lr-img": 0.25, "dm.batch-real": 16, "ipc": 2}
    migrated = migrate_config(raw)
    assert migrated == {"method": "dm", "dm.lr-img": 0.25, "dm.batch-real": 16, "ipc": 2, FORMAT_KEY: 2}
    assert raw == {"method": "dm", "lr-img": 0.25, "batch-real": 16, "ipc": 2}, "the input is not changed"
    assert migrate_config(migrated) == migrated, "a current config migrates to itself"


@pytest.mark.parametrize("raw, expected", [
    ({"lr-img": 0.25}, {"dm.lr-img": 0.25}),  # format 1's default method was dm
    ({"method": "kip", "lr-img": 0.25, "batch-real": 16}, {"method": "kip"}),  # ignored under kip: dropped
    ({"method": "mtt", "dp": "dp-dm", "batch-real": 16}, {"method": "mtt", "dp": "dp-dm"}),
    ({"method": "dm", FORMAT_KEY: 1, "batch-real": 16}, {"method": "dm", "dm.batch-real": 16}),  # explicit 1
    ({"method": "dm", FORMAT_KEY: 2, "dm.batch-real": 16}, {"method": "dm", "dm.batch-real": 16}),
])
def test_format_1_settings_other_methods_ignored_are_dropped(raw, expected):
    assert migrate_config(raw) == {**expected, FORMAT_KEY: 2}


@pytest.mark.parametrize("fmt, says", [(99, "run store format 99 is newer than this fedistill reads (formats 1, 2)"),
                                       (3, "format 3 is newer"), (0, "must be an integer >= 1, got 0"),
                                       ("2", "got '2'"), (2.0, "got 2.0"), (True, "got True")])
def test_a_store_of_an_unknown_format_is_refused_naming_store_and_formats(tmp_path, fmt, says):
    root = _config_file(tmp_path / "run-x", {"method": "dm", FORMAT_KEY: fmt})
    with pytest.raises(StoreFormatError, match="formats 1, 2") as err:
        read_config(root)
    assert str(err.value).startswith(str(root)) and says in str(err.value)


def test_every_reader_refuses_a_newer_format_with_the_message(tmp_path):
    root = _config_file(tmp_path / "run-new", {"method": "dm", "dataset": "mnist10k", FORMAT_KEY: 99})
    with pytest.raises(ResumeError, match=r"run-new: run store format 99 is newer .*\(formats 1, 2\)"):
        resume_settings(root)
    with pytest.raises(StoreFormatError, match="format 99"):
        read_store(root)


def test_the_store_audit_reads_a_format_1_store_migrated_and_rounds_from_names(tmp_path):
    root = _config_file(tmp_path / "old", {"method": "dm", "lr-img": 0.5, "dataset": "mnist10k"})
    RunStore(root).save_set(_set(3, round_=12), 12, 1001)
    run = read_store(root)
    assert run.config == {"method": "dm", "dm.lr-img": 0.5, "dataset": "mnist10k"}
    assert [(rnd, client, len(syn)) for rnd, client, syn in run.sets] == [(12, "0", 3)]


def test_resume_refuses_an_unreadable_config_as_before(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ResumeError, match="no readable config.json"):
        resume_settings(tmp_path)


SET_NAME_PARSING = ('glob("round', "glob('round", 'removeprefix("round', 'split("node', "split('node",
                    "round(\\d+)", 'round{', "-node{")


def test_set_names_are_made_and_parsed_only_in_the_store_format_module():
    """The one place: no other module of the project spells the set-name pattern."""
    offenders = []
    for package in ("server", "attacks", "simulations", "client", "distill", "privacy"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "store_format.py":
                continue
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):
                segment = ast.get_source_segment(text, node) if isinstance(node, ast.Call) else None
                if segment and any(p in segment for p in SET_NAME_PARSING):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {segment[:80]}")
    assert not offenders, "\n".join(sorted(set(offenders)))
