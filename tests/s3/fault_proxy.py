"""A fault-injecting HTTP proxy in front of moto's S3 server: the broken network of a real
deployment (throttling, dropped connections, bodies cut short), at a seeded rate.

Each request is forwarded to the upstream with ``http.client`` (method, path and query,
headers, body; a chunked request body is de-chunked) and the answer copied back, unless a
fault is drawn for it. Exactly ``round(rate * 50)`` of every 50 requests get one, at
positions a seeded shuffle picks, so a run with enough requests sees the rate it asked for;
each fault is of the kind used least so far among those that fit the request (ties broken by
the same RNG), so every kind shows up:

- ``slowdown``: 503 with S3's SlowDown XML error; the request never reaches the server.
- ``reset``: the socket is closed with a TCP reset, nothing answered; the request never
  reaches the server.
- ``truncate`` (GETs only): the server's status and headers, the full Content-Length, half
  the body, then the connection closes.
- ``lost`` (not in the default kinds): the request reaches the server, then the socket is
  reset: the client cannot tell whether a write happened.
- ``corrupt`` (GETs only, not in the default kinds): the full body with its first byte
  changed and without the ``x-amz-checksum-*`` headers (as for an object uploaded without a
  checksum): only a check against the ETag can tell.

``calls()`` counts the requests by what they asked of S3 (GET, HEAD, PUT... and LIST for a
GET of the bucket itself), as they arrived, faulted or not: what a client really sends.

``fail_keys`` makes every GET or HEAD of the named object keys fail with a fixed status (403
AccessDenied, 500 InternalError...), whatever the rate. ``lose_writes`` gives the next N PUTs
of the named keys the ``lost`` fault: the write lands, its reply never comes back. Everything stays on 127.0.0.1, every
upstream call has a timeout, and a request budget bounds the traffic of one proxy.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("slowdown", "reset", "truncate")
KNOWN_FAULTS = (*FAULTS, "lost", "corrupt")
BODY_FAULTS = ("truncate", "corrupt")  # need a body to spoil: GETs only
DECK = 50  # requests per shuffled deck of fault positions
ERROR_CODES = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
# Headers about one hop, not the message: the proxy sets its own framing on each side.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer")
    + ("upgrade", "expect", "content-length")
)


def error_xml(status: int, resource: str, request_id: str) -> bytes:
    code, message = ERROR_CODES.get(status, ("InternalError", "Injected fault."))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class FaultProxy:
    """The proxy server; a context manager that serves on a thread while open.

    Args:
        upstream: the server's URL; it must be on 127.0.0.1.
        rate: share of requests that get a fault (exact per deck of ``DECK`` requests).
        seed: seeds the deck shuffles and the tie breaks between kinds.
        kinds: the faults to draw from (a subset of ``KNOWN_FAULTS``).
        max_requests: requests after this many are refused with a 503 and not forwarded.
        timeout: seconds for each upstream call and for an idle client connection.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: tuple[str, ...] = FAULTS,
        max_requests: int = 20_000,
        timeout: float = 30.0,
    ):
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1" or not parts.port:
            raise ValueError(f"the proxy forwards to 127.0.0.1 only, not {upstream!r}")
        if set(kinds) - set(KNOWN_FAULTS):
            raise ValueError(f"unknown faults {set(kinds) - set(KNOWN_FAULTS)}: {KNOWN_FAULTS}")
        self.upstream = (parts.hostname, parts.port)
        self.rate, self.kinds, self.seed = rate, tuple(kinds), seed
        self.rng = random.Random(seed)
        self._deck: list[bool] = []
        self.fail_keys: dict[str, int] = {}
        self.lose_writes: dict[str, int] = {}  # key name -> PUTs of it still to lose
        self.only: tuple[str, ...] = ()  # empty: every request kind
        self.counts: Counter[str] = Counter()
        self._calls: Counter[str] = Counter()
        self.max_requests, self.timeout = max_requests, timeout
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def configure(
        self, *, rate: float | None = None, seed: int | None = None, kinds=None, only=None
    ) -> None:
        """Changes the fault rate, kinds or seed and starts a new deck (counters are kept).
        ``only``: the request kinds (as ``calls()`` names them) that may get a random fault,
        e.g. ``("GET",)`` to spare the listings; None: all of them."""
        with self.lock:
            self.rate = self.rate if rate is None else rate
            self.kinds = self.kinds if kinds is None else tuple(kinds)
            self.only = self.only if only is None else tuple(only)
            if seed is not None:
                self.seed, self.rng = seed, random.Random(seed)
            self._deck = []

    def faults(self) -> dict[str, int]:
        """Injected faults by kind (random ones; forced ones are ``forced_<status>``)."""
        with self.lock:
            return {k: v for k, v in self.counts.items() if k != "requests"}

    def calls(self) -> dict[str, int]:
        """Requests by kind: the HTTP method, or LIST for a GET of a bucket (a listing)."""
        with self.lock:
            return dict(self._calls)

    @property
    def requests(self) -> int:
        return self.counts["requests"]

    def draw(self, method: str, path: str) -> str | None:
        """The fault for one request (None: forward it untouched); counts the request and
        the fault."""
        with self.lock:
            self.counts["requests"] += 1
            path = unquote(urlsplit(path).path)
            bucket_only = path.strip("/").count("/") == 0
            kind = "LIST" if method == "GET" and bucket_only else method
            self._calls[kind] += 1
            fault = self._pick(method, path, kind)
            if fault:
                self.counts[fault] += 1
            return fault

    def _pick(self, method: str, path: str, kind: str) -> str | None:
        if self.counts["requests"] > self.max_requests:
            return "budget"
        if method in ("GET", "HEAD"):
            for name, status in self.fail_keys.items():
                if path.endswith("/" + name):
                    return f"forced_{status}"
        if method == "PUT":
            for name, left in self.lose_writes.items():
                if left and path.endswith("/" + name):
                    self.lose_writes[name] = left - 1
                    return "lost"
        if self.only and kind not in self.only or not self._fault_due():
            return None
        # A spoilt body needs a body: writes and HEADs answer with none.
        kinds = [k for k in self.kinds if k not in BODY_FAULTS or method == "GET"]
        if not kinds:
            return None
        least = min(self.counts[k] for k in kinds)
        return self.rng.choice([k for k in kinds if self.counts[k] == least])

    def _fault_due(self) -> bool:
        if not self._deck:
            faults = round(self.rate * DECK)
            self._deck = [True] * faults + [False] * (DECK - faults)
            self.rng.shuffle(self._deck)
        return self._deck.pop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto's connection pool expects

    def setup(self) -> None:
        self.timeout = self.server.proxy.timeout  # an idle client connection ends
        super().setup()

    def log_message(self, *args) -> None:
        pass  # the counters are the record

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body, trailers = self._read_body()
        fault = proxy.draw(self.command, self.path)
        if fault == "budget":
            self._send_error(503, "budget")
        elif fault == "slowdown":
            self._send_error(503, "fault")
        elif fault == "reset":
            self._reset()
        elif fault == "lost":
            self._forward(body, trailers)
            self._reset()
        elif fault and fault.startswith("forced_"):
            self._send_error(int(fault.removeprefix("forced_")), "forced")
        else:
            self._answer(*self._forward(body, trailers), fault=fault)

    def _read_body(self) -> tuple[bytes, dict[str, str]]:
        """The request body, de-chunked, and the chunked trailers (as headers upstream)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b"", {}

    def _read_chunked(self) -> tuple[bytes, dict[str, str]]:
        parts = []
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)  # the CRLF after each chunk
        trailers = {}
        while (line := self.rfile.readline(8192).strip()) != b"":
            name, _, value = line.decode("latin-1").partition(":")
            trailers[name.strip()] = value.strip()
        return b"".join(parts), trailers

    def _forward(self, body: bytes, trailers: dict[str, str]):
        proxy: FaultProxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.update(trailers)
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        except OSError as e:
            return 502, [("Content-Type", "text/plain")], f"upstream failed: {e}".encode()
        finally:
            conn.close()

    def _answer(self, status: int, headers, data: bytes, fault: str | None) -> None:
        truncate = fault == "truncate"
        if fault == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]
        if truncate and len(data) < 2:
            self._reset()  # nothing to cut in half: cut it all
            return
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP | {"server", "date"}:  # send_response sets those
                self.send_header(name, value)
        upstream_length = dict((k.lower(), v) for k, v in headers).get("content-length")
        # A HEAD answer has no body but tells the object's length.
        length = upstream_length if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if truncate else data)
        if truncate:
            self.close_connection = True  # the client sees the stream end early

    def _send_error(self, status: int, why: str) -> None:
        body = error_xml(status, self.path, f"fault-proxy-{why}")
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER 0: close sends RST, not FIN, so the client sees "connection reset".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
