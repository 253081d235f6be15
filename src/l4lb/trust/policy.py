"""Who may send a PROXY header, and what a connection's first bytes decide: sans-IO, no sockets.

:class:`ProxyPolicy` is the one implementation of the ``accept_proxy`` rules, shared by the
balancer's listeners and every :mod:`l4lb.backend` integration. For each accepted connection,
:meth:`ProxyPolicy.start` returns a :class:`HeaderGate`; the caller feeds it the connection's new
bytes until it returns a :class:`Decision` (or calls :meth:`HeaderGate.expire` when
``header_timeout`` passes, :meth:`HeaderGate.eof` when the peer closes first).

The rules never guess:

``required``
    A trusted peer must start with a valid v1 or v2 header; anything else is rejected with the
    reason. An untrusted peer is rejected at once, before a byte is read.
``optional``
    A trusted peer may send a header or not, decided by the signature alone. An untrusted peer
    whose first bytes are a PROXY signature is rejected as a spoofing attempt; otherwise it is
    served as a direct client. A peer that sends nothing until the timeout (a client of a
    server-speaks-first protocol that connected directly) is accepted as a direct client; a peer
    that sent part of a signature and then nothing is rejected at the timeout.
``off``
    Nothing is parsed: the socket's addresses are the client's.

A LOCAL (v2) or UNKNOWN (v1) header from a trusted peer is accepted with the socket's own
addresses: that is how upstream balancers health-check.

Reading without consuming past the header (needed when the socket is spliced or handed over):
read at most :meth:`HeaderGate.next_read_size` bytes with ``recv``; or, for a v1 header whose end
is only known by its CRLF, peek (``MSG_PEEK``) up to ``gate.received + gate.next_read_size()``
bytes, feed only the part past ``gate.received``, and once decided ``recv`` exactly
``decision.consumed`` bytes to drop the header; ``decision.trailing`` is then still in the socket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from l4lb.config.values import format_hostport
from l4lb.proxy_protocol import (
    Command,
    HeaderReader,
    ParseOptions,
    ProxyHeader,
    ProxyProtocolError,
    sniff,
)
from l4lb.trust.cidr import CidrSet

__all__ = [
    "Address",
    "Decision",
    "HeaderGate",
    "Mode",
    "PolicyError",
    "ProxyPolicy",
    "Reason",
]

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest signature sniff() may need (v2's 12 bytes). No PROXY header is shorter than 15
# bytes ("PROXY UNKNOWN\r\n"), so reading this much while sniffing never passes a header's end.
_SNIFF_BYTES = 12
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


MAX_HEADER_TIMEOUT = 2147483.647
"""2^31-1 ms (the config's ceiling for durations too): every integration can wait that long
(``socket.settimeout`` overflows on larger values, and infinity is no timeout at all)."""


class PolicyError(ValueError):
    """A policy that cannot be built: a bad mode, CIDR or timeout; the message says which."""


class Mode(StrEnum):
    """``accept_proxy``: whether a connection must, may, or must not start with a PROXY header."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    OFF = "off"


class Reason(StrEnum):
    """Why a connection was accepted or rejected: for logs and per-reason counters."""

    # accepted
    HEADER = "header"
    """A trusted peer sent a valid header: the client is the header's source."""
    LOCAL = "local"
    """A trusted peer sent LOCAL (v2) or UNKNOWN (v1): the socket's own addresses are used."""
    NO_HEADER = "no_header"
    """``optional``: a trusted peer sent no header (no signature): a direct client."""
    DIRECT = "direct"
    """``off``, or ``optional`` with an untrusted peer that sent no signature: a direct client."""
    # rejected
    UNTRUSTED = "untrusted"
    """``required``: the peer is not in ``trusted``."""
    SPOOFING_ATTEMPT = "spoofing_attempt"
    """``optional``: an untrusted peer started with a PROXY signature."""
    BAD_HEADER = "bad_header"
    """A trusted peer sent no valid header (the detail names the codec's reason)."""
    HEADER_TIMEOUT = "header_timeout"
    """The header was not complete within ``header_timeout``."""
    EOF = "eof"
    """The peer closed the connection before its header was complete."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the first bytes of one connection decided. One value, accepted or not."""

    accepted: bool
    reason: Reason
    upstream: Address
    """The socket's peer: the balancer for a proxied connection, the client for a direct one."""
    detail: str = ""
    """Human text: what was wrong (the codec's reason and message) or what was accepted."""
    client: Address | None = None
    """The real client; None when rejected."""
    destination: Address | None = None
    """The original destination (the header's, or the socket's own address); None when rejected."""
    header: ProxyHeader | None = None
    """The PROXY header, including LOCAL/UNKNOWN ones; None without one."""
    consumed: int = 0
    """How many bytes at the start of the stream the header occupied (0 without a header)."""
    trailing: bytes = b""
    """Bytes fed after the header (all bytes fed, without one): application data, in order."""

    @property
    def proxied(self) -> bool:
        """True when the client address came from a PROXY header."""
        return self.accepted and self.reason is Reason.HEADER

    def describe(self) -> str:
        """One log line: ``rejected 127.0.0.9:4000: spoofing_attempt (...)``."""
        peer = _format_address(self.upstream)
        if not self.accepted:
            return f"rejected {peer}: {self.reason} ({self.detail})"
        client = _format_address(self.client) if self.client else "-"
        return f"accepted {client} via {peer}: {self.reason}" + (
            f" ({self.detail})" if self.detail else ""
        )


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """The ``accept_proxy`` rules for one listener: mode, trusted peers, header timeout.

    ``trusted`` takes CIDR strings (``"10.0.0.0/8"``, ``"127.0.0.1"``) or ``ip_network`` values and
    is normalised to a tuple of networks (IPv4-mapped IPv6 blocks become IPv4 blocks).
    """

    mode: Mode | str = Mode.REQUIRED
    trusted: tuple[Network, ...] | Iterable[str | Network] = ()
    header_timeout: float = 5.0
    options: ParseOptions = field(default_factory=ParseOptions)
    _matcher: CidrSet = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        try:
            mode = Mode(self.mode)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in Mode)
            raise PolicyError(f"mode {self.mode!r} is not one of {choices}") from None
        object.__setattr__(self, "mode", mode)
        if isinstance(self.trusted, str | ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PolicyError(f"trusted must be a list of CIDR blocks, not {self.trusted!r}")
        networks = tuple(_network(item) for item in self.trusted)
        object.__setattr__(self, "trusted", networks)
        # The balancer's CIDR sets: one lookup per distinct prefix length, whatever the list size.
        object.__setattr__(self, "_matcher", CidrSet(str(network) for network in networks))
        timeout = self.header_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_HEADER_TIMEOUT
        ):
            raise PolicyError(
                f"header_timeout must be a positive number of seconds up to "
                f"{MAX_HEADER_TIMEOUT:g} (2^31-1 ms), not {timeout!r}"
            )
        object.__setattr__(self, "header_timeout", float(timeout))

    @property
    def networks(self) -> tuple[Network, ...]:
        """``trusted`` as normalised (typed for callers; equal to ``self.trusted``)."""
        return self.trusted  # type: ignore[return-value]

    def is_trusted(self, ip: str) -> bool:
        """Whether a socket peer address may send a PROXY header.

        IPv4-mapped IPv6 peers (``::ffff:10.1.2.3``, a dual-stack socket's view of IPv4) are
        matched as IPv4; a zone suffix is ignored. Anything unparsable is untrusted.
        """
        return ip in self._matcher

    def start(self, peer: object, sockname: object) -> HeaderGate:
        """A gate for one new connection from ``peer`` accepted on ``sockname``.

        Both take what the socket module gives (IPv6 4-tuples are cut to host and port).
        """
        return HeaderGate(self, _address(peer), _address(sockname))


class HeaderGate:
    """The header decision for one connection, fed incrementally with the connection's new bytes.

    ``decision`` is already set when no byte is needed (mode ``off``; ``required`` and an
    untrusted peer). Otherwise :meth:`feed` returns None ("not yet") until it can decide.
    """

    __slots__ = (
        "_buffer",
        "_reader",
        "_sniffing",
        "decision",
        "peer",
        "policy",
        "received",
        "sockname",
        "trusted",
    )

    def __init__(self, policy: ProxyPolicy, peer: Address, sockname: Address) -> None:
        self.policy = policy
        self.peer = peer
        self.sockname = sockname
        self.trusted = policy.mode is not Mode.OFF and policy.is_trusted(peer[0])
        self.received = 0
        """Bytes fed so far."""
        self.decision: Decision | None = None
        self._buffer = b""
        self._reader: HeaderReader | None = None
        self._sniffing = policy.mode is Mode.OPTIONAL
        if policy.mode is Mode.OFF:
            self.decision = self._direct(Reason.DIRECT, b"")
        elif not self.trusted and policy.mode is Mode.REQUIRED:
            self.decision = self._reject(Reason.UNTRUSTED, "peer is not in the trusted proxies")
        elif self.trusted:
            self._reader = HeaderReader(policy.options)

    def feed(self, data: bytes) -> Decision | None:
        """Feed the bytes received since the last call; a :class:`Decision`, or None for "not yet".

        Never feed the same bytes twice: the parser keeps its own state.
        """
        if self.decision is not None:
            raise RuntimeError(f"HeaderGate already decided ({self.decision.reason}); not fed")
        self.received += len(data)
        if self._sniffing:
            self._buffer += data
            kind = sniff(self._buffer)
            if kind is None:
                return None
            self._sniffing = False
            data, self._buffer = self._buffer, b""
            if kind == 0:
                reason = Reason.NO_HEADER if self.trusted else Reason.DIRECT
                return self._decide(self._direct(reason, data))
            if not self.trusted:
                return self._decide(
                    self._reject(
                        Reason.SPOOFING_ATTEMPT,
                        f"untrusted peer sent a PROXY v{kind} signature",
                    )
                )
        assert self._reader is not None
        try:
            header = self._reader.feed(data)
        except ProxyProtocolError as err:
            return self._decide(self._reject(Reason.BAD_HEADER, str(err)))
        if header is None:
            return None
        return self._decide(self._accept(header, self._reader.consumed, self._reader.trailing))

    def next_read_size(self) -> int:
        """How many bytes may be read now without reading past the end of the header.

        0 once decided. For v1 this may exceed the header (its end is found by its CRLF):
        callers that must not over-read peek, as the module docstring shows.
        """
        if self.decision is not None:
            return 0
        if self._sniffing:
            return max(1, _SNIFF_BYTES - len(self._buffer))
        assert self._reader is not None
        return max(1, self._reader.next_read_size())

    def expire(self) -> Decision:
        """``header_timeout`` has passed: decide now (a peer that sent nothing, see the module)."""
        if self.decision is not None:
            return self.decision
        if self.received == 0 and self.policy.mode is Mode.OPTIONAL:
            reason = Reason.NO_HEADER if self.trusted else Reason.DIRECT
            return self._decide(self._direct(reason, b"", "nothing received before the timeout"))
        return self._decide(
            self._reject(
                Reason.HEADER_TIMEOUT,
                f"no complete PROXY header within {self.policy.header_timeout:g}s "
                f"({self.received} bytes received)",
            )
        )

    def eof(self) -> Decision:
        """The peer closed (or half-closed) before a decision: decide now."""
        if self.decision is not None:
            return self.decision
        if self.received == 0 and self.policy.mode is Mode.OPTIONAL:
            reason = Reason.NO_HEADER if self.trusted else Reason.DIRECT
            return self._decide(self._direct(reason, b"", "closed before sending anything"))
        return self._decide(
            self._reject(
                Reason.EOF,
                f"connection closed before the PROXY header was complete "
                f"({self.received} bytes received)",
            )
        )

    def _decide(self, decision: Decision) -> Decision:
        self.decision = decision
        return decision

    def _direct(self, reason: Reason, trailing: bytes, detail: str = "") -> Decision:
        return Decision(
            accepted=True,
            reason=reason,
            upstream=self.peer,
            detail=detail,
            client=self.peer,
            destination=self.sockname,
            trailing=trailing,
        )

    def _reject(self, reason: Reason, detail: str) -> Decision:
        return Decision(accepted=False, reason=reason, upstream=self.peer, detail=detail)

    def _accept(self, header: ProxyHeader, consumed: int, trailing: bytes) -> Decision:
        source, destination = _inet(header.source), _inet(header.destination)
        if header.command is Command.LOCAL or source is None or destination is None:
            # LOCAL, v1 UNKNOWN, v2 UNSPEC or AF_UNIX: the spec says use the real endpoints.
            what = "LOCAL" if header.command is Command.LOCAL else "no TCP/UDP addresses"
            return Decision(
                accepted=True,
                reason=Reason.LOCAL,
                upstream=self.peer,
                detail=f"v{header.version} {what}: using the connection's own addresses",
                client=self.peer,
                destination=self.sockname,
                header=header,
                consumed=consumed,
                trailing=trailing,
            )
        return Decision(
            accepted=True,
            reason=Reason.HEADER,
            upstream=self.peer,
            detail=f"v{header.version}",
            client=source,
            destination=destination,
            header=header,
            consumed=consumed,
            trailing=trailing,
        )


def _network(item: object) -> Network:
    if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
        network: Network = item
    elif isinstance(item, str):
        if "%" in item:
            raise PolicyError(
                f"trusted: {item!r}: zone ids are not allowed in CIDRs (a block matches "
                "addresses on every interface)"
            )
        try:
            network = ipaddress.ip_network(item.strip())
        except ValueError as err:
            hint = ""
            try:
                wider = ipaddress.ip_network(item.strip(), strict=False)
                hint = f"; write {wider} for the block"
            except ValueError:
                pass
            raise PolicyError(f"trusted: {item!r} is not a CIDR block ({err}{hint})") from None
    else:
        raise PolicyError(f"trusted: {item!r} is not a CIDR block (give a string like 10.0.0.0/8)")
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id:
        raise PolicyError(f"trusted: {item!r}: zone ids are not allowed in CIDRs")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _address(value: object) -> Address:
    if isinstance(value, tuple | list) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    # AF_UNIX or unknown: keep the text, port 0.
    return (str(value or ""), 0)


def _inet(value: object) -> Address | None:
    """A header address as ``(host, port)``, or None when it has none (UNKNOWN, UNSPEC, UNIX)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return (str(value[0]), value[1])
    return None


def _format_address(address: Address) -> str:
    return format_hostport(*address)
