"""``flower-supernode`` that runs only the apps its data holder approved.

Usage (every argument but ``--approved-apps`` goes to Flower's ``flower-supernode`` unchanged)::

    python -m client.supernode --approved-apps FILE --superlink HOST:PORT --node-config '...' ...

``FILE`` is the node's allowlist of FAB hashes (:mod:`client.approval`; ``python -m
client.approval add FILE <app>`` approves an app). When a message of a run the node does not know
arrives, Flower fetches the run's FAB; this hook checks its hash against ``FILE`` before the FAB
is fetched, checks the fetched bytes hash to it, and otherwise answers with Flower's own
verification error reply (``FAB_VERIFICATION_ERROR``, the reply ``--trusted-entities`` sends for
an unverified FAB) and logs the refused hash. A refused FAB is never stored in the node state, so
no ClientApp process can get it, and the message's content is never pulled.

Why a hook: ``--trusted-entities`` accepts only ed25519-signed Flower Hub FABs; a FAB submitted
with ``flwr run <dir>`` carries no signatures, so it cannot serve a node that must run offline.
The hook replaces one Flower-internal function (``start_client_internal._pull_and_store_message``)
with a wrapper around it, so it is pinned to the Flower version it was read from: importing this
module raises ``RuntimeError`` when Flower or the hooked internals differ.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import sys
from logging import ERROR, INFO, WARN
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import flwr
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from .approval import AllowlistError, Approvals, read_allowlist

FLOWER_VERSION = "1.42.0"
HOOKED = "_pull_and_store_message"
HOOKED_PARAMS = ("state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
                 "confirm_message_received", "trusted_entities")
INSERT_PARAMS = ("msg", "state", "store")


def check_flower() -> ModuleType:
    """Flower's ``start_client_internal`` module, once it is the one this hook was written for.

    Checked: the version; the hooked function's parameters; that the node's main loop calls it by
    its module-global name (so replacing the attribute takes effect); the error reply and the
    function that stores it; and that ``flower-supernode`` runs that main loop.
    """
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the package shadows it by a function
    sci = importlib.import_module("flwr.supernode.start_client_internal")

    problems = []
    if flwr.__version__ != FLOWER_VERSION:
        problems.append(f"Flower is {flwr.__version__}")
    hooked = getattr(sci, HOOKED, None)
    original = getattr(hooked, "__wrapped__", hooked)
    if not callable(original) or tuple(inspect.signature(original).parameters) != HOOKED_PARAMS:
        problems.append(f"{HOOKED} is missing or does not take {HOOKED_PARAMS}")
    loop = getattr(getattr(sci, "start_client_internal", None), "__code__", None)
    if loop is None or HOOKED not in loop.co_names:
        problems.append(f"start_client_internal no longer calls {HOOKED}")
    insert = getattr(sci, "_insert_message", None)
    if not callable(insert) or tuple(inspect.signature(insert).parameters) != INSERT_PARAMS:
        problems.append(f"_insert_message is missing or does not take {INSERT_PARAMS}")
    error = getattr(sci, "FAB_VERIFICATION_ERROR", None)
    if getattr(error, "code", None) != ErrorCode.INVALID_FAB:
        problems.append("FAB_VERIFICATION_ERROR is missing or not an INVALID_FAB error")
    if getattr(cli, "start_client_internal", None) is not getattr(sci, "start_client_internal", None):
        problems.append("flower-supernode no longer runs start_client_internal")
    if problems:
        raise RuntimeError(f"client.supernode hooks Flower {FLOWER_VERSION} internals "
                           f"(flwr/supernode/start_client_internal.py), and here {'; '.join(problems)}. "
                           "Re-read that file and update client/supernode.py before running a node with it.")
    return sci


SCI = check_flower()


class _Refused(Exception):
    """Raised inside Flower's pull step to leave it before the FAB is stored (caught by the wrapper)."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(reason)
        self.digest, self.reason = digest, reason


def guarded(original: Callable[..., int | None], approvals: Approvals) -> Callable[..., int | None]:
    """``original`` (Flower's pull-and-store step) admitting only FABs ``approvals`` approves.

    The FAB is checked where Flower fetches it (``get_fab``), which comes before it is parsed,
    stored or run: first the hash the run names (so an unapproved FAB is not even downloaded),
    then the hash of the bytes received. A refusal is answered as Flower answers a FAB that fails
    ``--trusted-entities``: an error reply to the message, inserted with Flower's own function.
    """

    def _pull_and_store_message(state: Any, object_store: Any, node_config: Any, receive: Callable,
                                get_run: Callable, get_fab: Callable, pull_object: Callable,
                                confirm_message_received: Callable, trusted_entities: Any) -> int | None:
        received: list[Message] = []

        def receive_and_keep() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def get_approved_fab(digest: str, run_id: int) -> Any:
            if (reason := approvals.refusal(digest)) is not None:
                raise _Refused(digest, reason)
            fab = get_fab(digest, run_id)
            actual = hashlib.sha256(fab.content).hexdigest()
            if actual != str(digest).lower():
                raise _Refused(actual, f"the FAB received hashes to {actual}, not to the run's {digest}")
            return fab

        try:
            return original(state=state, object_store=object_store, node_config=node_config,
                            receive=receive_and_keep, get_run=get_run, get_fab=get_approved_fab,
                            pull_object=pull_object, confirm_message_received=confirm_message_received,
                            trusted_entities=trusted_entities)
        except _Refused as refused:
            message = received[-1]
            log(ERROR, "Refused app %s for run %s: %s. An error reply has been generated.",
                refused.digest, message.metadata.run_id, refused.reason)
            SCI._insert_message(Message(SCI.FAB_VERIFICATION_ERROR, reply_to=message), state, object_store)
            return message.metadata.run_id

    _pull_and_store_message.__wrapped__ = original  # type: ignore[attr-defined]
    return _pull_and_store_message


def install(approvals: Approvals) -> None:
    """Put the guard in place of Flower's pull step (replacing an earlier guard, never stacking)."""
    current = getattr(SCI, HOOKED)
    setattr(SCI, HOOKED, guarded(getattr(current, "__wrapped__", current), approvals))


def _use_this_environment() -> None:
    """Flower starts ``flower-superexec`` by name: take the one next to this interpreter."""
    here = Path(sys.executable).parent
    if (here / "flower-superexec").exists():
        os.environ["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")])


def main(argv: list[str] | None = None) -> None:
    """Parse ``--approved-apps``, install the guard, then run Flower's ``flower-supernode`` main."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode", allow_abbrev=False,
                                     description="flower-supernode that runs only approved apps; every other "
                                                 "argument goes to flower-supernode (see its --help).")
    parser.add_argument("--approved-apps", required=True, metavar="FILE",
                        help="allowlist of approved FAB hashes (python -m client.approval add FILE <app>)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    approvals = Approvals(Path(args.approved_apps).expanduser().resolve())
    try:
        log(INFO, "Approved apps (%s): %d", approvals.path, len(read_allowlist(approvals.path)))
    except AllowlistError as err:
        log(ERROR, "%s: this node refuses every app until the file approves one", err)
    if "--allow-runtime-dependency-installation" in rest:
        log(WARN, "Runtime dependency installation is on: an approved app may install packages its hash does "
                  "not pin (docs/reliability.md, 'What a node accepts')")
    install(approvals)
    _use_this_environment()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
