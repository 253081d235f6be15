"""A small authoritative DNS server for tests, built with dnspython: UDP and TCP on a loopback
address, records a test changes while it runs, and a log of the queries it answered.

    with DnsServer() as dns:
        dns.set("app.test", "A", ["127.0.0.21", "127.0.0.22"], ttl=1)
        ...  # [resolver] nameservers = [dns.address]
        dns.mode = Mode.SERVFAIL                 # or Mode.DROP: no answer at all
        dns.wait_queries(lambda qs: len(qs) >= 3)

Every name it does not know gets NXDOMAIN; a known name without the asked type gets an empty
answer (NOERROR), as an authoritative server does. An answer too large for the client's UDP
payload is sent truncated (TC), so the client asks again over TCP.
"""

from __future__ import annotations

import contextlib
import enum
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.support.peers import free_port


class Mode(enum.Enum):
    ANSWER = "answer"
    SERVFAIL = "servfail"
    DROP = "drop"


@dataclass(frozen=True)
class Query:
    at: float
    """time.monotonic() when it was answered."""
    name: str
    rdtype: str
    transport: str


class DnsServer:
    """An authoritative server on ``host`` (a free port), run by one thread."""

    def __init__(self, host: str = "127.0.0.53") -> None:
        self.host = host
        self.mode = Mode.ANSWER
        self._records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self._queries: list[Query] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        for _ in range(20):
            port = free_port(host)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((host, port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError(f"no free port for UDP and TCP on {host}")
        tcp.listen(16)
        self.port = port
        self._udp, self._tcp = udp, tcp
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- records ---------------------------------------------------------------------------

    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 1) -> None:
        """Answer ``name``/``rdtype`` with ``values`` (SRV: 'prio weight port target')."""
        with self._cond:
            self._records[(self._key(name), rdtype.upper())] = (ttl, list(values))

    def remove(self, name: str, rdtype: str) -> None:
        with self._cond:
            self._records.pop((self._key(name), rdtype.upper()), None)

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    # -- queries ---------------------------------------------------------------------------

    def queries(self, name: str | None = None, rdtype: str | None = None) -> list[Query]:
        with self._cond:
            return [
                q
                for q in self._queries
                if (name is None or q.name == self._key(name))
                and (rdtype is None or q.rdtype == rdtype)
            ]

    def wait_queries(
        self, predicate: Callable[[list[Query]], bool], timeout: float = 15.0
    ) -> list[Query]:
        """Wait until ``predicate(all queries so far)``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._queries)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"DNS queries never matched; got {self._queries!r}")
                self._cond.wait(left)
            return list(self._queries)

    # -- serving ---------------------------------------------------------------------------

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._cond:
            mode = self.mode
            records = dict(self._records)
            self._queries.append(Query(time.monotonic(), name, rdtype, transport))
            self._cond.notify_all()
        if mode is Mode.DROP:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode is Mode.SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if not any(key[0] == name for key in records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        found = records.get((name, rdtype))
        if found is not None:
            ttl, values = found
            response.answer.append(
                dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, rdtype, values)
            )
        wire = response.to_wire()
        limit = query.payload if query.edns >= 0 else 512
        if transport == "udp" and len(wire) > limit:  # RFC 1035 4.2.1: truncate, ask over TCP
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        return wire

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        with sel:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.data == "udp":
                        with contextlib.suppress(OSError):
                            wire, peer = self._udp.recvfrom(65535)
                            out = self._answer(wire, "udp")
                            if out is not None:
                                self._udp.sendto(out, peer)
                    else:
                        with contextlib.suppress(OSError):
                            conn, _ = self._tcp.accept()
                            self._serve_tcp(conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2.0)
            with contextlib.suppress(OSError):
                while True:
                    head = conn.recv(2, socket.MSG_WAITALL)
                    if len(head) < 2:
                        return
                    wire = conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
                    out = self._answer(wire, "tcp")
                    if out is None:
                        return
                    conn.sendall(len(out).to_bytes(2, "big") + out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._udp.close()
        self._tcp.close()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def dns_server(host: str = "127.0.0.53") -> Iterator[DnsServer]:
    server = DnsServer(host)
    try:
        yield server
    finally:
        server.close()
