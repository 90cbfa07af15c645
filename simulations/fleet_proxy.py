"""A reverse proxy that lets SuperNodes reach a SuperLink's Fleet API and nothing else.

Why: Flower 1.42 serves the Fleet API (what SuperNodes call), the Control API (what ``flwr run``
calls: submit a run, register node keys) and the Runtime API (what the ServerApp calls) as one
HTTP app on one ``--host/--port``, and the open-source Control API has no authentication.
Whoever reaches that port can submit a run whose ClientApp executes on every node. Flower has
no separate listener per API any more (``--fleet-api-address`` / ``--control-api-address`` are
deprecated: they only start legacy gRPC servers behind internal flags), so the split is made
here: the SuperLink listens on 127.0.0.1 only, and this proxy, the only thing on the public
address, forwards exactly the Fleet routes (``FLEET_PATHS``, checked against Flower's router by a test) and answers 403 to
everything else. The operator reaches Control on 127.0.0.1 (or through an SSH tunnel).

HTTP/1.1 only: Flower's SuperNode client is ``httpx`` without HTTP/2, and the SuperLink is
uvicorn (HTTP/1.1). Bodies are streamed both ways (never buffered whole), heads and trailers are
bounded, a head must arrive whole within its timeout and its body within a deadline (a peer
sending a byte a minute cannot hold a connection), each client address may hold only a few
connections, and each request gets its own upstream connection (no reuse race).
The request head is re-serialised from what was parsed, so what the SuperLink sees is exactly
what was checked (no smuggling through odd framing); node-authentication headers pass unchanged.

    python -m simulations.fleet_proxy --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \\
        --certfile superlink/server.pem --keyfile superlink/server.key --upstream-ca superlink/ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

# The Fleet API of Flower 1.42 (flwr/superlink/routers/fleet/router.py): every route is a POST.
FLEET_PREFIX = "/v1/fleet/"
FLEET_PATHS = frozenset(FLEET_PREFIX + name for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
# What is refused, for the docs and the log: /v1/control/* (Control API), /v1/runtime/* (the
# ServerApp's Runtime API), /health, /docs, /openapi.json, and anything else.

MAX_HEAD = 16 * 1024      # bytes of request line + headers (uvicorn's own limit is larger)
MAX_HEADERS = 64
MAX_LINE = 1024           # a chunk-size line
MAX_TRAILERS = 16         # trailer lines after the last chunk (dropped, but read: so bounded)
MAX_TRAILER_BYTES = 8 * 1024
# The largest body a node sends: Flower 1.42 pushes each object in its own push-object request
# (one protobuf, sent whole with a Content-Length: flwr/supercore/protobuf/client.py), and splits
# arrays into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE = 5 MiB (flwr/common/constant.py), so
# a request is one 5 MiB chunk plus framing, or a small message/record object. 16 MiB leaves
# room for that and a larger config record, and bounds what an unauthenticated peer can make
# the SuperLink buffer (Starlette reads a body before Flower's node-auth check runs).
DEFAULT_MAX_BODY = 16 * 2**20
PIECE = 64 * 1024         # bytes copied per read
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect"})
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # use fullmatch: `$` would let a trailing "\n" pass
DIGITS = re.compile(r"[0-9]{1,15}")  # ASCII only: str.isdigit() accepts "²", which int() refuses
REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 413: "Content Too Large",
           417: "Expectation Failed", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def fleet_allowed(method: str, target: str) -> bool:
    """Only a POST to one of Flower's Fleet routes, spelled exactly (no query, no dot segments,
    no percent-encoding, no absolute form): anything a router might normalise is refused."""
    return method == "POST" and target in FLEET_PATHS


class HttpError(Exception):
    """A request refused before anything reached the SuperLink; ``status`` goes to the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Timeouts (seconds) and sizes (bytes) that keep a slow or hostile peer from holding the proxy."""

    head_timeout: float = 15.0       # the first request head of a connection
    idle_timeout: float = 60.0       # between requests on a kept-alive connection
    read_timeout: float = 60.0       # any single read of a body
    request_timeout: float = 120.0   # a whole request body, from the end of its head (slowloris)
    upstream_timeout: float = 300.0  # the SuperLink's response head
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0  # TLS handshake with a node
    max_body: int = DEFAULT_MAX_BODY  # one request body (see DEFAULT_MAX_BODY)
    max_connections: int = 256
    max_per_ip: int = 16             # connections at once from one client address


@dataclass
class Head:
    """A parsed HTTP/1.1 start line and its headers (names lower-cased, order kept)."""

    start: tuple[str, str, str]
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased (Connection, Transfer-Encoding)."""
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}


def parse_head(raw: bytes, request: bool = True) -> Head:
    """Parse a head ending in CRLF CRLF strictly: CRLF line ends only, token header names, no
    obs-fold, no control bytes in values. Raises HttpError(400) (502 meaning for a response)."""
    if not raw.endswith(b"\r\n\r\n"):
        raise HttpError(400 if request else 502, "malformed head")
    lines = raw[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431 if request else 502, "too many headers")
    start = _parse_start(lines[0], request)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name) or re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise HttpError(400, "malformed header line")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return Head(start, headers)


def _parse_start(line: bytes, request: bool) -> tuple[str, str, str]:
    if re.search(rb"[\x00-\x1f\x7f]", line):
        raise HttpError(400, "control bytes in the start line")
    text = line.decode("latin-1")
    if request:
        parts = text.split(" ")
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0].encode("latin-1")):
            raise HttpError(400, "malformed request line")
        if parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505, "HTTP/1.x only")
        return parts[0], parts[1], parts[2]
    version, _, rest = text.partition(" ")
    status, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not re.fullmatch(r"[0-9]{3}", status):
        raise HttpError(502, "malformed status line from the SuperLink")
    return version, status, reason


def framing(head: Head, request: bool) -> tuple[str, int]:
    """How the body ends: ("length", n), ("chunked", 0), ("none", 0) or, for a response without
    either header, ("eof", 0). Ambiguous framing (both headers, several lengths, a transfer coding
    other than chunked) is refused: the classic request-smuggling openings."""
    codings = [t.strip().lower() for v in head.values("transfer-encoding") for t in v.split(",")]
    lengths = {v.strip() for v in head.values("content-length")}
    if codings:
        if codings != ["chunked"] or lengths:
            raise HttpError(400 if request else 502, "unsupported or ambiguous transfer framing")
        return "chunked", 0
    if lengths:
        if len(lengths) != 1 or not DIGITS.fullmatch(next(iter(lengths))):
            raise HttpError(400 if request else 502, "bad Content-Length")
        return "length", int(next(iter(lengths)))
    if not request:
        status = int(head.start[1])
        return ("none", 0) if status in (204, 304) or status < 200 else ("eof", 0)
    return "none", 0


def serialize_head(start: str, headers: Sequence[tuple[str, str]], body: tuple[str, int],
                   close: bool) -> bytes:
    """The head to send on: end-to-end headers as parsed (hop-by-hop ones, and any the peer's
    Connection header names, dropped), then our own framing and Connection."""
    named = {t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")}
    drop = HOP_BY_HOP | named | {"content-length"}
    lines = [start] + [f"{k}: {v}" for k, v in headers if k not in drop]
    if body[0] == "length":
        lines.append(f"content-length: {body[1]}")
    elif body[0] == "chunked":
        lines.append("transfer-encoding: chunked")
    lines.append("connection: close" if close else "connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read(reader: asyncio.StreamReader, n: int, timeout: float) -> bytes:
    data = await asyncio.wait_for(reader.read(n), timeout)
    if not data:
        raise asyncio.IncompleteReadError(b"", n)
    return data


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()  # back-pressure: never more than a piece in flight per direction


async def copy_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, timeout: float) -> None:
    """Copy exactly ``n`` body bytes, a piece at a time."""
    while n > 0:
        data = await _read(reader, min(n, PIECE), timeout)
        n -= len(data)
        await _send(writer, data)


async def copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float,
                       max_body: int | None) -> None:
    """Relay a chunked body chunk by chunk: sizes re-encoded without extensions, trailers dropped."""
    total = 0
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
        size_text = line[:-2].split(b";")[0].strip()
        if len(line) > MAX_LINE or not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
            raise HttpError(400, "bad chunk size")
        size = int(size_text, 16)
        total += size
        if max_body is not None and total > max_body:
            raise HttpError(413, "body too large")
        if size == 0:
            await _skip_trailers(reader, timeout)  # not forwarded
            await _send(writer, b"0\r\n\r\n")
            return
        await _send(writer, b"%x\r\n" % size)
        await copy_length(reader, writer, size, timeout)
        if await asyncio.wait_for(reader.readexactly(2), timeout) != b"\r\n":
            raise HttpError(400, "bad chunk end")
        await _send(writer, b"\r\n")


async def _skip_trailers(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read and drop the trailer section, at most MAX_TRAILERS lines and MAX_TRAILER_BYTES:
    an endless trailer would otherwise hold the connection without ever counting as body."""
    lines = size = 0
    while (line := await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)) != b"\r\n":
        lines, size = lines + 1, size + len(line)
        if lines > MAX_TRAILERS or size > MAX_TRAILER_BYTES:
            raise HttpError(431, "trailers too large")


async def copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: tuple[str, int],
                    timeout: float, max_body: int | None = None) -> None:
    if body[0] == "length":
        await copy_length(reader, writer, body[1], timeout)
    elif body[0] == "chunked":
        await copy_chunked(reader, writer, timeout, max_body)
    elif body[0] == "eof":
        while data := await asyncio.wait_for(reader.read(PIECE), timeout):
            await _send(writer, data)


async def read_head(reader: asyncio.StreamReader, timeout: float, request: bool = True) -> Head | None:
    """The next head, or None when the peer closed (or went idle) between requests."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HttpError(400, "truncated head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431 if request else 502, "head too large") from exc
    except asyncio.TimeoutError:
        if request:
            return None
        raise
    return parse_head(raw, request)


def error_response(status: int, detail: str) -> bytes:
    body = (detail + "\n").encode()
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


@dataclass
class FleetProxy:
    """Forward Fleet API requests to ``upstream`` (the SuperLink on loopback); refuse the rest."""

    upstream_host: str
    upstream_port: int
    upstream_ssl: ssl.SSLContext | None = None
    limits: Limits = field(default_factory=Limits)
    log: Callable[[str], None] = lambda msg: print(f"[fleet-proxy {time.strftime('%H:%M:%S')}] {msg}",
                                                   file=sys.stderr, flush=True)
    active: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"forwarded": 0, "refused": 0})

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: requests one after another (keep-alive), each checked alone."""
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refused = ("too many connections" if self.active >= self.limits.max_connections else
                   "too many connections from this address" if self.per_ip.get(ip, 0) >= self.limits.max_per_ip
                   else None)
        if refused is not None:
            self.counts["refused"] += 1
            self.log(f"refused (503) from {peer}: {refused}")
            with contextlib.suppress(Exception):
                writer.write(error_response(503, refused))
            await _close(writer)
            return
        self.active += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        try:
            first = True
            while True:
                head = await read_head(reader, self.limits.head_timeout if first else self.limits.idle_timeout)
                if head is None or not await self.forward(head, reader, writer, peer):
                    break
                first = False
        except HttpError as exc:
            self.counts["refused"] += 1
            self.log(f"refused ({exc.status}) from {peer}: {exc.detail}")
            with contextlib.suppress(Exception):
                await _send(writer, error_response(exc.status, exc.detail))
        except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # the peer went away or stalled: drop the connection
        finally:
            self.active -= 1
            if (left := self.per_ip[ip] - 1) > 0:
                self.per_ip[ip] = left
            else:
                del self.per_ip[ip]  # the table holds only addresses with a connection open
            await _close(writer)

    async def forward(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: object) -> bool:
        """Check, forward one request and relay its response; True if the connection stays open."""
        method, target, version = head.start
        if not fleet_allowed(method, target):
            raise HttpError(403, f"{method} {target[:200]}: only Flower's Fleet API is served on this port")
        body = framing(head, request=True)
        if body[0] == "length" and body[1] > self.limits.max_body:
            raise HttpError(413, f"body of {body[1]} bytes is over {self.limits.max_body}")
        expects = head.tokens("expect")
        if expects - {"100-continue"}:
            raise HttpError(417, "unsupported Expect")
        up_reader, up_writer = await self._connect()
        try:
            await _send(up_writer, serialize_head(f"{method} {target} HTTP/1.1", head.headers, body, close=True))
            if expects:
                await _send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
            try:  # the whole body within the deadline, whatever the pace of single reads
                await asyncio.wait_for(copy_body(reader, up_writer, body, self.limits.read_timeout,
                                                 self.limits.max_body), self.limits.request_timeout)
            except asyncio.TimeoutError as exc:
                raise HttpError(408, f"request body not received within {self.limits.request_timeout:g} s") from exc
            response = await self._response_head(up_reader)
            out = framing(response, request=False)
            keep = (version == "HTTP/1.1" and "close" not in head.tokens("connection") and out[0] != "eof")
            start = f"HTTP/1.1 {response.start[1]} {response.start[2]}".rstrip()
            await _send(writer, serialize_head(start, response.headers, out, close=not keep))
            try:
                await copy_body(up_reader, writer, out, self.limits.upstream_timeout)
            except HttpError as exc:  # the response has begun: no error page can follow, only a close
                raise ConnectionError(exc.detail) from exc
        finally:
            await _close(up_writer)
        self.counts["forwarded"] += 1
        return keep

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.open_connection(
                self.upstream_host, self.upstream_port, ssl=self.upstream_ssl, limit=MAX_HEAD * 4,
                server_hostname=self.upstream_host if self.upstream_ssl else None), self.limits.connect_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            raise HttpError(502, f"SuperLink unreachable: {type(exc).__name__}") from exc

    async def _response_head(self, up_reader: asyncio.StreamReader) -> Head:
        """The SuperLink's final response head (interim 1xx responses are skipped)."""
        while True:
            try:
                head = await read_head(up_reader, self.limits.upstream_timeout, request=False)
            except asyncio.TimeoutError as exc:
                raise HttpError(502, "SuperLink timed out") from exc
            if head is None:
                raise HttpError(502, "SuperLink closed the connection")
            if not head.start[1].startswith("1"):
                return head

    async def serve(self, host: str, port: int, server_ssl: ssl.SSLContext | None) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, ssl=server_ssl, limit=MAX_HEAD,
                                          ssl_handshake_timeout=self.limits.handshake_timeout if server_ssl else None)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2)


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS towards the nodes: 1.2 or later, HTTP/1.1 by ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_context(cafile: str) -> ssl.SSLContext:
    """TLS to the SuperLink, verified against the deployment's CA (hostname checked too)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve_forever(args: argparse.Namespace) -> None:
    up_host, up_port = _address(args.upstream)
    limits = Limits(max_body=int(args.max_body_mib * 2**20), request_timeout=args.request_timeout,
                    max_per_ip=args.max_connections_per_ip)
    proxy = FleetProxy(up_host, up_port, None if args.upstream_insecure else upstream_context(args.upstream_ca),
                       limits)
    server_ssl = None if args.insecure else server_context(args.certfile, args.keyfile)
    host, port = _address(args.listen)
    server = await proxy.serve(host, port, server_ssl)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    proxy.log(f"listening on {bound[0]}:{bound[1]} ({'plain HTTP' if server_ssl is None else 'TLS'}), "
              f"forwarding only {FLEET_PREFIX}* ({len(FLEET_PATHS)} routes) to {up_host}:{up_port} "
              f"({'plain HTTP' if proxy.upstream_ssl is None else 'TLS'})")
    async with server:
        await stop.wait()
    proxy.log(f"stopped: {proxy.counts['forwarded']} forwarded, {proxy.counts['refused']} refused")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the nodes connect to (e.g. 0.0.0.0:9092)")
    p.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT on loopback (e.g. 127.0.0.1:9093)")
    p.add_argument("--certfile", help="server certificate shown to the nodes (PEM)")
    p.add_argument("--keyfile", help="its private key")
    p.add_argument("--upstream-ca", help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP towards the nodes (loopback tries only)")
    p.add_argument("--upstream-insecure", action="store_true", help="plain HTTP to an --insecure SuperLink")
    p.add_argument("--max-body-mib", type=float, default=DEFAULT_MAX_BODY / 2**20,
                   help="largest request body forwarded (a node's largest is one 5 MiB array chunk plus framing)")
    p.add_argument("--request-timeout", type=float, default=Limits.request_timeout,
                   help="seconds a request body may take to arrive whole, after its head")
    p.add_argument("--max-connections-per-ip", type=int, default=Limits.max_per_ip,
                   help="connections one client address may hold at once (503 beyond)")
    args = p.parse_args(argv)
    if not args.insecure and not (args.certfile and args.keyfile):
        p.error("--certfile and --keyfile are required (or --insecure)")
    if not (args.max_body_mib > 0 and args.request_timeout > 0 and args.max_connections_per_ip >= 1):
        p.error("--max-body-mib and --request-timeout must be > 0, --max-connections-per-ip >= 1")
    if not args.upstream_insecure and not args.upstream_ca:
        p.error("--upstream-ca is required (or --upstream-insecure)")
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
