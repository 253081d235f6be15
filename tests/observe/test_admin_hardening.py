"""The admin API against hostile and careless clients, over real sockets.

A request that never completes (a head, a declared body, a response nobody reads) is bounded by
a timeout and gives its slot back; idle keep-alive connections yield their slot to a new client
when the slots are full (as nginx and HAProxy reuse idle keep-alive connections); malformed
numbers get a 400, not a traceback; a DNS-rebinding request (``Host`` a name that is not this
admin API's) is refused before any route runs.

Timeouts are passed in short (``AdminTimeouts``) so these tests wait on events, not on the
defaults; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.observe.admin import _MAX_CLIENTS, AdminServer, AdminTimeouts
from l4lb.observe.control import ReloadOutcome
from l4lb.observe.snapshot import Snapshot
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for

SHORT = AdminTimeouts(head=1.0, body=1.0, idle=30.0, write=1.0)


class Control:
    """A balancer stand-in: an empty snapshot, counted reloads and actions."""

    def __init__(self) -> None:
        self.reloads = 0
        self.actions: list[tuple[str, str, str]] = []

    def snapshot(self) -> Snapshot:
        now = time.time()
        return Snapshot(version="0.1.0", started=now - 1, now=now, listeners=(), pools=())

    def backend_action(self, pool: str, address: str, action: str) -> str:
        self.actions.append((pool, address, action))
        return "drain"

    async def reload(self) -> ReloadOutcome:
        self.reloads += 1
        return ReloadOutcome(True, summary="ok")


class Running:
    def __init__(self, server: AdminServer, control: Control) -> None:
        self.server = server
        self.control = control

    def connect(self) -> socket.socket:
        return socket.create_connection((self.server.host, self.server.port), timeout=10)

    def clients(self) -> int:
        return len(self.server._clients)


def _serve(server: AdminServer, control: Control) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield Running(server, control)
    finally:
        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def admin() -> Iterator[Running]:
    control = Control()
    yield from _serve(AdminServer(control, "127.0.0.1:0", timeouts=SHORT), control)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock``: status, headers (lower-cased), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def exchange(admin: Running, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with admin.connect() as sock:
        sock.sendall(raw)
        return read_response(sock)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# --- issue 11, bug 7: numbers Python's isdigit accepts -----------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        *(b"\xb2", b"1\xb3", b"\xb9", "٣".encode(), "１".encode()),
        *(b"+5", b"-1", b"0x10", b"1_0", b"9" * 5000, b"5, 5"),
    ],
)
def test_content_length_that_is_not_ascii_digits_is_a_400(admin: Running, value: bytes) -> None:
    """The head is read as latin-1, where b'\\xb2' is '²': isdigit() said yes, int() raised."""
    raw = b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + value + b"\r\n\r\n"
    status, _, body = exchange(admin, raw)
    assert status == 400 and b"Content-Length" in body
    assert admin.control.reloads == 0


def test_oversized_body_is_a_413(admin: Running) -> None:
    raw = b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 65537\r\n\r\n"
    status, _, body = exchange(admin, raw)
    assert status == 413 and b"65536" in body


@pytest.mark.parametrize("name", ["Content-Length", "Host", "Authorization", "Origin"])
def test_duplicate_singleton_headers_are_a_400(admin: Running, name: str) -> None:
    raw = f"POST /reload HTTP/1.1\r\n{name}: 0\r\n{name}: 0\r\n\r\n".encode()
    status, _, body = exchange(admin, raw)
    assert status == 400 and name.lower().encode() in body.lower()
    assert admin.control.reloads == 0


# --- weakness 3: lockout ------------------------------------------------------------------------


def test_a_body_that_never_comes_times_out_and_frees_the_slots(admin: Running) -> None:
    """64 connections declaring a body they never send held every slot forever."""
    hung = [admin.connect() for _ in range(_MAX_CLIENTS)]
    try:
        for sock in hung:
            sock.sendall(b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        for sock in hung:
            status, _, body = read_response(sock)
            assert status == 408 and b"body" in body
        assert admin.control.reloads == 0
    finally:
        for sock in hung:
            sock.close()
    assert wait_for(lambda: admin.clients() == 0, 20), admin.clients()
    assert exchange(admin, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200


def test_a_head_that_never_ends_gets_a_408(admin: Running) -> None:
    with admin.connect() as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        status, headers, body = read_response(sock)
        assert status == 408 and b"head" in body
        assert headers["connection"] == "close"
        assert closed_by_server(sock)


def test_slowloris_one_byte_at_a_time_is_cut_at_the_head_timeout(admin: Running) -> None:
    """Each byte arrives well within any per-read timeout; the head as a whole does not."""
    with admin.connect() as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\n")
        answered = threading.Event()
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set() and not answered.is_set():
                try:
                    sock.sendall(b"X")
                except OSError:
                    return
                stop.wait(0.05)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            status, _, _ = read_response(sock)
        finally:
            answered.set()
            stop.set()
            thread.join(10)
        assert status == 408


def test_idle_keep_alive_connections_yield_their_slot(admin: Running) -> None:
    """64 keep-alive connections idle after one request refilled the slots for 30 s each."""
    idle = [admin.connect() for _ in range(_MAX_CLIENTS)]
    try:
        for sock in idle:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock)[0] == 200
        assert wait_for(lambda: admin.clients() == _MAX_CLIENTS, 20)
        # a new client is served at once, in the slot of the connection idle the longest
        assert exchange(admin, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200
        assert closed_by_server(idle[0])
        # the others are still open and usable
        idle[-1].sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(idle[-1])[0] == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_client_that_never_reads_its_responses_is_cut(admin: Running) -> None:
    """Pipelined requests whose answers are never read filled the socket and held the slot."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((admin.server.host, admin.server.port))
    sock.setblocking(False)
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sent = 0
    try:
        assert wait_for(lambda: admin.clients() == 1, 10)
        # keep pipelining until the server stops reading (its writes are blocked on us)
        stalled_since = None
        while True:
            try:
                sent += sock.send(request * 64)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0 or admin.clients() == 0:
                    break
                time.sleep(0.01)
            except OSError:
                break  # already cut
        assert sent > 0
        assert wait_for(lambda: admin.clients() == 0, 20), "the slot was never given back"
    finally:
        sock.close()


# --- weakness 4: Host and DNS rebinding ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/reload"), ("GET", "/status"), ("GET", "/metrics")]
)
def test_dns_rebinding_host_is_refused(admin: Running, method: str, path: str) -> None:
    """Host = Origin = the attacker's name passed the same-origin check before."""
    raw = (
        f"{method} {path} HTTP/1.1\r\nHost: rebind.example:{admin.server.port}\r\n"
        f"Origin: http://rebind.example:{admin.server.port}\r\nContent-Length: 0\r\n\r\n"
    )
    status, _, body = exchange(admin, raw.encode())
    assert status == 421
    doc = json.loads(body)
    assert "rebind.example" in doc["error"] and "127.0.0.1" in doc["error"]
    assert admin.control.reloads == 0


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LOCALHOST", "app.localhost:8000", ""],
)
def test_hosts_of_a_loopback_bind(admin: Running, host: str) -> None:
    line = f"Host: {host.format(port=admin.server.port)}\r\n" if host else ""
    raw = f"GET /status HTTP/1.1\r\n{line}\r\n".encode()
    assert exchange(admin, raw)[0] == 200


def test_configured_host_names_are_accepted() -> None:
    control = Control()
    server = AdminServer(control, "127.0.0.1:0", timeouts=SHORT, hosts=("LB1.Internal",))
    for running in _serve(server, control):
        raw = b"POST /reload HTTP/1.1\r\nHost: lb1.internal:9100\r\nContent-Length: 0\r\n\r\n"
        assert exchange(running, raw)[0] == 200
        raw = b"GET /status HTTP/1.1\r\nHost: lb1.internal.\r\n\r\n"  # names are case-free
        assert exchange(running, raw)[0] == 200
        raw = b"GET /status HTTP/1.1\r\nHost: lb2.internal\r\n\r\n"
        assert exchange(running, raw)[0] == 421


# --- further: other methods, oversized URLs, HEAD ----------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"PUT /reload HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
        (b"OPTIONS / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
        (b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
        (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", 431),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /%ff%00/../status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    ],
)
def test_other_hostile_requests(admin: Running, raw: bytes, status: int) -> None:
    got, _, body = exchange(admin, raw)
    assert got == status, body
    assert json.loads(body)["status"] == status


def test_host_check_in_a_running_balancer(tmp_path: Path) -> None:
    """`l4lb run` passes [admin] hosts to the server, and keeps them across a reload."""
    admin_port = free_port()
    text = config_text(f"127.0.0.1:{free_port()}", ["127.0.0.1:9"]) + (
        f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\nhosts = ["lb1.test"]\n'
    )
    with l4lb(tmp_path, text) as lb:
        assert wait_for(lambda: "event=admin_listening" in lb.log_text(), 20)

        def get(host: str, method: str = "GET", path: str = "/status") -> int:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:
                head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
                sock.sendall(head.encode())
                return read_response(sock)[0]

        assert get(f"127.0.0.1:{admin_port}") == 200
        assert get(f"lb1.test:{admin_port}") == 200
        assert get(f"rebind.example:{admin_port}", "POST", "/reload") == 421
        assert "event=reload" not in lb.log_text()
        lb.reload(text.replace('hosts = ["lb1.test"]', 'hosts = ["lb2.test"]'))
        assert wait_for(lambda: get("lb2.test") == 200, 10)
        assert get("lb1.test") == 421
