"""The stage between accept() and connect(): who the real client is, and whether it may pass.

This first version only implements ``accept_proxy = "off"``: the socket's own addresses are the
client and the destination. The trust work (PROXY from trusted upstreams, allow/deny, per-client
limits) extends :class:`Admission` behind the same interface.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from l4lb.proxy_protocol import TLV, ProxyHeader

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A connection let through: its real addresses, and what the upstream told us."""

    client: Address
    """The real client: from the PROXY header, or the socket's peer."""
    destination: Address
    """The original destination: from the PROXY header, or the socket's own address."""
    upstream: Address | None = None
    """The trusted proxy the connection came through; None for a direct client."""
    header: ProxyHeader | None = None
    """The PROXY header received from the upstream, if any."""
    pass_tlvs: tuple[TLV, ...] = ()
    """Upstream TLVs to forward to the backend (the listener's ``pass_tlvs``)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A connection refused before it reached a backend, for the log and the counters."""

    peer: Address
    reason: str
    detail: str = ""
    client: Address | None = None


class Admission:
    """Admits or rejects accepted sockets for one listener."""

    def __init__(
        self,
        listener: Any,
        *,
        loop: asyncio.AbstractEventLoop,
        on_reject: Callable[[Rejected], None],
    ) -> None:
        self.listener = listener
        self.loop = loop
        self.on_reject = on_reject
        self.rejections: Counter[str] = Counter()

    def admit(
        self,
        sock: socket.socket,
        peer: Address,
        sockname: Address,
        done: Callable[[socket.socket, Admitted], None],
    ) -> None:
        """Take ownership of ``sock``; call ``done`` once if it is admitted, else close it."""
        done(sock, Admitted(client=(peer[0], peer[1]), destination=(sockname[0], sockname[1])))

    def release(self, admitted: Admitted) -> None:
        """The admitted connection has closed: give back its per-client slots."""

    def close(self) -> None:
        """The listener stops: abandon connections still waiting for their header."""
