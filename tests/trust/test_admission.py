"""Admission over real loopback sockets driven by an asyncio loop: the header, the timeout, the
pending cap, and the client policy, with clients bound to distinct 127.x sources."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from l4lb.balancer.admission import Admission, Admitted, Rejected
from l4lb.config.schema import ListenerConfig
from l4lb.proxy_protocol import TLV, TLVType, build, local_header

LOOPS: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [
    ("asyncio", asyncio.new_event_loop),
    ("uvloop", uvloop.new_event_loop),  # what `l4lb run` uses
]


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test once on each event loop the balancer may run on (no plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        for name, factory in LOOPS:
            with asyncio.Runner(loop_factory=factory) as runner:
                try:
                    runner.run(test(*args, **kwargs))  # type: ignore[arg-type]
                except BaseException as err:
                    err.add_note(f"on the {name} event loop")
                    raise

    return run


V1 = b"PROXY TCP4 198.51.100.42 203.0.113.7 51000 443\r\n"
V2 = build(
    2,
    ("198.51.100.42", 51000),
    ("203.0.113.7", 443),
    tlvs=[
        TLV(TLVType.UNIQUE_ID, b"id-123"),
        TLV(TLVType.AUTHORITY, b"example.com"),
        TLV(0xEA, b"\x01vpce-1"),
    ],
)
V6 = b"PROXY TCP6 2001:db8::42 2001:db8::1 51000 443\r\n"
APP = b"GET / HTTP/1.0\r\n\r\n"


class Harness:
    """A listening socket on 127.0.0.1 whose accepted sockets go through one Admission."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        sock_class: type[socket.socket] = socket.socket,
        **keys: Any,
    ) -> None:
        self.host = host
        keys.setdefault("accept_proxy", "required")
        if keys["accept_proxy"] != "off":
            keys.setdefault("trusted_proxies", ("127.0.0.1/32",))
        keys.setdefault("proxy_header_timeout", "2s")
        self.config = ListenerConfig(name="test", bind="127.0.0.1:1", pool="p", **keys)
        self.sock_class = sock_class
        """What accepted sockets are re-made as before admission (a test's instrumented kind)."""
        self.admitted: list[tuple[socket.socket, Admitted]] = []
        self.rejected: list[Rejected] = []
        self.changed = asyncio.Event()

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Harness]:
        self.loop = asyncio.get_running_loop()
        self.admission = Admission(self.config, loop=self.loop, on_reject=self._rejected)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.create_server((self.host, 0), family=family, backlog=2000)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.loop.add_reader(self.listener.fileno(), self._accept)
        self.clients: list[socket.socket] = []
        try:
            yield self
        finally:
            self.loop.remove_reader(self.listener.fileno())
            self.admission.close()
            self.listener.close()
            for sock, _ in self.admitted:
                sock.close()
            for client in self.clients:
                client.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            if type(sock) is not self.sock_class:
                sock = self.sock_class(sock.family, sock.type, 0, sock.detach())
            self.admission.admit(sock, peer, sock.getsockname(), self._done)

    def _done(self, sock: socket.socket, admitted: Admitted) -> None:
        self.admitted.append((sock, admitted))
        self.changed.set()

    def _rejected(self, rejected: Rejected) -> None:
        self.rejected.append(rejected)
        self.changed.set()

    async def connect(self, source: str = "127.0.0.1") -> socket.socket:
        client = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
        client.setblocking(False)
        client.bind((source, 0))
        self.clients.append(client)
        await self.loop.sock_connect(client, (self.host, self.port))
        return client

    async def outcomes(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections have been admitted or rejected in all."""
        async with asyncio.timeout(timeout):
            while len(self.admitted) + len(self.rejected) < count:
                self.changed.clear()
                await self.changed.wait()

    async def send(self, client: socket.socket, data: bytes) -> None:
        await self.loop.sock_sendall(client, data)


async def read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(5):
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def closed_by_peer(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bool:
    """True when the other side closed (FIN or RST) within a few seconds."""
    try:
        async with asyncio.timeout(5):
            while True:
                if not await loop.sock_recv(client, 4096):
                    return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


HEADERS = [
    # (accept_proxy, header, expected client)
    ("required", V1, ("198.51.100.42", 51000)),
    ("required", V2, ("198.51.100.42", 51000)),
    ("required", V6, ("2001:db8::42", 51000)),
    ("optional", V1, ("198.51.100.42", 51000)),
    ("optional", V2, ("198.51.100.42", 51000)),
]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize(("mode", "header", "client"), HEADERS)
@in_loop
async def test_trusted_header_then_application_bytes_intact(
    mode: str, header: bytes, client: tuple[str, int], split: bool
) -> None:
    async with Harness(accept_proxy=mode, pass_tlvs=("unique_id", 0xEA)).run() as h:
        c = await h.connect("127.0.0.1")
        if split:  # one byte at a time, with pauses: segments the kernel cannot coalesce
            for i in range(len(header)):
                await h.send(c, header[i : i + 1])
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.05)
            await h.send(c, APP)
        else:
            await h.send(c, header + APP)
        await h.outcomes(1)
        assert h.rejected == []
        sock, admitted = h.admitted[0]
        assert admitted.client == client
        assert admitted.upstream is not None and admitted.upstream[0] == "127.0.0.1"
        assert admitted.header is not None
        # not one application byte was consumed with the header
        assert await read_exactly(h.loop, sock, len(APP)) == APP
        if header is V2:
            assert admitted.pass_tlvs == (
                TLV(TLVType.UNIQUE_ID, b"id-123"),
                TLV(0xEA, b"\x01vpce-1"),
            )
        else:
            assert admitted.pass_tlvs == ()


@in_loop
async def test_off_uses_the_socket_and_parses_nothing() -> None:
    async with Harness(accept_proxy="off").run() as h:
        c = await h.connect("127.0.0.7")
        await h.send(c, V1 + APP)
        await h.outcomes(1)
        sock, admitted = h.admitted[0]
        assert admitted.client == ("127.0.0.7", c.getsockname()[1])
        assert admitted.upstream is None and admitted.header is None
        assert await read_exactly(h.loop, sock, len(V1 + APP)) == V1 + APP


@in_loop
async def test_required_untrusted_is_closed_at_once() -> None:
    async with Harness(accept_proxy="required").run() as h:
        c = await h.connect("127.0.0.9")
        await h.outcomes(1)  # before the client sent anything
        assert h.admitted == []
        assert h.rejected[0].reason == "untrusted"
        assert h.rejected[0].peer[0] == "127.0.0.9"
        assert h.admission.rejections == {"untrusted": 1}
        assert await closed_by_peer(h.loop, c)


OPTIONAL = [
    # (source, first bytes, admitted client ip or rejection reason)
    ("127.0.0.9", V1, "spoofing_attempt"),
    ("127.0.0.9", V2, "spoofing_attempt"),
    ("127.0.0.9", V1[:5], "spoofing_attempt"),  # the v1 signature alone is enough
    ("127.0.0.9", APP, "127.0.0.9"),  # a direct client
    ("127.0.0.1", APP, "127.0.0.1"),  # a trusted peer without a header: a direct client
    ("127.0.0.9", b"\r\n\r\nx", "127.0.0.9"),  # close to v2's signature, but not it
]


@pytest.mark.parametrize(("source", "data", "expected"), OPTIONAL)
@in_loop
async def test_optional(source: str, data: bytes, expected: str) -> None:
    async with Harness(accept_proxy="optional").run() as h:
        c = await h.connect(source)
        await h.send(c, data)
        await h.outcomes(1)
        if expected[0].isdigit():
            sock, admitted = h.admitted[0]
            assert admitted.client[0] == expected
            assert admitted.upstream is None
            assert await read_exactly(h.loop, sock, len(data)) == data
        else:
            assert h.rejected[0].reason == expected
            assert h.admission.rejections == {expected: 1}
            assert await closed_by_peer(h.loop, c)


@in_loop
async def test_optional_split_signature_is_polled_not_spun() -> None:
    """A direct client's first bytes that could still become a signature ("\\r\\n") are left
    in the socket and re-peeked on a backoff, not in a busy loop, until they decide."""
    calls = 0

    class CountingPeeks(socket.socket):
        def recv(self, size: int, flags: int = 0) -> bytes:
            nonlocal calls
            if flags & socket.MSG_PEEK:  # one per look at the first bytes
                calls += 1
            return super().recv(size, flags)

    async with Harness(sock_class=CountingPeeks, accept_proxy="optional").run() as h:
        c = await h.connect("127.0.0.9")
        await h.send(c, b"\r\n")
        await asyncio.sleep(0.6)
        assert h.admitted == [] and h.rejected == []
        assert calls < 40, calls  # backoff to 100 ms: about a dozen peeks, not thousands
        await h.send(c, b"hello")
        await h.outcomes(1)
        sock, _ = h.admitted[0]
        assert await read_exactly(h.loop, sock, 7) == b"\r\nhello"


BAD = [
    (b"PROXY TCP4 198.51.100.42 203.0.113.7 051000 443\r\n", "bad_header:bad_port"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad_header:"),
    (b"GET / HTTP/1.0\r\n\r\n", "bad_header:bad_signature"),
    (b"PROXY TCP4 " + b"1" * 120, "bad_header:"),
]


@pytest.mark.parametrize(("data", "reason"), BAD)
@in_loop
async def test_bad_header_from_trusted_peer(data: bytes, reason: str) -> None:
    async with Harness(accept_proxy="required").run() as h:
        c = await h.connect("127.0.0.1")
        await h.send(c, data)
        await h.outcomes(1)
        assert h.admitted == []
        assert h.rejected[0].reason.startswith(reason)
        assert len(h.rejected[0].reason) > len("bad_header:")
        assert h.admission.rejections[h.rejected[0].reason] == 1
        assert await closed_by_peer(h.loop, c)


@pytest.mark.parametrize(
    "header", [local_header(2), b"PROXY UNKNOWN\r\n"], ids=["LOCAL", "UNKNOWN"]
)
@in_loop
async def test_local_and_unknown_use_the_socket_addresses(header: bytes) -> None:
    async with Harness(accept_proxy="required").run() as h:
        c = await h.connect("127.0.0.1")
        await h.send(c, header + APP)
        await h.outcomes(1)
        sock, admitted = h.admitted[0]
        assert admitted.client == c.getsockname()
        assert admitted.destination == ("127.0.0.1", h.port)
        assert admitted.upstream == c.getsockname()
        assert await read_exactly(h.loop, sock, len(APP)) == APP


@pytest.mark.parametrize(
    ("mode", "outcome"), [("required", "header_timeout"), ("optional", "admitted")]
)
@in_loop
async def test_silent_client_at_the_timeout(mode: str, outcome: str) -> None:
    async with Harness(accept_proxy=mode, proxy_header_timeout="300ms").run() as h:
        c = await h.connect("127.0.0.1")
        started = h.loop.time()
        await h.outcomes(1)
        assert h.loop.time() - started >= 0.25
        if outcome == "admitted":  # optional: a server-speaks-first client that connected directly
            assert h.admitted[0][1].client == c.getsockname()
        else:
            assert h.rejected[0].reason == outcome
            assert "within 0.3s" in h.rejected[0].detail
            assert await closed_by_peer(h.loop, c)


@in_loop
async def test_trickling_client_is_closed_at_the_timeout() -> None:
    async with Harness(accept_proxy="required", proxy_header_timeout="500ms").run() as h:
        c = await h.connect("127.0.0.1")
        started = h.loop.time()

        async def trickle() -> None:
            for byte in V1:
                await h.send(c, bytes([byte]))
                await asyncio.sleep(0.1)

        task = asyncio.create_task(trickle())
        try:
            await h.outcomes(1)
        finally:
            task.cancel()
        assert h.rejected[0].reason == "header_timeout"
        assert 0.4 <= h.loop.time() - started < 3
        assert "bytes received" in h.rejected[0].detail


@in_loop
async def test_eof_before_the_header() -> None:
    async with Harness(accept_proxy="required").run() as h:
        c = await h.connect("127.0.0.1")
        await h.send(c, V1[:10])
        await asyncio.sleep(0.05)
        c.shutdown(socket.SHUT_WR)
        await h.outcomes(1)
        assert h.rejected[0].reason == "eof"


@in_loop
async def test_pending_overflow_drops_the_oldest_and_spares_established() -> None:
    async with Harness(accept_proxy="required", max_pending_headers=3).run() as h:
        established = await h.connect("127.0.0.1")
        await h.send(established, V1)
        await h.outcomes(1)
        waiting = []
        for _ in range(5):
            waiting.append(await h.connect("127.0.0.1"))
            await asyncio.sleep(0.02)  # accepted in this order
        await h.outcomes(3)
        assert [r.reason for r in h.rejected] == ["pending_overflow", "pending_overflow"]
        assert [r.peer[1] for r in h.rejected] == [c.getsockname()[1] for c in waiting[:2]]
        assert h.admission.pending_headers == 3
        for c in waiting[:2]:
            assert await closed_by_peer(h.loop, c)
        # the newer ones still get through, and the established connection never noticed
        await h.send(waiting[4], V1)
        await h.outcomes(4)
        sock, _ = h.admitted[0]
        await h.send(established, b"still here")
        assert await read_exactly(h.loop, sock, 10) == b"still here"


def header_from(ip: str) -> bytes:
    return f"PROXY TCP4 {ip} 203.0.113.7 40000 443\r\n".encode()


POLICY = [
    # (keys, real client ip, expected reason or None)
    ({"deny": ("198.51.100.0/24",)}, "198.51.100.42", "denied"),
    ({"deny": ("198.51.100.0/24",)}, "198.51.101.1", None),
    ({"allow": ("192.0.2.0/24",)}, "192.0.2.5", None),
    ({"allow": ("192.0.2.0/24",)}, "198.51.100.42", "not_allowed"),
    ({"allow": ("198.51.100.0/24",), "deny": ("198.51.100.42/32",)}, "198.51.100.42", "denied"),
    ({"allow": ("198.51.100.0/24",), "deny": ("198.51.100.42/32",)}, "198.51.100.43", None),
]


@pytest.mark.parametrize(("keys", "ip", "expected"), POLICY)
@in_loop
async def test_policy_on_the_real_client(
    keys: dict[str, Any], ip: str, expected: str | None
) -> None:
    async with Harness(accept_proxy="required", **keys).run() as h:
        c = await h.connect("127.0.0.1")  # the trusted proxy itself is in no list
        await h.send(c, header_from(ip))
        await h.outcomes(1)
        if expected is None:
            assert h.admitted[0][1].client[0] == ip
        else:
            assert h.rejected[0].reason == expected
            assert h.rejected[0].client is not None and h.rejected[0].client[0] == ip
            assert h.rejected[0].peer[0] == "127.0.0.1"


@in_loop
async def test_deny_file(tmp_path: Any) -> None:
    path = tmp_path / "deny.txt"
    path.write_text("# bad actors\n127.0.0.66\n10.0.0.0/8\n")
    async with Harness(accept_proxy="off", deny_file=str(path)).run() as h:
        for source in ("127.0.0.66", "127.0.0.67"):
            await h.connect(source)
        await h.outcomes(2)
        assert [r.peer[0] for r in h.rejected] == ["127.0.0.66"]
        assert h.admitted[0][1].client[0] == "127.0.0.67"


@in_loop
async def test_conn_limit_per_client_and_release() -> None:
    async with Harness(accept_proxy="off", max_conns_per_client=2).run() as h:
        for _ in range(3):
            await h.connect("127.0.0.20")
        await h.connect("127.0.0.21")
        await h.outcomes(4)
        assert [a.client[0] for _, a in h.admitted] == ["127.0.0.20", "127.0.0.20", "127.0.0.21"]
        assert h.rejected[0].reason == "over_conn_limit"
        h.admission.release(h.admitted[0][1])
        await h.connect("127.0.0.20")
        await h.outcomes(5)
        assert len(h.admitted) == 4


@in_loop
async def test_rate_limit_per_real_client() -> None:
    async with Harness(
        accept_proxy="required", new_conns_per_client="1/m", new_conns_burst=2
    ).run() as h:
        for ip in ("198.51.100.1", "198.51.100.1", "198.51.100.1", "198.51.100.2"):
            c = await h.connect("127.0.0.1")
            await h.send(c, header_from(ip))
            await h.outcomes(len(h.admitted) + len(h.rejected) + 1)
        assert [a.client[0] for _, a in h.admitted] == ["198.51.100.1"] * 2 + ["198.51.100.2"]
        assert [r.reason for r in h.rejected] == ["over_rate_limit"]
        assert h.admission.rejections == {"over_rate_limit": 1}


@in_loop
async def test_v4_mapped_peer_is_trusted_as_ipv4() -> None:
    """A dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d; trust matches them as IPv4."""
    h = Harness(accept_proxy="required", trusted_proxies=("127.0.0.1/32",))
    async with h.run():
        listener = socket.socket(socket.AF_INET6)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::ffff:127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        try:
            for source in ("127.0.0.1", "127.0.0.9"):
                c = socket.socket()
                c.bind((source, 0))
                h.clients.append(c)
                c.connect(("127.0.0.1", port))
                c.sendall(V1)
                sock, peer = listener.accept()
                assert peer[0] == f"::ffff:{source}"
                h.admission.admit(sock, peer, sock.getsockname(), h._done)
            await h.outcomes(2)
        finally:
            listener.close()
        assert h.admitted[0][1].client == ("198.51.100.42", 51000)
        assert [r.reason for r in h.rejected] == ["untrusted"]


def test_bad_deny_file_names_file_and_line(tmp_path: Any) -> None:
    path = tmp_path / "deny.txt"
    path.write_text("10.0.0.0/8\n10.0.0.1/8\n")
    config = ListenerConfig(name="t", bind="127.0.0.1:1", pool="p", deny_file=str(path))
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match=rf"{path}:2: .*host bits"):
            Admission(config, loop=loop, on_reject=lambda r: None)
    finally:
        loop.close()


def test_off_path_allocates_only_the_admitted_value() -> None:
    """With no header and no client policy, admit() is a straight hand-over."""
    loop = asyncio.new_event_loop()
    try:
        config = ListenerConfig(name="t", bind="127.0.0.1:1", pool="p")
        admission = Admission(config, loop=loop, on_reject=lambda r: None)
        got: list[Admitted] = []
        done: Callable[[Any, Admitted], None] = lambda s, a: got.append(a)  # noqa: E731
        admission.admit(None, ("127.0.0.5", 1), ("127.0.0.1", 2), done)  # type: ignore[arg-type]
        assert got == [Admitted(client=("127.0.0.5", 1), destination=("127.0.0.1", 2))]
        admission.release(got[0])
        assert admission.rejections == {}
    finally:
        loop.close()


def test_running_listener_config_is_read_not_guessed() -> None:
    """The balancer passes its listener's ListenerConfig: the trust keys come from there,
    never from defaults."""
    config = ListenerConfig(
        name="edge",
        bind="127.0.0.1:1",
        pool="p",
        accept_proxy="required",
        trusted_proxies=("10.0.0.0/8",),
        deny=("192.0.2.0/24",),
        max_conns_per_client=3,
    )
    loop = asyncio.new_event_loop()
    try:
        admission = Admission(config, loop=loop, on_reject=lambda r: None)
    finally:
        loop.close()
    assert admission.policy is not None and admission.policy.is_trusted("10.1.2.3")
    assert "192.0.2.9" in admission.deny
    assert admission.limiter is not None and admission.limiter.max_conns == 3


@in_loop
async def test_random_first_bytes_are_admitted_or_rejected_never_raise() -> None:
    """Garbage, truncated and valid headers in random chunks from a trusted peer: every
    connection ends admitted (header) or rejected with a reason, and nothing else happens."""
    rng = random.Random(44)
    samples = [V1, V2, V6, local_header(2), b"PROXY UNKNOWN\r\n"]
    payloads = []
    for i in range(40):
        base = rng.choice(samples)
        if i % 3 == 0:  # flip a byte
            j = rng.randrange(len(base))
            base = base[:j] + bytes([rng.randrange(256)]) + base[j + 1 :]
        elif i % 3 == 1:  # random bytes after a valid prefix
            base = base[: rng.randrange(len(base))] + rng.randbytes(rng.randrange(1, 40))
        payloads.append(base + APP)
    async with Harness(accept_proxy="required", proxy_header_timeout="1s").run() as h:
        for n, payload in enumerate(payloads, 1):
            c = await h.connect("127.0.0.1")
            cut = sorted(rng.sample(range(1, len(payload)), 3))
            for a, b in zip([0, *cut], [*cut, len(payload)], strict=True):
                try:
                    await h.send(c, payload[a:b])
                except OSError:  # already rejected and closed
                    break
                await asyncio.sleep(0.001)
            await h.outcomes(n)
        assert len(h.admitted) + len(h.rejected) == len(payloads)
        for r in h.rejected:
            assert r.reason.startswith("bad_header:") or r.reason == "header_timeout", r
        for sock, admitted in h.admitted:
            assert admitted.header is not None
            # whatever was accepted, the bytes after the header are still in the socket
            assert len(await read_exactly(h.loop, sock, 1)) == 1
        assert len(h.admitted) >= 10


def test_reload_keeps_per_client_counts_when_limits_are_unchanged() -> None:
    loop = asyncio.new_event_loop()
    try:
        keys: dict[str, Any] = {"name": "t", "bind": "127.0.0.1:1", "pool": "p"}
        before = Admission(
            ListenerConfig(**keys, max_conns_per_client=1), loop=loop, on_reject=lambda r: None
        )
        assert before.limiter is not None
        assert before.limiter.acquire("127.0.0.7") is None  # an open connection
        before.rejections["denied"] += 2
        # a reload that changes the deny list but not the limits
        after = Admission(
            ListenerConfig(**keys, max_conns_per_client=1, deny=("192.0.2.0/24",)),
            loop=loop,
            on_reject=lambda r: None,
        )
        after.adopt(before)
        assert after.limiter is before.limiter
        assert after.limiter.acquire("127.0.0.7") == "over_conn_limit"
        assert after.rejections["denied"] == 2
        # changed limits start afresh
        changed = Admission(
            ListenerConfig(**keys, max_conns_per_client=5), loop=loop, on_reject=lambda r: None
        )
        changed.adopt(after)
        assert changed.limiter is not before.limiter
    finally:
        loop.close()


@in_loop
async def test_ipv6_upstream_and_ipv6_client_limits_per_prefix() -> None:
    """An IPv6 upstream (::1) is trusted by its /128; the real clients it names are limited per
    client_v6_prefix: two addresses in one /64 share one budget, the next /64 has its own."""
    h = Harness(
        host="::1", accept_proxy="required", trusted_proxies=("::1/128",), max_conns_per_client=1
    )
    async with h.run():
        for n, ip in enumerate(["2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:2::1"], 1):
            c = await h.connect("::1")
            await h.send(c, f"PROXY TCP6 {ip} 2001:db8::443 40000 443\r\n".encode())
            await h.outcomes(n)
        assert [a.client[0] for _, a in h.admitted] == ["2001:db8:1:1::1", "2001:db8:1:2::1"]
        assert [(r.reason, r.client) for r in h.rejected] == [
            ("over_conn_limit", ("2001:db8:1:1::2", 40000))
        ]
        assert h.admitted[0][1].upstream is not None and h.admitted[0][1].upstream[0] == "::1"
