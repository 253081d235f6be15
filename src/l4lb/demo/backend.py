"""A demo backend that requires a PROXY header and answers with what it saw.

Every connection must start with a PROXY header of the configured version; the answer says
who the real client is (from the header), who connected (the balancer), the destination, the
TLVs, and which backend answered. It is valid HTTP when the request looks like HTTP (so
``curl`` works), plain text otherwise. A connection without a valid header gets a line saying
why and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from l4lb.config.values import format_hostport
from l4lb.proxy_protocol import HeaderReader, ProxyHeader, ProxyProtocolError, TLVType

log = logging.getLogger("l4lb.demo")

HEADER_TIMEOUT = 5.0
REQUEST_WAIT = 0.3
LINGER = 2.0
BACKLOG = 4096
"""The listen backlog (the kernel caps it at ``net.core.somaxconn``), as the balancer's own.

asyncio's default of 100 also bounds the SYN queue: a crowd of connects arriving faster than a
busy backend accepts overflowed it, the kernel answered with SYN cookies, and a cookie that no
longer validated when the balancer's data arrived got a RST: the client's answer was lost.
"""
_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


def _addr(value: object) -> str:
    if isinstance(value, tuple):
        return format_hostport(str(value[0]), int(value[1]))
    return "-" if value is None else repr(value)


def _tlv_text(header: ProxyHeader) -> list[str]:
    lines = []
    for tlv in header.tlvs:
        try:
            name = TLVType(tlv.type).name.lower()
        except ValueError:
            name = f"0x{tlv.type:02x}"
        value = (
            tlv.value.decode("utf-8", "backslashreplace")
            if tlv.value.isascii()
            else tlv.value.hex()
        )
        lines.append(f"  {name:<12} {value}")
    return lines or ["  (none)"]


def describe(name: str, listen: str, header: ProxyHeader, peer: tuple[str, int]) -> str:
    """The answer's text."""
    command = "LOCAL" if header.is_local else "PROXY"
    kind = f"v{header.version} {command} {header.family.name} {header.transport.name}"
    balancer = format_hostport(peer[0], peer[1])
    lines = [
        f"Hello from {name} ({listen}), behind l4lb.",
        "",
        f"PROXY header      {kind}",
        f"your address      {_addr(header.source)}   <- the real client, from the header",
        f"you connected to  {_addr(header.destination)}",
        f"balancer address  {balancer}   <- who opened this TCP connection",
        "TLVs:",
        *_tlv_text(header),
        "",
    ]
    return "\n".join(lines)


def looks_like_http(data: bytes) -> bool:
    return data.startswith(_HTTP_METHODS)


def render(body: str, request: bytes) -> bytes:
    raw = body.encode()
    if not looks_like_http(request):
        return raw
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(raw)}\r\n"
        "Connection: close\r\n"
        "Server: l4lb-demo-backend\r\n\r\n"
    )
    return head.encode() + (raw if not request.startswith(b"HEAD ") else b"")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends until its FIN (at most ``LINGER``s).

    Closing a socket with unread input sends a RST, and a RST can destroy the answer still in
    flight: a client whose request arrived after ``REQUEST_WAIT`` (a loaded machine) got a reset
    instead of its answer. nginx's ``lingering_close`` exists for the same reason.
    """
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            while await reader.read(65536):
                pass


class DemoBackend:
    """One demo backend: ``start()`` listens on ``host:port``; it requires PROXY ``version``."""

    def __init__(self, name: str, host: str, port: int, version: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.version = version
        self.server: asyncio.Server | None = None
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def listen(self) -> str:
        return format_hostport(self.host, self.port)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, backlog=BACKLOG)
        sock = self.server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end open connections, so none is left for asyncio.run to cancel
        (Python 3.11's stream callback prints a traceback for a cancelled connection task)."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        for writer in self._open.values():
            writer.transport.abort()
        if self._open:
            await asyncio.wait(list(self._open), timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = (str(peername[0]), int(peername[1]))
        task = asyncio.current_task()
        if task is not None:
            self._open[task] = writer
        try:
            await self._answer(reader, writer, peer)
            await _linger(reader, writer)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._open.pop(task, None)

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        decoder = HeaderReader()
        header: ProxyHeader | None = None
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                while header is None:
                    data = await reader.read(decoder.next_read_size())
                    if not data:
                        return
                    header = decoder.feed(data)
        except TimeoutError:
            writer.write(f"{self.name}: no PROXY header within {HEADER_TIMEOUT:g}s\n".encode())
            return
        except ProxyProtocolError as err:
            log.warning(
                "event=demo_bad_header backend=%s peer=%s error=%r", self.name, peer, str(err)
            )
            why = f"{self.name}: this backend requires a PROXY v{self.version} header ({err})\n"
            writer.write(why.encode())
            return
        if header.version != self.version:
            why = f"{self.name}: expected a PROXY v{self.version} header, got v{header.version}\n"
            writer.write(why.encode())
            return
        request = decoder.trailing
        if not request:
            # Wait briefly for the client's first bytes (curl sends at once; a server-speaks-first
            # client gets its answer anyway).
            with contextlib.suppress(TimeoutError):
                request = await asyncio.wait_for(reader.read(65536), REQUEST_WAIT)
        writer.write(render(describe(self.name, self.listen, header, peer), request))
        await writer.drain()
