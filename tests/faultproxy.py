"""A fault-injecting HTTP/1.1 proxy on loopback, for testing how the S3 backend survives a misbehaving network.

It listens on ``127.0.0.1:<free port>`` and forwards every connection to an upstream server (the tests' Ceph RADOS
Gateway), one request and then its response at a time, so that it knows which response belongs to which request.
Rules pick requests by method, path and query, and by how many matching requests came before, and do something
to them::

    with FaultProxy(("127.0.0.1", rgw_port), lifetime=60) as proxy:
        proxy.add(Rule("drop_response", method="PUT", path="/checkpoints/a.json"))   # the 1st such PUT
        ... point s3fs at proxy.endpoint ...
        assert proxy.fired("drop_response")

Actions:

``drop_response``
    forward the request, wait for the server's whole response (so the server has done what it asked), then close
    the client's connection without sending any of it: the client never learns that its request succeeded.
``drop_request``
    close the client's connection without forwarding anything: the server never sees the request.
``stall_request``
    hold the request (never forwarded) and send nothing back, until ``stall_s`` passes or the proxy stops; then
    close the connection.
``stall_response``
    forward the request, then hold the server's response, as ``stall_request`` holds the request.
``truncate_response``
    send the response's head and the first ``keep`` bytes of its body, then close the connection.
``respond``
    read the request and answer ``status`` with an empty body without forwarding it (the server never sees it):
    e.g. a 404 to a HEAD, to play a client that looked just before another one wrote.

:meth:`FaultProxy.refuse_connections` closes the listening socket (and every open connection), so that new
connections are refused (``ECONNREFUSED``) until :meth:`FaultProxy.accept_connections`.

Everything is bounded in time: a stall lasts at most ``stall_s``, sockets time out after ``io_timeout`` seconds
of silence, and the proxy stops itself ``lifetime`` seconds after it started (closing everything it holds).
Threads are daemons; nothing outlives the process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Action", "FaultProxy", "Rule", "Seen"]

Action = Literal["drop_response", "drop_request", "stall_request", "stall_response", "truncate_response", "respond"]
_CHUNK = 1 << 16
_MAX_HEAD = 64 << 10


@dataclass
class Rule:
    """Apply ``action`` to the ``nth`` request matching ``method``, ``path`` and ``query`` (substrings; None
    matches anything), and to the ``count - 1`` matching requests after it (``count=None``: to every one from the
    ``nth`` on)."""

    action: Action
    method: str | None = None
    path: str | None = None
    query: str | None = None
    nth: int = 1
    count: int | None = 1
    keep: int = 0  # truncate_response: body bytes sent before the connection is closed
    stall_s: float = 30.0  # stall_*: the longest a stall lasts
    status: int = 404  # respond: the status answered
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        path, _, query = target.partition("?")
        return ((self.method is None or method == self.method.upper())
                and (self.path is None or self.path in path)
                and (self.query is None or self.query in query))  # fmt: skip

    def take(self, method: str, target: str) -> bool:
        """Count the request if it matches; whether the rule fires for it."""
        if not self.matches(method, target):
            return False
        self.matched += 1
        if self.matched < self.nth or (self.count is not None and self.matched >= self.nth + self.count):
            return False
        self.fired += 1
        return True


@dataclass
class Seen:
    """One request the proxy handled: what it was, the status the server answered (None when it never got
    it, or never answered) and the action applied (None: forwarded as is)."""

    method: str
    target: str
    status: int | None = None
    action: str | None = None
    at: float = field(default_factory=time.monotonic)


class _Closed(Exception):
    """The peer closed the connection (or it timed out, or the proxy is stopping)."""


class _Reader:
    """Buffered reads from a socket: up to a delimiter, or an exact number of bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(_CHUNK)
        except OSError as err:  # timeout, reset, or closed by stop()
            raise _Closed(str(err)) from err
        if not data:
            raise _Closed("eof")
        self.buf += data

    def until(self, delim: bytes, limit: int = _MAX_HEAD) -> bytes:
        while (i := self.buf.find(delim)) < 0:
            if len(self.buf) > limit:
                raise _Closed("head too long")
            self._fill()
        out = bytes(self.buf[: i + len(delim)])
        del self.buf[: i + len(delim)]
        return out

    def chunks(self, n: int) -> list[bytes]:
        """Exactly ``n`` bytes, in pieces as they arrive."""
        out = []
        while n > 0:
            if not self.buf:
                self._fill()
            piece = bytes(self.buf[:n])
            del self.buf[: len(piece)]
            n -= len(piece)
            out.append(piece)
        return out

    def rest(self) -> list[bytes]:
        """Everything until the peer closes."""
        out = [bytes(self.buf)] if self.buf else []
        self.buf.clear()
        with contextlib.suppress(_Closed):
            while True:
                self._fill()
                out.append(bytes(self.buf))
                self.buf.clear()
        return out


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


def _body(reader: _Reader, headers: dict[str, str], *, until_close: bool) -> list[bytes]:
    """The raw bytes of a message body as framed by ``headers`` (chunked, Content-Length, or up to the close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = []
        while True:
            line = reader.until(b"\r\n")
            out.append(line)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = reader.until(b"\r\n")
                    out.append(t)
                    if t == b"\r\n":
                        return out
            out += reader.chunks(size + 2)
    if "content-length" in headers:
        return reader.chunks(int(headers["content-length"]))
    return reader.rest() if until_close else []


class FaultProxy:
    """The proxy (see the module docstring). ``upstream`` is ``(host, port)`` of the real server."""

    def __init__(self, upstream: tuple[str, int], *, lifetime: float = 120.0, io_timeout: float = 30.0) -> None:
        self.upstream = upstream
        self.lifetime = lifetime
        self.io_timeout = io_timeout
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = 0
        self._timer: threading.Timer | None = None

    # --- life ----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.accept_connections()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; stalls end at once. Idempotent."""
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        self._close_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def refuse_connections(self) -> None:
        """From now on connections are refused (the port is closed); open ones are closed."""
        self._close_all()

    def accept_connections(self) -> None:
        """Listen (again, on the same port once there is one)."""
        if self._stopped.is_set():
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), name="faultproxy-accept", daemon=True).start()

    def _close_all(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            socks = list(self._socks)
            self._socks.clear()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    # --- rules ---------------------------------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def fired(self, action: str | None = None) -> list[Seen]:
        """The requests a rule fired for (of ``action``, or of any)."""
        with self._lock:
            return [s for s in self.seen if s.action is not None and (action is None or s.action == action)]

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if (method is None or s.method == method)
                    and (path is None or path in s.target)]  # fmt: skip

    def _rule_for(self, method: str, target: str) -> Rule | None:
        with self._lock:
            hit = None
            for r in self.rules:
                if r.take(method, target) and hit is None:
                    hit = r
            return hit

    # --- connections ---------------------------------------------------------------------------------------

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._stopped.is_set() or self._listener is None:
                return False
            self._socks.add(s)
            return True

    def _untrack(self, *socks: socket.socket | None) -> None:
        for s in socks:
            if s is None:
                continue
            with self._lock:
                self._socks.discard(s)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: refuse_connections() or stop()
            if not self._track(client):
                client.close()
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _stall(self, rule: Rule) -> None:
        self._stopped.wait(rule.stall_s)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(self.io_timeout)
            upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._track(upstream):
                return
            self._pump(_Reader(client), _Reader(upstream))
        except (_Closed, OSError):
            pass
        finally:
            self._untrack(client, upstream)

    def _pump(self, client: _Reader, upstream: _Reader) -> None:
        """Requests and their responses, one after the other, until a side closes or a rule ends it."""
        while not self._stopped.is_set():
            head = client.until(b"\r\n\r\n")
            request_line, headers = _parse_head(head)
            method, target = [*request_line.split(" "), "", ""][:2]
            seen = Seen(method, target)
            with self._lock:
                self.seen.append(seen)
            rule = self._rule_for(method, target)
            if rule is not None and rule.action in ("drop_request", "stall_request"):
                seen.action = rule.action
                if rule.action == "stall_request":
                    self._stall(rule)
                return
            if rule is not None and rule.action == "respond":
                _body(client, headers, until_close=False)
                seen.action, seen.status = rule.action, rule.status
                client.sock.sendall(f"HTTP/1.1 {rule.status} Injected\r\nContent-Length: 0\r\n\r\n".encode())
                continue
            upstream.sock.sendall(head)
            if headers.get("expect", "").lower() == "100-continue":
                interim = upstream.until(b"\r\n\r\n")
                client.sock.sendall(interim)  # (a final answer here would be forwarded as the response below)
            for piece in _body(client, headers, until_close=False):
                upstream.sock.sendall(piece)
            resp_head = upstream.until(b"\r\n\r\n")
            while resp_head.split(b" ", 2)[1].startswith(b"1"):  # interim responses
                client.sock.sendall(resp_head)
                resp_head = upstream.until(b"\r\n\r\n")
            status_line, resp_headers = _parse_head(resp_head)
            seen.status = int(status_line.split(" ")[1])
            bodiless = method == "HEAD" or seen.status in (204, 304)
            body = [] if bodiless else _body(upstream, resp_headers, until_close=True)
            if rule is not None:
                seen.action = rule.action
                if rule.action == "truncate_response":
                    data = b"".join(body)[: rule.keep]
                    client.sock.sendall(resp_head + data)
                    time.sleep(0.05)  # let the bytes leave before the close
                elif rule.action == "stall_response":
                    self._stall(rule)
                return  # drop_response: the server answered, the client never hears it
            client.sock.sendall(resp_head)
            for piece in body:
                client.sock.sendall(piece)
            if "close" in (headers.get("connection", "").lower(), resp_headers.get("connection", "").lower()):
                return
