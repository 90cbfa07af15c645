"""The noise secret comes from the OS's secure source and appears nowhere the server can look."""

from __future__ import annotations

import logging
import secrets

import pytest
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

import privacy.randomness as randomness
from client.app import app as client_app
from server.app import run

TASK = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "dp": "dp-dm", "sigma": 1.0,
        "server-epochs": 1, "server-dsa": False}


def test_the_noise_generator_is_seeded_from_secrets(monkeypatch):
    drawn: list[int] = []

    def recording(bits: int) -> int:
        drawn.append(secrets.SystemRandom().getrandbits(bits))
        return drawn[-1]

    monkeypatch.setattr(randomness.secrets, "randbits", recording)
    gen = randomness.noise_generator(public_seed=0)
    assert drawn and gen.initial_seed() == drawn[-1] and randomness.SECRET_BITS >= 64
    assert randomness.noise_generator(0, insecure_reproducible_noise=True).initial_seed() \
        == randomness.noise_generator(0, insecure_reproducible_noise=True).initial_seed()


def _forms(value: int) -> list[str]:
    """How a leaked seed could be written: decimal, hex, and as torch prints a float of it."""
    return [str(value), hex(value)[2:], f"{float(value):.6e}"]


def test_the_secret_is_in_no_set_log_metric_or_run_store_file(tmp_path, monkeypatch, caplog,
                                                              task_identity):  # noqa: F811
    drawn: list[int] = []
    original = randomness.secret_seed

    def recording() -> int:
        drawn.append(original())
        return drawn[-1]

    monkeypatch.setattr(randomness, "secret_seed", recording)
    caplog.set_level(logging.DEBUG)
    grid = InProcessGrid(client_app, 3)
    summary = run(grid, {}, runs_dir=str(tmp_path / "runs"), **TASK)
    assert summary["status"] == "ok" and len(drawn) >= 3  # one secret per client's distillation
    texts = [caplog.text]
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    ledgers = [p for p in tmp_path.parent.rglob("node-*.json")] + [p for p in tmp_path.rglob("node-*.json")]
    texts += [p.read_text() for p in ledgers]
    for msg in grid.sent:
        texts.append(repr(dict(msg.content.get("config", {}))))
    blob = "\n".join(texts)
    leaked = [form for value in drawn for form in _forms(value) if len(form) >= 8 and form in blob]
    assert not leaked, f"the noise secret appears in what the server sees: {leaked[:3]}"
    assert len(blob) > 10_000  # the search did look at the run store


@pytest.mark.parametrize("insecure", [False, True])
def test_only_the_insecure_switch_makes_two_generators_agree(insecure):
    import torch

    a = randomness.noise_generator(5, insecure)
    b = randomness.noise_generator(5, insecure)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b)) == insecure
