"""The stage between accept() and connect(): who the real client is, and whether it may pass.

For each accepted socket, :class:`Admission` applies the listener's trust boundary and then its
client policy, and hands the socket on (``done``) or closes it (``on_reject``, a counter, a log
line). Nothing here reads a byte a backend should see:

1. **The header** (``accept_proxy``), decided by the shared :class:`~l4lb.trust.policy.ProxyPolicy`.
   The socket is peeked (``MSG_PEEK``) from a ``loop.add_reader`` callback (no task per
   connection) and only the newly peeked suffix is fed to the connection's gate; once the gate
   decides, exactly the header's length is ``recv``-ed, so the application's first bytes are
   still in the socket for the relay. A header split across segments is taken as it comes: bytes
   already known to belong to the header are consumed (so a peeked, unconsumed buffer never keeps
   the socket readable in a busy loop); while the first bytes cannot yet tell a header from a
   direct client's data (``optional``), the socket is re-peeked on a short backoff instead.
2. **The timeout and the cap**: connections waiting for their header sit in arrival order, which
   is also deadline order, under one timer; past ``max_pending_headers`` the oldest are dropped.
3. **Policy on the real client**: ``deny`` and ``deny_file`` first, then ``allow``, then
   ``max_conns_per_client`` and ``new_conns_per_client`` (:mod:`l4lb.trust.limits`).

Every rejection is counted in :attr:`Admission.rejections` by reason (``untrusted``,
``spoofing_attempt``, ``bad_header:<codec reason>``, ``header_timeout``, ``eof``,
``pending_overflow``, ``denied``, ``not_allowed``, ``over_conn_limit``, ``over_rate_limit``).
With ``accept_proxy = "off"`` and no client policy, :meth:`Admission.admit` allocates nothing but
the :class:`Admitted` value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

from l4lb.balancer.relay_contract import Socket
from l4lb.config.values import format_hostport
from l4lb.proxy_protocol import TLV, ProxyHeader, sniff
from l4lb.trust.cidr import CidrError, CidrSet, ip_to_int
from l4lb.trust.limits import ClientLimiter, Rate
from l4lb.trust.policy import Decision, HeaderGate, Mode, ProxyPolicy, Reason

if TYPE_CHECKING:
    from l4lb.config.schema import ListenerConfig

__all__ = ["Address", "Admission", "Admitted", "Rejected"]

Address = tuple[str, int]
SockAddress = tuple[Any, ...]
"""An address as the socket module gives it: ``(host, port)``, or IPv6's 4-tuple."""

log = logging.getLogger("l4lb.admission")

# How much to peek beyond what the gate asks for: a whole v1 line (107 bytes) or a v2 header with
# its addresses and usual TLVs in one system call. Peeking past the header is harmless: it is
# not consumed, and the gate hands it back as trailing data.
_PEEK_WINDOW = 512
# Re-peek backoff while the first bytes cannot tell a header from application data.
_POLL_FIRST = 0.005
_POLL_MAX = 0.1


@final
class Admitted:
    """A connection let through: its real addresses, and what the upstream told us.

    A value: its fields are ``Final`` (read-only to mypy), and it compares and hashes by them.
    Not a dataclass: this module is compiled with mypyc, which leaves a dataclass's ``__init__``
    to the ``dataclasses`` module, in Python (a frozen one sets each field through
    ``object.__setattr__``: 8.6k instructions per connection, measured); this one is native.
    """

    __slots__ = ("client", "destination", "header", "health_check", "pass_tlvs", "upstream")

    def __init__(
        self,
        client: Address,
        destination: Address,
        upstream: Address | None = None,
        header: ProxyHeader | None = None,
        pass_tlvs: tuple[TLV, ...] = (),
        health_check: bool = False,
    ) -> None:
        self.client: Final = client
        """The real client: from the PROXY header, or the socket's peer."""
        self.destination: Final = destination
        """The original destination: from the PROXY header, or the socket's own address."""
        self.upstream: Final = upstream
        """The trusted proxy the connection came through; None for a direct client."""
        self.header: Final = header
        """The PROXY header received from the upstream, if any."""
        self.pass_tlvs: Final = pass_tlvs
        """Upstream TLVs to forward to the backend (the listener's ``pass_tlvs``)."""
        self.health_check: Final = health_check
        """A PROXY ``LOCAL``/``UNKNOWN`` connection: the upstream's health check, passed on."""

    def _fields(self) -> tuple[object, ...]:
        return (
            self.client,
            self.destination,
            self.upstream,
            self.header,
            self.pass_tlvs,
            self.health_check,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Admitted):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Admitted(client={self.client!r}, destination={self.destination!r}, "
            f"upstream={self.upstream!r}, header={self.header!r}, "
            f"pass_tlvs={self.pass_tlvs!r}, health_check={self.health_check!r})"
        )


@dataclass(frozen=True, slots=True)
class Rejected:
    """A connection refused before it reached a backend, for the log and the counters."""

    peer: Address
    reason: str
    detail: str = ""
    client: Address | None = None


class _Waiting:
    """One connection waiting for its header (internal)."""

    __slots__ = (
        "backoff",
        "deadline",
        "done",
        "fd",
        "gate",
        "peer",
        "poll",
        "reading",
        "sock",
        "taken",
    )

    def __init__(
        self,
        sock: Socket,
        peer: Address,
        gate: HeaderGate,
        done: Callable[[Socket, Admitted], None],
        deadline: float,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.gate = gate
        self.done = done
        self.deadline = deadline
        self.taken = 0
        """Header bytes already consumed from the socket (the gate was fed ``gate.received``)."""
        self.reading = False
        self.poll: asyncio.TimerHandle | None = None
        self.backoff = _POLL_FIRST


class Admission:
    """Admits or rejects accepted sockets for one listener."""

    def __init__(
        self,
        cfg: ListenerConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        on_reject: Callable[[Rejected], None],
    ) -> None:
        """Compile the listener's policy. Raises ValueError (a CidrError naming ``file:line``
        for ``deny_file``, or a PolicyError) for a policy that cannot be built."""
        self.loop = loop
        self.on_reject = on_reject
        self.rejections: Counter[str] = Counter()
        self.health_checks: Counter[str] = Counter()
        """Upstream health checks (PROXY LOCAL) by what was done: ``answered`` or ``passed``."""
        self.answers_checks = cfg.local_checks == "answer"
        self.config = cfg
        self.name: str = cfg.name

        mode = Mode(cfg.accept_proxy)
        self.policy: ProxyPolicy | None = None
        if mode is not Mode.OFF:
            self.policy = ProxyPolicy(
                mode,
                trusted=cfg.trusted_proxies,
                header_timeout=cfg.proxy_header_timeout_s,
            )
        self.max_pending: int = cfg.max_pending_headers
        self.pass_types: frozenset[int] = frozenset(cfg.pass_tlv_types)

        self.deny = CidrSet()
        self.deny.update(cfg.deny, where=f"listener {self.name}: deny")
        if cfg.deny_file:
            self.deny.load(cfg.deny_file)
        self.allow = CidrSet()
        self.allow.update(cfg.allow, where=f"listener {self.name}: allow")

        max_conns: int | None = cfg.max_conns_per_client
        per_second: float | None = cfg.new_conns_rate
        self.limiter: ClientLimiter | None = None
        if max_conns is not None or per_second is not None:
            rate = None
            if per_second is not None:
                rate = Rate(per_second, float(cfg.new_conns_burst_size))
            self.limiter = ClientLimiter(
                max_conns=max_conns,
                rate=rate,
                v6_prefix=cfg.client_v6_prefix,
            )
        self._checks_client = bool(self.deny or self.allow or self.limiter)
        self.direct = self.policy is None and not self._checks_client
        """Nothing to decide (no header to read, no client policy): the listener makes the
        :class:`Admitted` itself, without a call through :meth:`admit` and its callback."""
        self._counts_conns = self.limiter is not None and self.limiter.max_conns is not None
        self._waiting: OrderedDict[int, _Waiting] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending_headers(self) -> int:
        """Connections accepted and still waiting for their PROXY header."""
        return len(self._waiting)

    # -- the entry point -------------------------------------------------------------------

    def admit(
        self,
        sock: Socket,
        peer: SockAddress,
        sockname: SockAddress,
        done: Callable[[Socket, Admitted], None],
    ) -> None:
        """Take ownership of ``sock``; call ``done`` once if it is admitted, else close it."""
        policy = self.policy
        if policy is None:
            # The hot path: (host, port) pairs as the listener passes them, no copies.
            client: Address = peer if len(peer) == 2 else (peer[0], peer[1])
            if self._checks_client and not self._client_passes(sock, client, client):
                return
            here: Address = sockname if len(sockname) == 2 else (sockname[0], sockname[1])
            done(sock, Admitted(client, here))
            return
        gate = policy.start(peer, sockname)
        if gate.decision is not None:  # required, untrusted: not one byte is read
            self._decided(sock, gate.decision, done)
            return
        if sock.gettimeout() != 0.0:  # the listener's are non-blocking already (no ioctl)
            sock.setblocking(False)
        waiting = _Waiting(sock, gate.peer, gate, done, self.loop.time() + policy.header_timeout)
        # The header usually arrives with the connection: try before registering anything.
        if self._advance(waiting):
            self._wait(waiting)

    # -- waiting for the header ------------------------------------------------------------

    def _wait(self, waiting: _Waiting) -> None:
        while len(self._waiting) >= self.max_pending:
            _, oldest = self._waiting.popitem(last=False)
            self._stop_waiting(oldest)
            self._reject(
                oldest.sock,
                oldest.peer,
                "pending_overflow",
                f"dropped: {self.max_pending} connections were already waiting for a header "
                f"(max_pending_headers); this was the oldest, {oldest.gate.received} bytes in",
            )
        self._waiting[waiting.fd] = waiting
        if not waiting.reading and waiting.poll is None:
            self.loop.add_reader(waiting.fd, self._on_readable, waiting)
            waiting.reading = True
        if self._timer is None:
            self._timer = self.loop.call_at(waiting.deadline, self._expire)

    def _on_readable(self, waiting: _Waiting) -> None:
        waiting.poll = None
        if not self._advance(waiting):
            self._forget(waiting)

    def _advance(self, waiting: _Waiting) -> bool:
        """Peek what is new and feed it; True while the header is still awaited."""
        gate, sock = waiting.gate, waiting.sock
        buffered = gate.received - waiting.taken
        size = buffered + max(gate.next_read_size(), _PEEK_WINDOW)
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            if buffered:
                self._poll_later(waiting)
            return True
        except OSError as err:
            self._stop_waiting(waiting)
            self._reject(sock, waiting.peer, "eof", f"{err.strerror or err} before the header")
            return False
        decision: Decision | None
        if len(data) > buffered:
            decision = gate.feed(data[buffered:])
        elif not data:
            decision = gate.eof()
        else:  # nothing new since the last look (only while polling)
            self._poll_later(waiting)
            return True
        if decision is None:
            if waiting.taken or self._header_started(data):
                # Every byte peeked belongs to the header (it would be complete otherwise):
                # consume them, so the socket is readable again only when more arrive.
                if not self._take(waiting, len(data)):
                    return False
                if not waiting.reading:
                    self.loop.add_reader(waiting.fd, self._on_readable, waiting)
                    waiting.reading = True
                    waiting.backoff = _POLL_FIRST
            else:
                self._poll_later(waiting)
            return True
        self._stop_waiting(waiting)
        more = decision.consumed - waiting.taken if decision.accepted else 0
        if more > 0 and not self._take(waiting, more):
            return False
        self._decided(sock, decision, waiting.done)
        return False

    def _header_started(self, data: bytes) -> bool:
        """Whether undecided peeked bytes are certainly header bytes (safe to consume)."""
        assert self.policy is not None
        return self.policy.mode is Mode.REQUIRED or sniff(data) in (1, 2)

    def _take(self, waiting: _Waiting, count: int) -> bool:
        """``recv`` exactly ``count`` bytes already peeked; False (and rejected) on failure."""
        sock = waiting.sock
        try:
            while count > 0:
                got = sock.recv(count)
                if not got:
                    raise ConnectionResetError("connection closed")
                count -= len(got)
                waiting.taken += len(got)
        except OSError as err:
            self._stop_waiting(waiting)
            self._forget(waiting)
            self._reject(sock, waiting.peer, "eof", f"{err.strerror or err} inside the header")
            return False
        return True

    def _forget(self, waiting: _Waiting) -> None:
        # By identity: once a socket is closed its descriptor number may belong to a newer one.
        if self._waiting.get(waiting.fd) is waiting:
            del self._waiting[waiting.fd]

    def _poll_later(self, waiting: _Waiting) -> None:
        if waiting.reading:
            self.loop.remove_reader(waiting.fd)
            waiting.reading = False
        if waiting.poll is None:
            waiting.poll = self.loop.call_later(waiting.backoff, self._on_readable, waiting)
            waiting.backoff = min(waiting.backoff * 2, _POLL_MAX)

    def _stop_waiting(self, waiting: _Waiting) -> None:
        if waiting.reading:
            self.loop.remove_reader(waiting.fd)
            waiting.reading = False
        if waiting.poll is not None:
            waiting.poll.cancel()
            waiting.poll = None

    def _expire(self) -> None:
        """The one timer: close (or, per the policy, decide) every connection past its deadline."""
        self._timer = None
        # A timer may fire a little early (uvloop rounds to milliseconds): don't re-arm for that.
        now = self.loop.time() + 0.002
        while self._waiting:
            fd, waiting = next(iter(self._waiting.items()))
            if waiting.deadline > now:
                self._timer = self.loop.call_at(waiting.deadline, self._expire)
                return
            del self._waiting[fd]
            self._stop_waiting(waiting)
            self._decided(waiting.sock, waiting.gate.expire(), waiting.done)

    # -- after the header: the policy on the real client -----------------------------------

    def _decided(
        self,
        sock: Socket,
        decision: Decision,
        done: Callable[[Socket, Admitted], None],
    ) -> None:
        if not decision.accepted:
            reason = str(decision.reason)
            if decision.reason is Reason.BAD_HEADER:
                reason = f"bad_header:{decision.detail.split(':', 1)[0]}"
            self._reject(sock, decision.upstream, reason, decision.detail)
            return
        assert decision.client is not None and decision.destination is not None
        client = decision.client
        check = decision.reason is Reason.LOCAL
        if check:
            # The upstream's own health check: its peer is a trusted proxy, not a client, so
            # the client policy does not apply; counted apart and logged at debug only.
            self.health_checks["answered" if self.answers_checks else "passed"] += 1
            if self.answers_checks:
                log.debug(
                    "event=health_check listener=%s upstream=%s answered=closed",
                    self.name,
                    _fmt(decision.upstream),
                )
                sock.close()
                return
        via_upstream = decision.reason in (Reason.HEADER, Reason.LOCAL)
        passes = self._client_passes
        if not check and self._checks_client and not passes(sock, decision.upstream, client):
            return
        header = decision.header
        passed: tuple[TLV, ...] = ()
        if header is not None and self.pass_types:
            passed = tuple(t for t in header.tlvs if t.type in self.pass_types)
        admitted = Admitted(
            client=client,
            destination=decision.destination,
            upstream=decision.upstream if via_upstream else None,
            header=header,
            pass_tlvs=passed,
            health_check=check,
        )
        try:
            done(sock, admitted)
        except Exception:
            log.exception("event=admit_failed listener=%s client=%s", self.name, _fmt(client))
            self.release(admitted)
            sock.close()

    def _client_passes(self, sock: Socket, peer: Address, client: Address) -> bool:
        """deny, then allow, then the limits; False (and the socket rejected) if one says no."""
        try:
            version, value = ip_to_int(client[0])
        except CidrError:
            self._reject(
                sock, peer, "not_allowed", f"client {client[0]!r} is not an IP address", client
            )
            return False
        if self.deny.contains_int(version, value):
            self._reject(sock, peer, "denied", "client is in deny/deny_file", client)
            return False
        if self.allow and not self.allow.contains_int(version, value):
            self._reject(sock, peer, "not_allowed", "client is not in allow", client)
            return False
        limiter = self.limiter
        if limiter is not None:
            over = limiter.acquire_key(limiter.key_of(version, value))
            if over is not None:
                what = (
                    f"{limiter.max_conns} open connections (max_conns_per_client)"
                    if over == "over_conn_limit"
                    else "new connections over new_conns_per_client"
                )
                self._reject(sock, peer, over, f"client already has {what}", client)
                return False
        return True

    def _reject(
        self,
        sock: Socket,
        peer: Address,
        reason: str,
        detail: str,
        client: Address | None = None,
    ) -> None:
        sock.close()
        self.rejections[reason] += 1
        rejected = Rejected(peer=(peer[0], peer[1]), reason=reason, detail=detail, client=client)
        log.info(
            "event=rejected listener=%s peer=%s client=%s reason=%s detail=%r",
            self.name,
            _fmt(peer),
            _fmt(client),
            reason,
            detail,
        )
        self.on_reject(rejected)

    # -- the rest of a connection's life ---------------------------------------------------

    def adopt(self, previous: Admission) -> None:
        """Take over a reloaded listener's state: the rejection counter (shared: rejections the
        old admission still makes count there too), and the per-client limiter when its settings
        are unchanged, so connections still open from before the reload keep counting against
        their clients (they release into the same limiter)."""
        previous.rejections.update(self.rejections)
        self.rejections = previous.rejections
        previous.health_checks.update(self.health_checks)
        self.health_checks = previous.health_checks
        old, new = previous.limiter, self.limiter
        if (
            old is not None
            and new is not None
            and (old.max_conns, old.rate, old.v6_prefix) == (new.max_conns, new.rate, new.v6_prefix)
        ):
            self.limiter = old

    def release(self, admitted: Admitted) -> None:
        """The admitted connection has closed: give back its per-client slots."""
        if self._counts_conns and not admitted.health_check:  # checks took no slot
            assert self.limiter is not None
            with contextlib.suppress(CidrError):
                self.limiter.release_key(self.limiter.key_of(*ip_to_int(admitted.client[0])))

    def close(self) -> None:
        """The listener stops: abandon connections still waiting for their header."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            _, waiting = self._waiting.popitem(last=False)
            self._stop_waiting(waiting)
            waiting.sock.close()


def _fmt(address: Address | None) -> str:
    return "-" if address is None else format_hostport(address[0], address[1])
