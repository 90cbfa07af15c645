"""What a node accepts: only approved apps (FAB hash allowlist, hooked into Flower's own pull
step), tasks within its own limits, a global model shaped like its own network, and data it named."""

from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import flwr
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode.nodestate import NodeStateFactory
from tests.flower_fixtures import flower_task_identity, make_context, task_identity, with_metadata  # noqa: F401

import client.supernode as supernode
from client import approval
from client.app import app
from client.limits import NodeLimits, available_cpus
from client.local import build_network, expected_state
from client.private import Declined, private_round
from client.task import NODE_DATASETS_ENV, DistillTask, dataset_refusal, load_partition

SCI = supernode.SCI
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "holder"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""
NODE = {"partition-id": 1, "num-partitions": 4}
TINY = {"iterations": 2, "ipc": 2, "dm.batch-real": 16, "net-width": 8, "net-depth": 2}
DP = {**TINY, "dp": "dp-dm", "sigma": 1.0}


@pytest.fixture(autouse=True)
def no_named_datasets(monkeypatch):
    """The node's environment names no dataset unless a test says so."""
    monkeypatch.delenv(NODE_DATASETS_ENV, raising=False)


# ---------------------------------------------------------------- approved apps

def _app_dir(root: Path, body: str = "app = None\n") -> Path:
    app_dir = root / "tinyapp"
    (app_dir / "tinyapp").mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT)
    (app_dir / "tinyapp" / "__init__.py").write_text("")
    (app_dir / "tinyapp" / "client.py").write_text(body)
    (app_dir / "tinyapp" / "server.py").write_text("app = None\n")
    return app_dir


def _allowlist(path: Path, *digests: str) -> approval.Approvals:
    path.write_text(approval.HEADER + "".join(f"{d} test app\n" for d in digests))
    return approval.Approvals(path)


class Link:
    """What Flower's Fleet connection hands the pull step, faked: one message of one new run."""

    def __init__(self, fab: bytes, run_hash: str | None = None, run_id: int = 5) -> None:
        with flower_task_identity():
            sent = Message(RecordDict({"config": ConfigRecord({"iterations": 2})}), dst_node_id=7,
                           message_type=MessageType.TRAIN, group_id="1", ttl=3600.0)
        msg = with_metadata(sent, run_id=run_id, src_node_id=1, src_task_id=1)
        msg = with_metadata(msg, message_id=msg.object_id)  # as the SuperLink sets it
        self.message, self.tree, self.objects = msg, get_object_tree(msg), get_all_nested_objects(msg)
        self.fab, self.run = fab, Run.create_empty(run_id)
        self.run.fab_hash, self.run.primary_task_type = run_hash or hashlib.sha256(fab).hexdigest(), "client-app"
        self.fetched: list[str] = []
        self.pulled: list[str] = []

    def get_fab(self, digest: str, run_id: int) -> Fab:
        self.fetched.append(digest)
        return Fab(digest, self.fab, {})

    def pull_object(self, run_id: int, object_id: str) -> bytes:
        self.pulled.append(object_id)
        return self.objects[object_id].deflate()

    def pull_and_store(self, step, state, store) -> int | None:
        return step(state=state, object_store=store, node_config={}, get_run=lambda run_id: self.run,
                    receive=lambda: (remove_content_from_message(self.message), self.tree), get_fab=self.get_fab,
                    pull_object=self.pull_object, confirm_message_received=lambda run_id, message_id: None,
                    trusted_entities=None)


def _node():
    stores = ObjectStoreFactory()
    state = NodeStateFactory(objectstore_factory=stores).state()
    state.set_node_id(7)
    return state, stores.store()


def _original():
    step = getattr(SCI, supernode.HOOKED)
    return getattr(step, "__wrapped__", step)


@pytest.fixture(scope="module")
def fab(tmp_path_factory) -> bytes:
    return build_fab_from_disk(_app_dir(tmp_path_factory.mktemp("app")))


def test_an_approved_fab_is_stored_and_its_message_pulled(fab, tmp_path):
    link, (state, store) = Link(fab), _node()
    step = supernode.guarded(_original(), _allowlist(tmp_path / "ok.txt", hashlib.sha256(fab).hexdigest()))
    assert link.pull_and_store(step, state, store) == 5
    assert state.get_fab(link.run.fab_hash).content == fab and state.get_run(5) is not None
    assert link.pulled and len(state.get_messages_legacy(is_reply=False)) == 1
    assert not state.get_messages_legacy(is_reply=True)


@pytest.mark.parametrize("case", ["unapproved", "bytes-differ"])
def test_an_unapproved_fab_is_refused_before_storage_with_flowers_error_reply(case, fab, tmp_path, monkeypatch):
    logged: list[tuple] = []
    monkeypatch.setattr(supernode, "log", lambda *args: logged.append(args))
    if case == "unapproved":  # the run names a FAB the holder never approved
        link, approved = Link(fab), "0" * 64
    else:  # the run names an approved hash, the bytes that come are other bytes
        link = Link(fab + b"\0", run_hash=hashlib.sha256(fab).hexdigest())
        approved = link.run.fab_hash
    state, store = _node()
    step = supernode.guarded(_original(), _allowlist(tmp_path / "ok.txt", approved))
    assert link.pull_and_store(step, state, store) == 5
    assert state.get_fab(link.run.fab_hash) is None and state.get_fab(hashlib.sha256(link.fab).hexdigest()) is None
    assert state.get_run(5) is None and not link.pulled  # nothing stored, the message's content never pulled
    assert link.fetched == ([] if case == "unapproved" else [approved])  # unapproved: not even downloaded
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == SCI.FAB_VERIFICATION_ERROR.reason
    assert reply.metadata.reply_to_message_id == link.message.metadata.message_id
    refused = hashlib.sha256(link.fab).hexdigest()
    assert any(refused in " ".join(map(str, entry)) for entry in logged), logged


@pytest.mark.parametrize("content", [None, "", approval.HEADER, "# nothing\n\n", "abc123 truncated\n",
                                     "0" * 64 + " ok\nnot-a-hash\n", b"\xff\xfe"])
def test_a_missing_empty_or_broken_allowlist_refuses_every_app(content, fab, tmp_path):
    path = tmp_path / "approved.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    approvals = approval.Approvals(path)
    assert "every app is refused" in approvals.refusal(hashlib.sha256(fab).hexdigest())
    with pytest.raises(approval.AllowlistError):
        approval.read_allowlist(path)
    link, (state, store) = Link(fab), _node()
    link.pull_and_store(supernode.guarded(_original(), approvals), state, store)
    assert state.get_fab(link.run.fab_hash) is None and state.get_messages_legacy(is_reply=True)[0].has_error()


def test_a_directory_as_allowlist_refuses_every_app(tmp_path):
    assert "every app is refused" in approval.Approvals(tmp_path).refusal("0" * 64)


def test_the_hook_is_pinned_to_this_flower(monkeypatch):
    assert flwr.__version__ == supernode.FLOWER_VERSION
    original = _original()
    assert tuple(inspect.signature(original).parameters) == supernode.HOOKED_PARAMS
    guard = supernode.guarded(original, approval.Approvals(Path("/nonexistent")))
    assert tuple(inspect.signature(guard).parameters) == supernode.HOOKED_PARAMS
    assert supernode.check_flower() is SCI
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(RuntimeError, match="Flower is 1.43.0"):
        supernode.check_flower()
    monkeypatch.setattr(flwr, "__version__", supernode.FLOWER_VERSION)
    monkeypatch.setattr(SCI, supernode.HOOKED, lambda state, object_store, receive: None)
    with pytest.raises(RuntimeError, match="does not take"):
        supernode.check_flower()
    monkeypatch.setattr(SCI, supernode.HOOKED, original)
    monkeypatch.setattr(SCI, "FAB_VERIFICATION_ERROR", None)
    with pytest.raises(RuntimeError, match="FAB_VERIFICATION_ERROR"):
        supernode.check_flower()


def test_install_puts_the_guard_where_the_node_loop_calls_it_without_stacking(tmp_path, monkeypatch):
    original = _original()
    monkeypatch.setattr(SCI, supernode.HOOKED, original)  # restored after the test
    supernode.install(approval.Approvals(tmp_path / "a.txt"))
    supernode.install(approval.Approvals(tmp_path / "b.txt"))
    installed = getattr(SCI, supernode.HOOKED)
    assert installed is not original and installed.__wrapped__ is original
    assert supernode.HOOKED in SCI.start_client_internal.__code__.co_names


def test_the_supernode_cli_needs_an_allowlist():
    with pytest.raises(SystemExit):
        supernode.main(["--superlink", "127.0.0.1:9092"])


def test_the_hash_the_cli_prints_is_the_fab_hash_flwr_run_sends(tmp_path, capsys, monkeypatch):
    """``flwr run <dir>``'s own code path, with the SuperLink replaced by a recorder."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.proto.control_pb2 import StartRunResponse

    flwr_run = importlib.import_module("flwr.cli.run.run")  # the package shadows it by a function
    app_dir = _app_dir(tmp_path)
    assert approval.main(["hash", str(app_dir)]) == 0
    printed = capsys.readouterr().out.strip()
    sent = []
    client = SimpleNamespace(StartRun=lambda req: sent.append(req) or StartRunResponse(run_id=1), close=lambda: None)
    monkeypatch.setattr(flwr_run, "init_http_client_from_connection", lambda connection: client)
    config, _ = load_and_validate(app_dir / "pyproject.toml")
    flwr_run._run_with_control_api(app_dir, config, None, SimpleNamespace(federation=None, options=None),
                                   None, None, False, False, None)
    (req,) = sent
    assert printed == req.fab.hash_str == hashlib.sha256(req.fab.content).hexdigest()
    # deterministic: same files, new timestamps, same hash; one byte changed, another hash
    for f in app_dir.rglob("*.py"):
        f.touch()
    assert approval.hash_source(app_dir) == printed
    fab_file = tmp_path / "app.fab"
    fab_file.write_bytes(req.fab.content)
    assert approval.hash_source(fab_file) == printed
    (app_dir / "tinyapp" / "client.py").write_text("app = 1\n")
    assert approval.hash_source(app_dir) != printed


def test_add_approves_once_and_list_shows_it(tmp_path, capsys):
    app_dir, path = _app_dir(tmp_path), tmp_path / "approved.txt"
    assert approval.main(["add", str(path), str(app_dir), "--label", "reviewed by the holder"]) == 0
    assert approval.main(["add", str(path), str(app_dir)]) == 0
    digest = approval.hash_source(app_dir)
    assert list(approval.read_allowlist(path)) == [digest] and path.read_text().count(digest) == 1
    assert approval.Approvals(path).refusal(digest) is None
    capsys.readouterr()
    assert approval.main(["list", str(path)]) == 0 and "reviewed by the holder" in capsys.readouterr().out
    path.write_text("broken\n")
    assert approval.main(["add", str(path), str(app_dir)]) == 1  # never extends a broken list
    assert approval.main(["list", str(tmp_path / "none.txt")]) == 1


# ---------------------------------------------------------------- limits

def _message(config: dict, msg_type: str = MessageType.TRAIN, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(DistillTask.from_config(config).to_config())})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=7, message_type=msg_type, group_id="1")


def _declined(reply: Message) -> str:
    assert not reply.has_error() and "declined" in reply.content, reply
    assert reply.content["declined"]["kind"] == "policy" and reply.content["metrics"]["declined"] == 1
    return str(reply.content["declined"]["reason"])


def test_default_limits_are_documented_and_a_misspelt_limit_is_an_error():
    limits = NodeLimits.from_node_config({})
    assert (limits.threads, limits.iterations, limits.ipc, limits.model_mib, limits.local_epochs,
            limits.batch_size) == (available_cpus(), 20_000, 50, 64, 50, 1024)
    assert NodeLimits.from_node_config({"limit-threads": "2"}).threads_for(8) == 2
    for bad in ({"limit-iteration": 5}, {"limit-ipc": 0}, {"limit-ipc": "many"}, {"limit-threads": 1.5}):
        with pytest.raises(ValueError, match="limit"):
            NodeLimits.from_node_config(bad)


def test_threads_are_cut_to_the_node_limit(task_identity):  # noqa: F811
    before = torch.get_num_threads()
    try:
        node = {**NODE, "limit-threads": 1, "limit-iterations": 1}  # declined after threads are set: fast
        _declined(app(_message({**TINY, "client-threads": 3}), make_context(7, node)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("config, node, reason", [
    ({**TINY, "iterations": 30_000}, {}, "iterations 30000 > limit-iterations 20000"),
    ({**TINY, "ipc": 51}, {}, "ipc 51 > limit-ipc 50"),
    ({**TINY, "iterations": 11}, {"limit-iterations": 10}, "iterations 11 > limit-iterations 10"),
    ({**TINY, "ipc": 3}, {"limit-ipc": 2}, "ipc 3 > limit-ipc 2"),
    ({**DP, "ipc": 3}, {"limit-ipc": 2}, "ipc 3 > limit-ipc 2"),
    ({**TINY, "algorithm": "fedavg", "local-epochs": 51}, {}, "local-epochs 51 > limit-local-epochs 50"),
    ({**TINY, "algorithm": "fedavg", "local-epochs": 3}, {"limit-local-epochs": 2},
     "local-epochs 3 > limit-local-epochs 2"),
    ({**TINY, "algorithm": "fedavg", "local-batch-size": 2000}, {}, "local-batch-size 2000 > limit-batch-size 1024"),
    ({**TINY, "dm.batch-real": 17}, {"limit-batch-size": 16}, "dm.batch-real 17 > limit-batch-size 16"),
    ({**TINY, "method": "mtt", "mtt.expert-batch": 2048}, {}, "mtt.expert-batch 2048 > limit-batch-size 1024"),
    ({**TINY, "method": "dc", "dc.inner-loop": 1001}, {}, "dc.inner-loop 1001 > limit-steps 1000"),
    ({**TINY, "method": "bptt", "bptt.inner-steps": 21}, {"limit-steps": 20}, "bptt.inner-steps 21 > limit-steps 20"),
    ({**TINY, "method": "mtt", "mtt.num-experts": 100, "mtt.expert-train-epochs": 100}, {},
     "mtt.num-experts x (mtt.expert-train-epochs + 1) 10100 > limit-steps 1000"),
    ({**DP, "dp": "dp-mtt", "sample-rate": 1e-5}, {}, "the DP method's noisy queries 3000000 > limit-iterations"),
    ({**DP, "dp": "dpsgd-gm", "dpsgd-gm.chunk": 2000}, {}, "dpsgd-gm.chunk 2000 > limit-batch-size 1024"),
])
def test_a_task_over_the_node_limits_is_declined_with_the_limit_named(config, node, reason, task_identity,  # noqa: F811
                                                                      monkeypatch):
    monkeypatch.setattr("client.app.load_partition", _never)
    assert reason in _declined(app(_message(config), make_context(7, {**NODE, **node})))


def test_fedavg_bounds_apply_only_to_fedavg_rounds():
    """A distillation task never reads local-epochs or local-batch-size: a large one there is no work."""
    limits = NodeLimits.from_node_config({"limit-local-epochs": 2, "limit-batch-size": 16})
    big = {**TINY, "local-epochs": 3, "local-batch-size": 17}
    assert limits.refusal(DistillTask.from_config(big)) is None
    reason = limits.refusal(DistillTask.from_config({**big, "algorithm": "fedavg"}))
    assert reason is not None and "local-epochs 3 > limit-local-epochs 2" in reason
    assert "local-batch-size 17 > limit-batch-size 16" in reason


def _never(*args, **kwargs):
    raise AssertionError("data loaded for a task the node declines")


def _fedavg_model(width: int = 8, depth: int = 2) -> dict[str, torch.Tensor]:
    task = DistillTask.from_config({**TINY, "algorithm": "fedavg", "net-width": width, "net-depth": depth})
    return build_network(task, load_partition(task, NODE)[0].info).state_dict()


def test_expected_state_is_the_network_the_node_builds():
    task = DistillTask.from_config(TINY)
    info = load_partition(task, NODE)[0].info
    built = {k: (tuple(v.shape), v.dtype) for k, v in build_network(task, info).state_dict().items()}
    assert expected_state(task, info) == built


def _tampered(kind: str) -> ArrayRecord:
    state = _fedavg_model()
    first = next(iter(state))
    if kind == "wrong-shape":
        state[first] = torch.zeros(3, 3)
    elif kind == "wrong-dtype":
        state[first] = state[first].double()
    elif kind == "extra":
        state["backdoor.weight"] = torch.zeros(4)
    elif kind == "missing":
        del state[first]
    elif kind == "non-finite":
        state[first] = torch.full_like(state[first], float("nan"))
    elif kind == "too-large":
        state["pad"] = torch.zeros(2 * 2**20 // 4)  # 2 MiB over a 1 MiB limit
    record = ArrayRecord(state)
    if kind == "lying-bytes":  # declares the right shape, carries another array's bytes
        good = record[first]
        other = Array(np.zeros((2, 2), dtype=np.float32))
        record[first] = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=other.data)
    return record


@pytest.mark.parametrize("kind, reason", [
    ("wrong-shape", "this node's network has"), ("wrong-dtype", "this node's network has"),
    ("extra", "unexpected ['backdoor.weight']"), ("missing", "missing ["), ("non-finite", "non-finite"),
    ("too-large", "MiB > limit-model-mib 1"), ("lying-bytes", "decodes to something else"),
])
@pytest.mark.parametrize("algorithm", ["fedavg", "fedistill"])
def test_a_global_model_unlike_the_node_network_is_refused_before_it_is_loaded(kind, reason, algorithm,
                                                                                task_identity, monkeypatch):  # noqa: F811
    record = _tampered(kind)
    loaded = []
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: loaded.append(1))
    if kind == "too-large":  # refused on its size: not one array decoded
        monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("decoded an oversized model"))
    node = {**NODE, "limit-model-mib": 1}
    assert reason in _declined(app(_message({**TINY, "algorithm": algorithm}, arrays=record),
                                   make_context(7, node)))
    ev = app(_message(TINY, MessageType.EVALUATE, arrays=record), make_context(7, node))
    assert ev.content["metrics"]["declined"] == 1 and ev.content["metrics"]["num-examples"] == 0
    assert not loaded


def test_a_network_too_large_for_the_node_is_declined_without_being_built(task_identity):  # noqa: F811
    config = {**TINY, "net-width": 100_000, "net-depth": 3}  # ~670 GiB if it were allocated
    assert "net-width 100000" in _declined(app(_message(config), make_context(7, NODE)))


def test_a_matching_global_model_is_used(task_identity):  # noqa: F811
    record = ArrayRecord(_fedavg_model())
    reply = app(_message({**TINY, "algorithm": "fedavg"}, arrays=record), make_context(7, NODE))
    assert "arrays" in reply.content and reply.content["arrays"].keys() == record.keys()
    reply = app(_message(TINY, arrays=record), make_context(7, NODE))  # fedistill, iterative embedder
    assert "synthetic" in reply.content


def test_under_dp_a_matching_global_model_is_used_and_a_wrong_one_never_loaded(task_identity,  # noqa: F811
                                                                                monkeypatch):
    assert "synthetic" in app(_message(DP, arrays=ArrayRecord(_fedavg_model())), make_context(7, NODE)).content
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(Exception, match="refused"):  # after the charge: an error reply, the spend stands
        app(_message(DP, arrays=_tampered("wrong-shape")), make_context(8, NODE))


# ---------------------------------------------------------------- the node's data

@pytest.fixture
def opened(monkeypatch):
    """Every path numpy or Python opens, recorded."""
    seen: list[str] = []
    real_open, real_load = builtins.open, np.load

    def record_open(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    def record_load(file, *args, **kwargs):
        seen.append(str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", record_open)
    monkeypatch.setattr(np, "load", record_load)
    return seen


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), y_train=np.arange(60) % 10,
             x_test=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10))
    return path


@pytest.mark.parametrize("dataset", ["PATH", "cifar10", "../PATH"])
def test_a_dataset_the_node_did_not_name_is_refused_and_never_opened(dataset, tmp_path, opened, monkeypatch,
                                                                     task_identity):  # noqa: F811
    secret = _npz(tmp_path / "mnist.npz")
    monkeypatch.chdir(tmp_path)
    dataset = dataset.replace("PATH", str(secret) if dataset == "PATH" else secret.name)
    monkeypatch.setattr("client.task.load_dataset", _never)
    for config in (dict(TINY, dataset=dataset), dict(DP, dataset=dataset)):
        assert "node-config names" in _declined(app(_message(config), make_context(7, NODE)))
    ev = app(_message(dict(TINY, dataset=dataset), MessageType.EVALUATE, arrays=ArrayRecord(_fedavg_model())),
             make_context(7, NODE))
    assert ev.content["metrics"]["declined"] == 1
    out = private_round(DistillTask.from_config(dict(DP, dataset=dataset)), NODE, run_id=1, node_id=7, seed=0,
                        load=_never)
    assert isinstance(out, Declined) and out.kind == "policy"
    assert not [p for p in opened if "mnist.npz" in p or "cifar" in p], opened


def test_a_dataset_the_node_names_is_loaded(tmp_path, monkeypatch):
    path = _npz(tmp_path / "mnist.npz")
    task = DistillTask.from_config(dict(TINY, dataset=str(path), partitioner="iid"))
    assert dataset_refusal(task, NODE) is not None
    with pytest.raises(ValueError, match="node-config names"):
        load_partition(task, NODE)
    train, held = load_partition(task, {**NODE, "dataset": str(path)})
    assert len(train) + len(held) == 15  # a quarter of 60
    monkeypatch.setenv(NODE_DATASETS_ENV, str(tmp_path / "." / "mnist.npz"))  # the simulation route
    assert dataset_refusal(task, NODE) is None
    cifar = DistillTask.from_config(dict(TINY, dataset="CIFAR-10"))
    assert dataset_refusal(cifar, {**NODE, "dataset": "cifar10"}) is None
    assert dataset_refusal(DistillTask.from_config(TINY), NODE) is None  # the bundled sample
    assert dataset_refusal(task, {"data-path": "/own.npz"}) is None  # a data-path node uses its own file
