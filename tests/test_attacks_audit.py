"""The audit report builds from a tiny run store (and a tiny central config) and names every section."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from attacks.audit import run_audit
from attacks.report import SECTIONS
from attacks.store_audit import client_members, read_store
from distill.networks import seeded_network
from distill.synthetic import SetMetadata
from server.store import RunStore

CONFIG = {"dataset": "mnist10k", "partitioner": "iid", "alpha": 0.5, "shards-per-client": 2, "seed": 0,
          "holdout-fraction": 0.1, "method": "dm", "ipc": 2, "net-width": 8, "net-depth": 2, "mode": "one-shot"}


@pytest.fixture()
def tiny_store(tmp_path, mnist):
    """Two of four iid clients uploaded sets that copy 20 of their own images (real init, no steps)."""
    store = RunStore(tmp_path / "runs" / "20250101-000000-tiny")
    store.write_json("config.json", CONFIG)
    from distill.synthetic import SyntheticSet
    for pid in (0, 1):
        members = client_members(CONFIG, pid, 4)
        pick = members.subset(np.arange(20))
        meta = SetMetadata(dataset=mnist.info, method="dm", ipc=2, client=str(pid), round=1)
        store.save_set(SyntheticSet(pick.images.clone(), pick.labels.clone(), meta), 1, 1000 + pid)
    store.save_model(seeded_network("convnet", 1, 10, (28, 28), seed=0, width=8, depth=2).state_dict())
    store.write_json("summary.json", {"accuracy": 0.1})
    return store.root


def test_members_are_the_clients_distilled_partition(tiny_store):
    a, b = client_members(CONFIG, 0, 4), client_members(CONFIG, 1, 4)
    assert len(a) == len(b) == 1800  # 2000 per client, 10 % held out
    from client.task import DistillTask, load_partition
    for pid, members in ((0, a), (1, b)):  # exactly what the client itself distils
        task = DistillTask.from_config({k: v for k, v in CONFIG.items() if k != "mode"})
        train, _ = load_partition(task, {"partition-id": pid, "num-partitions": 4})
        assert torch.equal(train.images, members.images) and torch.equal(train.labels, members.labels)
    with pytest.raises(ValueError, match="holdout-fraction"):
        client_members({k: v for k, v in CONFIG.items() if k != "holdout-fraction"}, 0, 4)
    run = read_store(tiny_store)
    assert [c for _, c, _ in run.sets] == ["0", "1"] and run.model_state is not None


def test_report_builds_from_a_tiny_run_store(tiny_store, tmp_path):
    report = run_audit(tiny_store, tmp_path / "out", num_partitions=4, progress=False)
    html = (tmp_path / "out" / "report.html").read_text()
    for section in SECTIONS:
        assert f">{section}</h2>" in html
    assert "data:image/png;base64," in html
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["summary"]["lines"] == report["summary"]["lines"]
    dist = [a for a in report["membership_inference"]["attacks"] if a["attack"] == "distance-pixel"]
    assert len(dist) == 2 and all(a["tpr_at_0_fpr"] > 0 for a in dist)  # the copied members are found
    assert any(a["target"] == "global model" for a in report["membership_inference"]["attacks"])
    assert any("TPR@1%FPR" in line for line in report["summary"]["lines"])


def test_report_builds_from_a_tiny_central_config(tmp_path, mnist):
    cfg = {"pool_size": 40, "shadows": 2,
           "train": {"arch": "mlp", "arch_kwargs": {"width": 32}, "epochs": 5, "batch_size": 20, "dsa": False},
           "targets": [{"kind": "real"}],
           "backdoor": {"method": "dm", "settings": {"ipc": 1, "iterations": 2, "arch_kwargs": {"width": 8, "depth": 1}},
                        "fraction": 0.1, "size": 3, "target": 0, "client_size": 100, "doorping": False},
           "canary": {"kind": "mislabel", "count": 40, "client_size": 60, "score": "loss"}}
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(cfg))
    bench = tmp_path / "results.json"  # simulations/bench_privacy.py's format, infinite epsilon as "inf"
    bench.write_text(json.dumps({"delta": 1e-5, "rows": [
        {"row": r, "method": m, "target_epsilon": e, "epsilon": e, "accuracy": a, "accuracies": [a]}
        for r, m, e, a in (("dp-dm", "dp-dm", 1, 0.5), ("dp-dm", "dp-dm", 4, 0.7), ("dm (no DP)", "dm", "inf", 0.9),
                           ("dp-sgd", "dp-sgd", 1, 0.6), ("dp-sgd", "dp-sgd", 4, 0.8))]}))
    report = run_audit(path, tmp_path / "out", progress=False, privacy_results=bench)
    html = (tmp_path / "out" / "report.html").read_text()
    assert all(f">{s}</h2>" in html for s in SECTIONS)
    (row,) = report["dp_audit"]["canary_rows"]
    assert row["target"] == "real" and row["claimed_epsilon"] == "none" and row["confidence"] == 0.95
    assert "Canary audit" in html and any("canary audit" in line for line in report["summary"]["lines"])
    assert len(report["dp_audit"]["accuracy_vs_epsilon"]) == 6  # the real target + 5 bench rows
    dp_html = html.split(">DP audit</h2>")[1].split(">Summary</h2>")[0]
    assert "data:image/png;base64," in dp_html  # the accuracy-vs-epsilon plot
    mia_html = html.split(">Membership inference</h2>")[1].split(">Backdoor</h2>")[0]
    assert report["exposed"] and report["exposed"][0]["attack"] == "rmia-online"
    assert mia_html.count("data:image/png;base64,") == 2  # ROC + thumbnails of the most exposed members
    assert [r["name"] for r in report["backdoor"]["rows"]] == ["clean", "naive"]
    assert {a["attack"] for a in report["membership_inference"]["attacks"]} >= {"loss", "lira-online", "lira-offline",
                                                                             "rmia-online", "rmia-offline"}


def test_attacks_never_import_flower():
    code = ("import sys, attacks.audit, attacks.doorping, attacks.store_audit, attacks.central, attacks.canary, "
            "attacks.rmia; "
            "print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_targets_sharing_a_method_get_distinct_names():
    from attacks.central import _target_pipeline
    from distill.train import TrainConfig

    train = TrainConfig(arch="mlp", arch_kwargs={"width": 8}, epochs=1, dsa=False)
    specs = ({"kind": "real"}, {"kind": "distill", "method": "dm", "settings": {"ipc": 1}},
             {"kind": "distill", "method": "dm", "settings": {"ipc": 2}}, {"kind": "distill", "method": "dc", "name": "x"})
    assert [_target_pipeline(s, train, specs).name for s in specs] == ["real", "dm #1", "dm #2", "x"]


def test_low_fpr_verdict_corrects_for_picking_the_best_attack():
    from attacks.audit import low_fpr_verdict

    few = {"non_members": 200, "members": 200, "tpr_at_1pct_fpr": 0.3}
    assert low_fpr_verdict(few, 4).startswith("inconclusive")
    strong = {"non_members": 1000, "members": 1000, "tpr_at_1pct_fpr": 0.10}
    assert low_fpr_verdict(strong, 5).startswith("leaks")
    # 2.0% TPR clears the 1% level at alpha 0.05 for one attack but not after correcting for 20
    borderline = {"non_members": 1000, "members": 1000, "tpr_at_1pct_fpr": 0.020}
    assert low_fpr_verdict(borderline, 1).startswith("leaks")
    assert low_fpr_verdict(borderline, 20).startswith("no evidence")
