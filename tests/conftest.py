"""Shared fixtures: the bundled dataset (loaded once) and a small, fast network setting."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.pop("FEDISTILL_COMPILE", None)  # the default run is eager (test_accel.py compiles, marked slow)

from distill import accel  # noqa: E402
from distill.data import Dataset, load_dataset  # noqa: E402

accel.use_compile(False)

# Two cores in CI; FEDISTILL_TEST_THREADS=1 when another heavy job shares the machine
# (two processes with two threads each on two cores run many times slower).
torch.set_num_threads(int(os.environ.get("FEDISTILL_TEST_THREADS", "2")))

SMALL_NET = {"width": 16, "depth": 2}


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load_dataset("mnist10k")


@pytest.fixture(scope="session")
def small_train(mnist: Dataset):
    """600 training images, 60 per class: enough signal, fast."""
    idx = torch.cat([i[:60] for i in mnist.train.class_indices()])
    return mnist.train.subset(idx)


@pytest.fixture(autouse=True)
def private_ledger_dir(tmp_path_factory, monkeypatch) -> str:
    """Every test's simulated DP nodes keep their per-run ledgers in a folder of their own."""
    folder = str(tmp_path_factory.mktemp("ledgers"))
    monkeypatch.setenv("FEDISTILL_LEDGER_DIR", folder)
    return folder
