"""A real Flower deployment on 127.0.0.1 (simulations/deploy.py) that a data holder can trust.

Fast: the helpers (certificates and their renewal, holder-made keys, the staged app, the Fleet
proxy's path filter and framing, the ServerApp memory cap, stopping process trees), and one
loopback deployment (~25 s): TLS, node authentication through the Fleet-only proxy, a Control
call refused there and served on 127.0.0.1, an approved app run by one node and a one-byte-changed
app refused by the other. Slow (100-200 s each on this 2-core machine): whole fedistill runs,
insecure and secure (with a stranger key and a modified app refused), SIGTERM cleanup, and a
ServerApp killed by the memory cap mid-run and then resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulations.deploy import (GIB, Deployment, ServerAppWatchdog, TlsFiles, _alive, _main, cert_expiry,
                                cert_sans, check_public_key, descendants, ensure_certs, expiry_lines,
                                issue_server_cert, make_node_key, split_data, stage_app, stop_processes)
from simulations.fleet_proxy import (FLEET_PATHS, FleetProxy, HttpError, Limits, fleet_allowed, framing,
                                     parse_head, server_context, upstream_context)

TINY = "iterations=2 ipc=2 dm.batch-real=16 net-width=8 net-depth=2 server-epochs=2 fraction-evaluate=0.0"
ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).parent / "flwr")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree read from /proc")


@pytest.fixture
def one_thread(monkeypatch):
    """The deployment's processes inherit this: one torch thread each when the machine is shared."""
    if "FEDISTILL_TEST_THREADS" in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", os.environ["FEDISTILL_TEST_THREADS"])


# ---------------------------------------------------------------- certificates

def _tls_handshake_ok(files: TlsFiles, server_name: str) -> bool:
    """A TLS server with the SuperLink's files; a client that trusts only ca.crt and checks the name."""
    server_ctx = server_context(str(files.server_cert), str(files.server_key))
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError), server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")

        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as s:
                    return s.recv(2) == b"ok"
            except ssl.SSLCertVerificationError:
                return False


def test_certificates_make_a_tls_chain_that_127_0_0_1_and_localhost_verify(tmp_path):
    files = ensure_certs(tmp_path)
    assert {p.stat().st_mode & 0o777 for p in (files.ca_key, files.server_key)} == {0o600}
    assert {d.stat().st_mode & 0o777 for d in (files.ca_dir, files.superlink_dir)} == {0o700}
    assert _tls_handshake_ok(files, "127.0.0.1") and _tls_handshake_ok(files, "localhost")
    assert not _tls_handshake_ok(files, "link.example.org")
    again = ensure_certs(tmp_path)  # nothing changed: nothing made again
    assert again.server_cert.read_bytes() == files.server_cert.read_bytes()
    assert files.superlink_ca.read_bytes() == files.ca_cert.read_bytes()


def test_ca_key_is_kept_apart_from_everything_the_superlink_and_proxy_are_given(tmp_path):
    dep = Deployment([], workdir=tmp_path)
    dep.tls, dep.port, dep.public_port = ensure_certs(tmp_path), 9093, 9092
    assert sorted(p.name for p in dep.tls.superlink_dir.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    assert dep.tls.ca_key.parent == dep.tls.ca_dir and dep.tls.ca_dir != dep.tls.superlink_dir
    for cmd in (dep.superlink_command(), dep.proxy_command()):
        assert not [a for a in cmd if str(dep.tls.ca_dir) in a]  # neither ca.key nor its directory
    superlink = dep.superlink_command()
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in superlink
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink


def test_the_server_certificate_is_made_again_when_the_hosts_change(tmp_path):
    first = ensure_certs(tmp_path)
    ca = first.ca_cert.read_bytes()
    assert cert_sans(first.server_cert) == ("127.0.0.1", "localhost")
    files = ensure_certs(tmp_path, ["link.example.org", "203.0.113.7"])
    assert cert_sans(files.server_cert) == ("127.0.0.1", "203.0.113.7", "link.example.org", "localhost")
    assert _tls_handshake_ok(files, "link.example.org") and _tls_handshake_ok(files, "203.0.113.7")
    assert files.ca_cert.read_bytes() == ca  # the CA the nodes hold stays valid
    kept = files.server_cert.read_bytes()
    assert ensure_certs(tmp_path, ["LINK.example.org", "203.0.113.7"]).server_cert.read_bytes() == kept
    moved = ensure_certs(tmp_path, ["other.example.org"])
    assert "link.example.org" not in cert_sans(moved.server_cert)  # the stale name is gone
    assert _tls_handshake_ok(moved, "other.example.org") and not _tls_handshake_ok(moved, "link.example.org")


def test_expiry_is_reported_and_an_expiring_server_certificate_is_renewed(tmp_path, capsys):
    files = ensure_certs(tmp_path)
    issue_server_cert(files.ca_cert, files.ca_key, files.superlink_dir, ("127.0.0.1", "localhost"), days=0)
    soon = expiry_lines([files.server_cert])[0]
    assert "EXPIRED" in soon or "expires soon" in soon
    renewed = ensure_certs(tmp_path)
    assert (cert_expiry(renewed.server_cert) - cert_expiry(files.ca_cert)).days <= 0
    line = expiry_lines([renewed.server_cert])[0]
    assert "valid, not after" in line and "(89 days left)" in line
    assert _main(["certs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{files.ca_cert}: valid, not after" in out and f"{files.server_cert}: valid, not after" in out
    assert "127.0.0.1, localhost" in out


# ---------------------------------------------------------------- holder keys

def test_a_holder_makes_its_own_key_pair_and_only_the_public_key_is_accepted(tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    holder = tmp_path / "site-a"
    assert _main(["node-key", str(holder)]) == 0
    out = capsys.readouterr().out
    priv, pub = holder / "node", holder / "node.pub"
    assert f"send this to the operator: {pub}" in out
    assert priv.stat().st_mode & 0o777 == 0o600 and holder.stat().st_mode & 0o777 == 0o700
    key = serialization.load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(pub) == public_key_to_bytes(key.public_key())  # as `flwr supernode register`
    assert make_node_key(holder) == (priv, pub) and serialization.load_ssh_private_key(
        priv.read_bytes(), None).private_numbers() == key.private_numbers()  # kept: a node's identity is its key
    assert sorted(p.name for p in holder.iterdir()) == ["node", "node.pub"]
    check_public_key(pub)
    with pytest.raises(ValueError, match="PRIVATE key"):
        check_public_key(priv)
    with pytest.raises(ValueError, match="PRIVATE key"):  # the operator's command refuses it before any flwr call
        _main(["register", str(tmp_path / "srv"), str(priv)])


# ---------------------------------------------------------------- the Fleet proxy

def test_the_proxy_allows_exactly_flowers_fleet_routes():
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet

    assert FLEET_PATHS == {route.path for route in fleet.routes}  # fails loudly when Flower changes them
    assert all(route.methods == {"POST"} for route in fleet.routes)
    assert not any(fleet_allowed("POST", route.path) for route in control.routes)
    for path in ("/v1/runtime/push-messages", "/v1/runtime/acquire-task", "/health", "/docs", "/openapi.json",
                 "/v1/fleet/", "/v1/fleet/pull-messages/", "/v1/fleet/pull-messages?x=1",
                 "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run", "//v1/fleet/get-run",
                 "/V1/FLEET/get-run", "http://127.0.0.1/v1/fleet/get-run", "/v1/fleet/get-run#x"):
        assert not fleet_allowed("POST", path), path
    assert fleet_allowed("POST", "/v1/fleet/pull-messages")
    assert not fleet_allowed("GET", "/v1/fleet/pull-messages") and not fleet_allowed("post", "/v1/fleet/get-run")


class _Upstream(BaseHTTPRequestHandler):
    """A stand-in SuperLink: records each request and answers with its body's sha256."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        answer = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


def _raw(port: int, ca: Path, data: bytes) -> bytes:
    """Send raw bytes over TLS; the whole answer (the proxy closes after a refusal)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_the_proxy_streams_fleet_requests_through_and_refuses_everything_else(tmp_path):
    files = ensure_certs(tmp_path)
    body = os.urandom(3 * 2**20)
    auth = {"flwr-public-key": "cHVibGlj", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
    with _proxy_in_front_of_a_stub(files, Limits(max_body=4 * 2**20)) as (port, proxy):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                           context=ssl.create_default_context(cafile=str(files.ca_cert)))
        conn.request("POST", "/v1/fleet/push-object", body=body, headers=auth)
        res = conn.getresponse()
        assert (res.status, res.read()) == (200, hashlib.sha256(body).hexdigest().encode())
        conn.request("POST", "/v1/fleet/pull-messages", body=iter([b"abc", b"", b"defg"]), encode_chunked=True,
                     headers={"transfer-encoding": "chunked"})  # the same kept-alive connection, a chunked body
        res = conn.getresponse()
        assert (res.status, res.read()) == (200, hashlib.sha256(b"abcdefg").hexdigest().encode())
        conn.request("POST", "/v1/control/start-run", body=b"x")
        res = conn.getresponse()
        assert res.status == 403 and b"only Flower's Fleet API" in res.read()
        conn.close()
        ca = files.ca_cert
        assert _raw(port, ca, b"GET /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert _raw(port, ca, b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                              b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert _raw(port, ca, b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                              b"content-length: 6\r\n\r\nabcdef").startswith(b"HTTP/1.1 400")
        assert _raw(port, ca, b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                    % (5 * 2**20)).startswith(b"HTTP/1.1 413")
        assert _raw(port, ca, b"POST /v1/fleet/get-run HTTP/1.1\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n"
                    ).startswith(b"HTTP/1.1 431")
        assert _raw(port, ca, b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\n folded: y\r\n\r\n"
                    ).startswith(b"HTTP/1.1 400")
    assert [path for path, _, _ in _Upstream.seen] == ["/v1/fleet/push-object", "/v1/fleet/pull-messages"]
    _, headers, seen_body = _Upstream.seen[0]
    assert seen_body == body and all(headers[k] == v for k, v in auth.items())  # node auth passes unchanged
    assert proxy.counts == {"forwarded": 2, "refused": 7}


@contextlib.contextmanager
def _proxy_in_front_of_a_stub(files: TlsFiles | None, limits: Limits):
    """The proxy on its own event loop thread in front of :class:`_Upstream`, TLS on both hops
    (``files``) or none (tests about HTTP alone); yields its port and the proxy (its connection
    table and counts)."""
    _Upstream.seen = []
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    if files is not None:
        upstream.socket = server_context(str(files.server_cert), str(files.server_key)).wrap_socket(
            upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    loop = asyncio.new_event_loop()
    proxy = FleetProxy("127.0.0.1", upstream.server_address[1],
                       upstream_context(str(files.superlink_ca)) if files else None, limits, log=lambda msg: None)
    tls = server_context(str(files.server_cert), str(files.server_key)) if files else None
    server = loop.run_until_complete(proxy.serve("127.0.0.1", 0, tls))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1], proxy
    finally:
        asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(5)  # no handler left for a closed loop
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
        upstream.shutdown()


def _plain_proxy(limits: Limits):
    """:func:`_proxy_in_front_of_a_stub` without TLS."""
    return _proxy_in_front_of_a_stub(None, limits)


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _plain(port: int, data: bytes) -> bytes:
    """Send raw bytes in clear; the whole answer (the proxy closes after a refusal or connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


REQUEST = b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"


def test_a_header_name_with_a_newline_and_a_non_ascii_length_are_refused_with_400():
    with pytest.raises(HttpError) as err:  # `$` used to match before the trailing newline
        parse_head(b"POST /v1/fleet/get-run HTTP/1.1\r\nX-A\n: v\r\n\r\n")
    assert err.value.status == 400
    for length in ("\u00b2", "\u0663", "1" * 16, "+5", "-1", " ", "0x10"):  # "²" and "٣" pass str.isdigit()
        head = parse_head(b"POST /v1/fleet/get-run HTTP/1.1\r\ncontent-length: " + length.encode("utf-8")
                          + b"\r\n\r\n")
        with pytest.raises(HttpError) as err:
            framing(head, request=True)
        assert err.value.status == 400, length
    assert framing(parse_head(b"POST / HTTP/1.1\r\ncontent-length: 007\r\n\r\n"), True) == ("length", 7)
    with _plain_proxy(Limits()) as (port, proxy):
        assert _plain(port, REQUEST + b"X-A\n: v\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert _plain(port, REQUEST + "content-length: \u00b2\r\n\r\n".encode("utf-8")).startswith(b"HTTP/1.1 400")
        assert _plain(port, REQUEST + b"content-length: 3\r\n\r\nabc").startswith(b"HTTP/1.1 200")
    assert [body for _, _, body in _Upstream.seen] == [b"abc"] and proxy.counts == {"forwarded": 1, "refused": 2}


def test_chunked_trailers_are_capped():
    chunked = REQUEST + b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    with _plain_proxy(Limits()) as (port, _):
        assert _plain(port, chunked + b"x-t: 1\r\nx-u: 2\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert _plain(port, chunked + b"x-t: 1\r\n" * 17 + b"\r\n").startswith(b"HTTP/1.1 431")
        assert _plain(port, chunked + (b"x-t: " + b"a" * 1000 + b"\r\n") * 9 + b"\r\n").startswith(b"HTTP/1.1 431")
    assert [body for _, _, body in _Upstream.seen][0] == b"abc"


def test_one_address_may_hold_only_max_per_ip_connections():
    with _plain_proxy(Limits(max_per_ip=2)) as (port, proxy):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            _until(lambda: proxy.per_ip.get("127.0.0.1") == 2)
            refused = _plain(port, b"")  # answered at once; a peer that sent bytes may see a reset instead
            assert refused.startswith(b"HTTP/1.1 503") and b"from this address" in refused
            held.pop().close()
            _until(lambda: proxy.per_ip.get("127.0.0.1") == 1)
            assert _plain(port, REQUEST + b"content-length: 0\r\n\r\n").startswith(b"HTTP/1.1 200")
        finally:
            for s in held:
                s.close()
        _until(lambda: not proxy.per_ip)  # every slot given back
    assert proxy.counts == {"forwarded": 1, "refused": 1}


def test_a_body_trickled_in_slower_than_the_deadline_is_cut_with_408():
    """Each byte arrives well within the per-read timeout (5 s); the body is not whole by the deadline
    (0.5 s), so the answer is 408 at the deadline, not a silent drop 5 s after the last byte."""
    with _plain_proxy(Limits(request_timeout=0.5, read_timeout=5.0)) as (port, proxy):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(REQUEST + b"content-length: 100\r\n\r\n")
            start = time.monotonic()
            for _ in range(4):  # stops before the deadline: no unread bytes to turn the close into a reset
                s.sendall(b"x")
                time.sleep(0.08)
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 2.5
    assert proxy.counts == {"forwarded": 0, "refused": 1}


def test_the_proxy_cli_defaults_are_bounded():
    assert Limits().max_body == 16 * 2**20 > 5 * 2**20 + 64 * 1024  # one of Flower's array chunks, with framing
    assert (Limits().request_timeout, Limits().max_per_ip) == (120.0, 16)
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE <= 5 * 2**20  # fails loudly when Flower's chunks grow


def test_serve_refuses_insecure_on_a_public_address_unless_asked(tmp_path, capsys):
    from simulations.deploy import is_loopback

    for bind in ("0.0.0.0", "192.0.2.1", "::", "example.org"):
        with pytest.raises(SystemExit) as exit_:
            _main(["serve", str(tmp_path), "--insecure", "--bind", bind])
        assert exit_.value.code == 2 and "--insecure-public" in capsys.readouterr().err
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
    assert not list(tmp_path.iterdir())  # refused before anything was made or started


def test_partition_nodes_are_named_the_runs_dataset(tmp_path):
    from flwr.common.config import parse_config_args

    from simulations.deploy import node_configs_for, run_config_dataset

    assert run_config_dataset([]) == "mnist10k"  # the app's default (the bundled sample)
    assert run_config_dataset(['ipc=2 dataset="cifar10"', "iterations=3"]) == "cifar10"
    assert run_config_dataset(['dataset="/data/a b.npz"']) == "/data/a b.npz"
    configs = node_configs_for(2, "partition", tmp_path, "/data/a b.npz")
    assert [parse_config_args([c]) for c in configs] == [
        {"partition-id": i, "num-partitions": 2, "dataset": "/data/a b.npz"} for i in range(2)]
    assert node_configs_for(2, "partition", tmp_path) == ["partition-id=0 num-partitions=2",
                                                         "partition-id=1 num-partitions=2"]
    with pytest.raises(ValueError, match="quote"):
        node_configs_for(1, "partition", tmp_path, 'x" data-path="/etc/passwd')


# ---------------------------------------------------------------- the ServerApp memory cap

def test_the_watchdog_kills_a_serverapp_tree_over_the_cap_and_nothing_else(tmp_path):
    # Like flower-superlink -> flower-superexec -> flwr-serverapp: a parent, a middle process, and a
    # process named flwr-serverapp that grows to ~200 MiB.
    app = tmp_path / "flwr-serverapp"
    app.write_text("import time\nx = bytearray(200 * 2**20)\ntime.sleep(300)\n")
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(app)!r}]); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(descendants(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        messages: list[str] = []
        dog = ServerAppWatchdog(parent.pid, 100 * 2**20, interval=0.1, report=messages.append).start()
        deadline = time.monotonic() + 30
        while not dog.kills and time.monotonic() < deadline:
            time.sleep(0.1)
        dog.stop()
        assert len(dog.kills) == 1 and dog.kills[0]["rss-bytes"] > 100 * 2**20
        assert "MEMORY CAP: ServerApp" in messages[0] and "killed" in messages[0]
        time.sleep(0.5)
        assert not _alive(dog.kills[0]["pid"]) and parent.poll() is None
        assert len([p for p in descendants(parent.pid) if _alive(p)]) == 1  # the other child lives on
    finally:
        stop_processes([parent], grace=2)


# ---------------------------------------------------------------- helpers kept from before

def test_split_gives_each_node_its_own_file_with_the_servers_normalisation(tmp_path, mnist):
    from client.task import DistillTask, load_partition

    paths = split_data(tmp_path, 3, partitioner="dirichlet", alpha=0.5)
    sizes = 0
    for path in paths:
        train, held = load_partition(DistillTask(), {"data-path": str(path), "data-name": "mnist10k"})
        assert train.info.mean == mnist.train.info.mean and train.info.std == mnist.train.info.std
        assert len(held) >= 1
        sizes += len(train) + len(held)
    assert sizes == len(mnist.train)
    own = load_partition(DistillTask(), {"data-path": str(paths[0])})[0]  # no data-name: the file's own stats
    assert own.info.mean != mnist.train.info.mean


def test_staged_app_holds_the_sources_and_builds_a_small_fab_with_a_stable_hash(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(tmp_path / "app")
    assert (app / "pyproject.toml").is_file() and (app / "client" / "app.py").is_file()
    assert (app / "server" / "app.py").is_file() and (app / "distill" / "data.py").is_file()
    assert not list(app.rglob("*.npz")) and not (app / ".venv").exists()
    t = time.perf_counter()
    fab = build_fab_from_disk(app)
    assert len(fab) < 10 * 2**20 and time.perf_counter() - t < 30
    again = build_fab_from_disk(stage_app(app))  # staged again over itself
    assert hashlib.sha256(again).digest() == hashlib.sha256(fab).digest()  # what a holder approved stays valid
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an app")
    with pytest.raises(ValueError, match="not replacing"):
        stage_app(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_stop_processes_ends_a_process_and_the_detached_child_it_started(tmp_path):
    # Like flower-superlink: a child in its own session, which a process-group kill would miss.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
            " start_new_session=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    family = descendants(proc.pid)
    assert family
    stop_processes([proc], grace=5)
    assert proc.poll() is not None and not any(_alive(p) for p in family)


def test_bench_writes_one_row_per_setting(tmp_path, monkeypatch, capsys):
    import simulations.deploy as deploy

    calls = []

    def fake_run_once(configs, mode, run_config, workdir, runs_dir, timeout, approval, max_rss):
        calls.append((len(configs), mode, approval))
        return {"mode": mode, "nodes": len(configs), "startup-s": 1.0, "flwr-run-s": 2.0, "total-s": 3.5,
                "server-wall-s": 1.5, "status": "ok", "accepted": len(configs), "accuracy": 0.1, "run": "r"}

    monkeypatch.setattr(deploy, "run_once", fake_run_once)
    out = tmp_path / "timing.jsonl"
    assert deploy._main(["bench", "--nodes", "2", "4", "--modes", "secure", "insecure", "--data", "partition",
                         "--workdir", str(tmp_path), "--out", str(out), "-c", "ipc=2"]) == 0
    assert calls == [(2, "secure", True), (2, "insecure", True), (4, "secure", True), (4, "insecure", True)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run-config"] for r in rows] == ["ipc=2"] * 4
    assert "4 insecure" in capsys.readouterr().out


# ---------------------------------------------------------------- loopback deployments

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedistill-tests"

[tool.flwr.app.components]
serverapp = "probe_app:server"
clientapp = "probe_app:client"

[tool.flwr.app.config]
out = ""
nodes = 2
"""

PROBE_APP = '''\
"""Ask every node one query; write each node's answer (0) or error code to run-config `out`."""
import json
import time
from pathlib import Path

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def answer(msg, context):
    return Message(RecordDict({"m": MetricRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid, context):
    deadline = time.time() + 60
    while len(ids := list(grid.get_node_ids())) < int(context.run_config["nodes"]) and time.time() < deadline:
        time.sleep(0.2)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
    replies = grid.send_and_receive(msgs, timeout=60)
    codes = {str(r.metadata.src_node_id): (r.error.code if r.has_error() else 0) for r in replies}
    Path(context.run_config["out"]).write_text(json.dumps(codes))
'''


def _probe_apps(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Flower app (no torch) and a copy of it with one byte changed: another FAB hash."""
    a = tmp_path / "probe"
    a.mkdir()
    (a / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (a / "probe_app.py").write_text(PROBE_APP)
    b = tmp_path / "probe-changed"
    shutil.copytree(a, b)
    (b / "probe_app.py").write_text(PROBE_APP.replace('"""Ask', '"""ask', 1))
    return a, b


def _node_id(dep: Deployment, name: str) -> str:
    text = (dep.logs / f"{name}.log").read_text()
    return text.split("SuperNode ID:")[1].split()[0]


def _control_call(port: int, ca: Path, path: str) -> int:
    """An empty Control API call over TLS, as any client could send it; the HTTP status."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ctx)
    conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_secure_loopback_admits_enrolled_nodes_refuses_control_and_runs_only_approved_apps(
        tmp_path, one_thread, monkeypatch):
    """TLS + node authentication through the Fleet-only proxy; holder 0 approved the changed probe,
    holder 1 the original. Submitting the changed one: node 0 runs it, node 1 refuses it with
    Flower's FAB verification error (code 7) before any app code, and logs the refused hash."""
    from client.approval import hash_source

    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # runs start sooner (default 1 s)
    original, changed = _probe_apps(tmp_path)
    work = tmp_path / "deploy"
    dep = Deployment([f"partition-id={i} num-partitions=2" for i in range(2)], approved=[[changed], [original]],
                     workdir=work, timeout=120, quiet=True)
    with dep:
        assert _control_call(dep.public_port, dep.tls.ca_cert, "/v1/control/start-run") == 403
        assert _control_call(dep.public_port, dep.tls.ca_cert, "/v1/control/register-node") == 403
        assert _control_call(dep.port, dep.tls.ca_cert, "/v1/control/list-runs") == 200  # the operator, on loopback
        nodes = json.loads((res := dep.flwr("supernode", "ls", "deploy", "--format", "json", timeout=60)).stdout[
            res.stdout.index("{"):])["nodes"]
        assert [n["status"] for n in nodes] == ["online", "online"]
        out = tmp_path / "answers.json"
        assert dep.run_app(changed, [f'out="{out}"'], timeout=180).returncode == 0
        ids = {name: _node_id(dep, name) for name in ("node0", "node1")}
    answers = json.loads(out.read_text())
    assert answers == {ids["node0"]: 0, ids["node1"]: 7}  # 7: ErrorCode.INVALID_FAB
    refused = hash_source(changed)
    assert f"Refused app {refused}" in (work / "logs" / "node1.log").read_text()
    assert "Refused app" not in (work / "logs" / "node0.log").read_text()
    assert "refused (403)" in (work / "logs" / "fleet-proxy.log").read_text()
    for i in range(2):  # each private key exists once, in its holder's directory
        secret = (dep.holder(i) / "node").read_bytes()
        holders = [p for p in work.rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert holders == [dep.holder(i) / "node"]
    commands = (work / "commands.sh").read_text()
    assert "0.0.0.0" not in commands and str(dep.tls.ca_dir) not in commands.split("# node0")[0]


def _processes_using(path: Path) -> list[int]:
    """PIDs whose environment mentions ``path`` (every process deploy.py starts has its FLWR_HOME there)."""
    needle, found = str(path).encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes() and _alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
    return found


@pytest.mark.slow
def test_sigterm_stops_every_process_the_script_started(tmp_path, one_thread):
    """The script brings up the secure deployment and submits the run; SIGTERM then (like Ctrl-C,
    or a failure) stops every process it started, the app processes included."""
    work = tmp_path / "deploy"
    script = ROOT / "simulations" / "deploy.py"
    proc = subprocess.Popen([sys.executable, str(script), "run", "--nodes", "2", "--data", "partition",
                             "--workdir", str(work), "--runs-dir", str(tmp_path / "runs"), "-c", TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180  # until the run is submitted: the nodes have connected
        while not (work / "logs" / "flwr-run.log").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (work / "logs" / "superlink.log").read_text()[-2000:]
            time.sleep(0.2)
        assert len(_processes_using(work)) >= 5  # SuperLink, proxy, both SuperNodes, `flwr run`, children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        assert _processes_using(work) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    commands = (work / "commands.sh").read_text()
    assert "--host 127.0.0.1" in commands and "--enable-supernode-auth" in commands and "0.0.0.0" not in commands
    assert "client.supernode --approved-apps" in commands


def _family(dep: Deployment) -> list[int]:
    return [pid for _, proc in dep.procs for pid in (proc.pid, *descendants(proc.pid))]


def _check_run(run: Path, nodes: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["accepted"] == nodes and summary["clients"] == nodes
    assert len(list((run / "sets").glob("round001-node*.npz"))) == nodes


@pytest.mark.slow
def test_two_node_insecure_deployment_runs_the_app_end_to_end(tmp_path, one_thread, capfd):
    configs = [f"partition-id={i} num-partitions=2" for i in range(2)]
    with Deployment(configs, secure=False, workdir=tmp_path / "deploy", timeout=120, quiet=True) as dep:
        run = dep.submit([TINY], runs_dir=tmp_path / "runs", timeout=400)
        family = _family(dep)
    _check_run(run, 2)
    assert not any(_alive(p) for p in family)
    assert "WARNING: --insecure" in capfd.readouterr().err


@pytest.mark.slow
def test_secure_deployment_runs_the_approved_app_and_refuses_a_stranger_and_a_changed_app(tmp_path, one_thread):
    """TLS, node authentication and app approval (the default); each node its own .npz."""
    from client.approval import hash_source

    work = tmp_path / "deploy"
    configs = [f'data-path="{p}" data-name="mnist10k"' for p in split_data(work / "data", 2)]
    with Deployment(configs, workdir=work, timeout=120, quiet=True) as dep:
        stranger_dir = tmp_path / "stranger"
        stranger_key, _ = make_node_key(stranger_dir)  # never registered
        shutil.copyfile(dep.tls.ca_cert, stranger_dir / "ca.crt")
        (stranger_dir / "approved-apps.txt").write_text("")
        stranger = dep.start_node("stranger", "partition-id=0 num-partitions=2", stranger_dir)
        assert stranger.wait(120) != 0
        assert "2004" in (work / "logs" / "stranger.log").read_text()  # "Failed to activate SuperNode"
        run = dep.submit([TINY], runs_dir=tmp_path / "runs", timeout=400)
        changed = stage_app(work / "app-changed")
        (changed / "README.md").write_bytes((changed / "README.md").read_bytes() + b" ")  # one byte more
        refused_run = dep.submit([TINY], runs_dir=tmp_path / "runs", timeout=400, app=changed)
        family = _family(dep)
    _check_run(run, 2)
    assert not any(_alive(p) for p in family)
    refused = hash_source(changed)
    for i in range(2):  # each node refused the changed app before any of its code ran, naming its hash
        assert f"Refused app {refused}" in (work / "logs" / f"node{i}.log").read_text()
    summary = json.loads((refused_run / "summary.json").read_text())
    assert summary["accepted"] == 0 and summary["rejected-by-kind"] == {"error-reply": 2}
    assert "code 7" in (refused_run / "metrics.jsonl").read_text() or summary["status"] == "no-model"


@pytest.mark.slow
def test_the_memory_cap_kills_the_serverapp_mid_run_and_the_run_store_resumes(tmp_path, one_thread):
    """A 2-round iterative run; once round 1 is stored the cap drops below the ServerApp's size:
    the watchdog kills it, Flower reports the run failed, and a new run resumes from the store."""
    work, runs = tmp_path / "deploy", tmp_path / "runs"
    configs = [f"partition-id={i} num-partitions=2" for i in range(2)]
    settings = [TINY, 'mode="iterative" num-server-rounds=2']
    with Deployment(configs, workdir=work, timeout=120, quiet=True) as dep:
        assert dep.watchdog is not None
        result: dict = {}
        submit = threading.Thread(target=lambda: result.update(res=dep.run_app(
            dep.app, [f'runs-dir="{runs}" min-available-nodes=2', *settings], timeout=600)))
        submit.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(
                (p / "metrics.jsonl").is_file() and (p / "metrics.jsonl").read_text().strip()
                for p in (runs.iterdir() if runs.is_dir() else [])):
            time.sleep(0.2)
        t_cap, peak = time.time(), dep.watchdog.peak
        dep.watchdog.max_bytes = 200 * 2**20  # below what a ServerApp with torch loaded holds
        while not dep.watchdog.kills and time.time() - t_cap < 30:
            time.sleep(0.1)
        kill = dep.watchdog.kills[0]
        submit.join(600)
        t_end = time.time()
        listing = dep.flwr("ls", "deploy", "--format", "json", timeout=60).stdout
        dep.watchdog.max_bytes = int(6 * GIB)
        run_dir, = list(runs.iterdir())
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # round 1 stored, round 2 cut
        resumed = dep.submit([f'resume="{run_dir}"'], runs_dir=runs, timeout=600)
    runs_list = json.loads(listing[listing.index("{"):])["runs"]
    print(json.dumps({"serverapp-peak-rss-mib-before-cap": round(peak / 2**20),
                      "killed-at-rss-mib": round(kill["rss-bytes"] / 2**20),
                      "kill-after-s": round(kill["time"] - t_cap, 2),
                      "flwr-run-returned-after-s": round(t_end - t_cap, 1), "flwr-run-rc": result["res"].returncode,
                      "flwr-ls": runs_list}, indent=1))
    assert runs_list[0]["status"] != "finished:completed"
    summary = json.loads((resumed / "summary.json").read_text())
    assert resumed == run_dir and summary["status"] == "ok" and summary["resumed-after-rounds"] == [1]
