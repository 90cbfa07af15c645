"""The audit report builds from a tiny run store (and a tiny central config) and names every section."""

import csv
import html as html_lib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from attacks.audit import run_audit
from attacks.report import SECTIONS, csv_cell, render_html, report_tables, verdict_lines
from attacks.metrics import auc, roc_curve
from attacks.store_audit import cap_note, class_matched_indices, client_members, read_store
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


def check_layout_and_csv(report, out):
    """Verdicts first (the console's lines, escaped), then the tables, the config last in <details>;
    report.csv holds the HTML tables' rows under one header."""
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h([12])[^>]*>(.*?)</h\1>", page)
    assert headings[0] == ("1", "fedistill audit report") and headings[1] == ("2", "Summary")
    top = page.split(">Summary</h2>")[1].split("<h2")[0]
    lines = verdict_lines(report)
    assert lines == report["summary"]["lines"]
    assert re.findall(r"<li>(.*?)</li>", top.split("<h3>Attacks</h3>")[0]) == [html_lib.escape(s) for s in lines]
    assert "<h3>Attacks</h3>" in top and "<table" not in top
    assert page.index(">Summary</h2>") < page.index("<table")
    attacks = {a["attack"] for a in report["membership_inference"]["attacks"]}
    assert all(any(li.startswith(html_lib.escape(a) + ":") for li in re.findall(r"<li>(.*?)</li>", top))
               for a in attacks)  # one legend sentence per attack
    details = page.rindex("<details")
    assert details > page.rindex("<table") and details > page.rindex("<img")
    assert "<summary>Configuration</summary>" in page[details:] and "Configuration</h2>" not in page
    assert page[details:].split("</details>")[1].strip() == "</body></html>"
    with open(out / "report.csv", newline="") as f:
        got = list(csv.DictReader(f))
    expected = [(tid, r, cols) for _, tid, _, rows, cols in report_tables(report) for r in rows]
    assert len(got) == len(expected) == page.count("<tr>") - len(report_tables(report))  # minus header rows
    for row, (tid, r, cols) in zip(got, expected):
        assert row["table"] == tid
        assert all(row[c] == csv_cell(r.get(c)) for c in cols)
        assert all(v == "" for c, v in row.items() if c != "table" and c not in cols)
        if tid == "membership_inference":
            assert float(row["auc"]) == r["auc"] and json.loads(row["tpr_at_1pct_ci"]) == list(r["tpr_at_1pct_ci"])


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
    assert any("TPR@1%FPR" in line and "Bonferroni" in line for line in report["summary"]["lines"])
    notes = report["membership_inference"]["notes"]
    assert any("class histogram" in n for n in notes) and any("Bonferroni" in n for n in notes)
    # iid clients: every member matched; the pooled 3600 members outnumber the 2000 test images per class
    by_target = {a["target"]: a for a in report["membership_inference"]["attacks"]}
    assert by_target["set of client 0"]["members"] == by_target["set of client 0"]["non_members"] == 1800
    assert any(n.startswith("global model: too few test images") for n in notes)
    assert "fpr_at_1pct_heldout" in html and "tpr_at_1pct_p_value" in html
    check_layout_and_csv(report, tmp_path / "out")


def class_only_auc(labels_in, labels_out, seed):
    """AUC of a score blind to the record: +1 for class 0, plus noise."""
    rng = np.random.default_rng(seed)
    score = [(np.asarray(y) == 0) + rng.standard_normal(len(y)) for y in (labels_in, labels_out)]
    return auc(*roc_curve(*score)[:2])


def test_class_matched_non_members_keep_a_class_only_score_at_chance():
    test_labels = np.repeat(np.arange(10), 200)  # a class-balanced test split
    skewed = np.r_[np.zeros(150, int), np.repeat(np.arange(1, 10), 10)]  # a non-IID client: 62 % class 0
    matched, balanced = [], []
    for seed in range(10):
        mi, ni, capped = class_matched_indices(skewed, test_labels, seed)
        assert capped == {} and mi.size == ni.size == skewed.size and np.unique(ni).size == ni.size
        assert np.array_equal(np.bincount(skewed[mi], minlength=10), np.bincount(test_labels[ni], minlength=10))
        matched.append(class_only_auc(skewed[mi], test_labels[ni], seed))
        old = np.random.default_rng(seed).permutation(test_labels.size)[:skewed.size]  # the former draw
        balanced.append(class_only_auc(skewed, test_labels[old], seed))
    assert abs(np.mean(matched) - 0.5) < 0.03
    assert np.mean(balanced) > 0.6  # class alone passed for membership before


def test_members_of_a_class_the_pool_cannot_match_are_capped_and_named():
    members = np.r_[np.zeros(300, int), np.ones(50, int)]
    pool = np.r_[np.zeros(120, int), np.ones(500, int), np.full(500, 2)]
    mi, ni, capped = class_matched_indices(members, pool, 0)
    assert capped == {0: (300, 120)}
    assert np.bincount(members[mi]).tolist() == np.bincount(pool[ni]).tolist() == [120, 50]
    assert np.unique(mi).size == mi.size and np.unique(ni).size == ni.size  # without replacement
    assert "class 0: 120 of 300" in cap_note("set of client 3", capped) and cap_note("x", {}) is None


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
    assert 0 <= row["empirical_epsilon_lb"] <= row["ceiling"] and row["confidence_one_run"] == 0.95
    assert "<th>ceiling</th>" in html and "<th>confidence_clopper_pearson</th>" in html
    assert any("(ceiling " in line and "confidence 95%" in line for line in report["summary"]["lines"])
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
    check_layout_and_csv(report, tmp_path / "out")
    assert {r["table"] for r in csv.DictReader(open(tmp_path / "out" / "report.csv", newline=""))} == {
        "membership_inference", "backdoor", "dp_canary_audit", "dp_membership_attacks"}


def test_report_escapes_every_text_and_the_console_prints_the_html_verdicts(tmp_path, monkeypatch, capsys):
    import attacks.audit as audit

    evil = "<script>alert(1)</script>"
    report = {"source": f"runs/{evil}", "config": {"name": evil},
              "summary": {"lines": [f"t: leaks {evil}", "b: p <= 0.05 & more"]},
              "membership_inference": {"notes": [evil], "attacks": [
                  {"target": evil, "attack": "loss", "auc": 0.5, "tpr_at_1pct_ci": [0.0, 0.1]}]},
              "backdoor": {"rows": [{"name": evil, "asr": 0.1, "cta": 0.9}]}, "dp_audit": {}}
    page = render_html(report, {"Backdoor": ["AAAA"]})
    assert "<script" not in page and page.count("&lt;script&gt;") >= 6
    assert "<li>t: leaks &lt;script&gt;alert(1)&lt;/script&gt;</li>" in page and "p &lt;= 0.05 &amp; more" in page
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: report)
    audit.main(["x.json", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == verdict_lines(report) == report["summary"]["lines"]


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

    def row(p, n=1000, name="a"):
        return {"attack": name, "non_members": n, "tpr_at_1pct_p_value": p}

    assert low_fpr_verdict([row(1e-6, n=200)]).startswith("inconclusive")
    assert low_fpr_verdict([row(1e-6, name="lira")] + [row(0.5)] * 4).startswith("leaks at low FPR (lira")
    # p = 0.02 clears 0.05 for one attack but not 0.05 / 6 once the best of six is picked
    assert low_fpr_verdict([row(0.02)]).startswith("leaks")
    verdict = low_fpr_verdict([row(0.02)] + [row(0.5)] * 5)
    assert verdict.startswith("no evidence") and "Bonferroni over 6" in verdict
    with pytest.raises(ValueError):
        low_fpr_verdict([])


def test_canary_line_says_when_the_audit_could_not_have_shown_anything():
    from attacks.audit import canary_line

    row = {"target": "dp-dm", "canaries": "mislabel x 200", "included": 97, "runs": 1, "guesses": 40,
           "empirical_epsilon_lb": 0.0, "ceiling": 2.548, "confidence": 0.95, "claimed_epsilon": 4.0, "delta": 1e-5}
    line = canary_line(row)
    assert "lower bound 0.000 (ceiling 2.548, confidence 95%) vs accountant epsilon 4.000" in line
    assert "shows nothing" in line
    assert "consistent with the accountant" in canary_line(row | {"claimed_epsilon": 2.0})
    assert "EXCEEDS" in canary_line(row | {"empirical_epsilon_lb": 2.5, "claimed_epsilon": 2.0})
