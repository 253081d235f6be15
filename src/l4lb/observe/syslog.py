"""Syslog output, as HAProxy's ``log`` sends it: RFC 5424 messages over a local unix socket,
UDP (RFC 5426), or TCP with octet-counting frames (RFC 6587).

Targets, as ``[log] access`` (and ``[log] events``) name them:

- ``syslog:/dev/log``: a local unix socket (any absolute path). Datagrams, one message each;
  when the path is a stream socket (some syslog-ng setups), a stream with each message ended
  by a NUL byte, as glibc's ``syslog()`` sends it.
- ``syslog+udp://127.0.0.1:514``: UDP, one message per datagram (port 514 if left out).
- ``syslog+tcp://[2001:db8::1]:601``: TCP, each message framed ``LEN SP MSG`` (port 601 if
  left out).

A message is ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` (RFC 5424 section 6):
PRI = facility * 8 + severity, TIMESTAMP the local time with microseconds and its UTC offset,
HOSTNAME this host's name, APP-NAME the ``tag`` (``l4lb``), PROCID the pid of the process that
wrote it (each worker its own), MSGID what kind of line it is (``access``), no structured data
(the JSON MSG carries every field), and MSG without a BOM (HAProxy and glibc send none; rsyslog
and journald read it as UTF-8 either way).

A message longer than the transport's limit (:data:`MAX_MESSAGE`: 2048 bytes over UDP, the size
RFC 5426 says every receiver should take; 8192 over a unix socket or TCP, rsyslog's default
``maxMessageSize``) is cut at the end of its MSG, on a UTF-8 character boundary, with the header
intact (RFC 5424 section 6.1): never split into two messages.

This module is the formatting (pure functions, bytes out) and :class:`Sender`, which the one
writer thread of a log owns: it connects, sends, and when the collector is down it drops (the
caller counts the lines), says so once, and tries again with a backoff. Nothing here runs on the
event loop.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import logging
import os
import re
import select
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

FACILITIES: dict[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "ntp": 12,
    "audit": 13,
    "alert": 14,
    "clock": 15,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}
"""RFC 5424 section 6.2.1's facilities by the names syslog.conf, HAProxy and nginx use."""


class Severity(enum.IntEnum):
    """RFC 5424 section 6.2.1's severities."""

    EMERGENCY = 0
    ALERT = 1
    CRITICAL = 2
    ERROR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


class Transport(enum.Enum):
    UNIX = "unix"
    UDP = "udp"
    TCP = "tcp"


MAX_MESSAGE: dict[Transport, int] = {Transport.UDP: 2048, Transport.UNIX: 8192, Transport.TCP: 8192}
"""The longest message (header included) sent over each transport; longer ones are cut."""
DEFAULT_PORTS: dict[Transport, int] = {Transport.UDP: 514, Transport.TCP: 601}
"""Ports when a target leaves them out: syslog over UDP (RFC 5426), over TCP (RFC 6587)."""
MAX_UNIX_PATH = 107
"""The longest unix socket path Linux takes (``sun_path`` is 108 bytes with its NUL)."""

CONNECT_TIMEOUT = 2.0
"""A TCP connect to the collector taking longer fails (and is retried after the backoff)."""
SEND_TIMEOUT = 5.0
"""A send the collector does not take within this is a failure: the line is dropped and the
connection reopened (a stream cut mid-frame cannot go on)."""
BACKOFF_MIN = 0.25
BACKOFF_MAX = 5.0
"""After a failure, the next try waits BACKOFF_MIN, doubling up to BACKOFF_MAX; lines meanwhile
are dropped, not waited for."""
WARN_EVERY = 60.0
"""At most one ``syslog_unreachable`` warning per this many seconds."""

_FORMS = (
    "'syslog:/dev/log' (a local socket), 'syslog+udp://127.0.0.1:514' or "
    "'syslog+tcp://[2001:db8::1]:601' (a collector)"
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where syslog messages go: a unix socket ``path``, or ``host`` and ``port``."""

    transport: Transport
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.transport is Transport.UNIX:
            return f"syslog:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"syslog+{self.transport.value}://{host}:{self.port}"

    @property
    def limit(self) -> int:
        return MAX_MESSAGE[self.transport]


def is_target(text: str) -> bool:
    """Whether ``text`` names a syslog target (or tries to: ``parse_target`` says what is
    wrong) rather than a file."""
    return text.startswith(("syslog:", "syslog+")) or text == "syslog" or "://" in text


def parse_target(text: str) -> Target:
    """``syslog:/PATH``, ``syslog+udp://IP[:PORT]`` or ``syslog+tcp://IP[:PORT]``; a
    ``ValueError`` that shows the right form otherwise."""
    scheme, sep, rest = text.partition("://")
    if text == "syslog":
        raise ValueError(
            "invalid syslog target 'syslog': name the socket or the collector, such as "
            f"{_FORMS} (for a file named syslog write './syslog')"
        )
    if not sep:
        path = text.removeprefix("syslog:")
        if text.startswith("syslog+"):
            raise ValueError(
                f"invalid syslog target {text!r}: expected 'syslog+udp://IP:PORT' or "
                f"'syslog+tcp://IP:PORT', such as {_FORMS}"
            )
        if not path.startswith("/"):
            hint = ""
            if path and (path[0].isdigit() or path.startswith("[")):
                hint = f"; for a collector write 'syslog+udp://{path}' or 'syslog+tcp://{path}'"
            raise ValueError(
                f"invalid syslog target {text!r}: a local socket needs an absolute path, "
                f"such as 'syslog:/dev/log'{hint}"
            )
        if len(path.encode()) > MAX_UNIX_PATH:
            raise ValueError(
                f"invalid syslog target {text!r}: a unix socket path has at most "
                f"{MAX_UNIX_PATH} bytes"
            )
        return Target(Transport.UNIX, path=path)
    transports = {f"syslog+{t.value}": t for t in (Transport.UDP, Transport.TCP)}
    transport = transports.get(scheme)
    if transport is None:
        guess = "udp" if "udp" in scheme else "tcp" if "tcp" in scheme else "udp"
        raise ValueError(
            f"invalid syslog target {text!r}: the scheme is 'syslog+udp' or 'syslog+tcp', such "
            f"as 'syslog+{guess}://{rest or '127.0.0.1:514'}'; a local socket is "
            "'syslog:/dev/log'"
        )
    host, port = _host_port(text, rest, DEFAULT_PORTS[transport])
    return Target(transport, host=host, port=port)


def local_problem(text: str) -> str | None:
    """For ``l4lb check`` and the start: why a ``syslog:/PATH`` target cannot take messages
    now (None when it can, or when ``text`` is not a local socket). A warning, not an error:
    the daemon may start later, and the sender connects when it does."""
    if not text.startswith("syslog:"):
        return None
    path = text.removeprefix("syslog:")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        why = f"cannot reach {path}: {err.strerror}"
    else:
        if stat.S_ISSOCK(mode):
            return None
        why = f"{path} is not a socket"
    return (
        f"{why}: lines are dropped (and counted) until a syslog daemon listens there "
        "(rsyslog's imuxsock, journald's /dev/log)"
    )


def _host_port(text: str, rest: str, default: int) -> tuple[str, int]:
    scheme = text.partition("://")[0]
    example = f"such as '{scheme}://127.0.0.1:{default}' or '{scheme}://[2001:db8::1]:{default}'"
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(f"invalid syslog target {text!r}: expected [IPv6]:PORT, {example}")
        port_text = tail[1:] if tail else ""
        version = 6
    else:
        host, _, port_text = rest.partition(":") if rest.count(":") <= 1 else (rest, "", "")
        if rest.count(":") > 1:
            raise ValueError(
                f"invalid syslog target {text!r}: an IPv6 address needs brackets, {example}"
            )
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid syslog target {text!r}: {host!r} is not an IP address (a collector's "
            f"name is not resolved: write its address), {example}"
        ) from None
    if ip.version != version or "%" in host:
        raise ValueError(f"invalid syslog target {text!r}: {example}")
    if not port_text:
        return str(ip), default
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid syslog target {text!r}: the port must be 1..65535")
    return str(ip), int(port_text)


# -- the message (RFC 5424 section 6) ----------------------------------------------------------


def _printable(text: str, size: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII (33..126), at most ``size``, ``-`` if empty."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:size]
    return kept or "-"


def hostname() -> str:
    """This host's name as a HOSTNAME field (no DNS lookup: the writer must not wait on one)."""
    return _printable(socket.gethostname(), 255)


def timestamp(when: float) -> str:
    """RFC 5424 TIMESTAMP: local time, microseconds, offset (``...T07:36:49.123456+00:00``)."""
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Header:
    """The fields every message of one process shares: facility, HOSTNAME, APP-NAME, PROCID."""

    facility: int
    app_name: str
    procid: int
    host: str

    @classmethod
    def here(cls, facility: str, tag: str) -> Header:
        """For this process (call it in the process that sends: each worker has its pid)."""
        return cls(FACILITIES[facility], _printable(tag, 48), os.getpid(), hostname())

    def render(self, severity: Severity, when: float, msgid: str) -> bytes:
        """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - `` (MSG follows)."""
        pri = self.facility * 8 + severity
        return (
            f"<{pri}>1 {timestamp(when)} {self.host} {self.app_name} {self.procid} "
            f"{_printable(msgid, 32)} - "
        ).encode("ascii")


def cut_utf8(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes or fewer of UTF-8 ``data``, never half a character."""
    if len(data) <= size:
        return data
    end = max(size, 0)
    while end > 0 and data[end] & 0xC0 == 0x80:  # a continuation byte: its lead is cut off
        end -= 1
    return data[:end]


def message(header: bytes, msg: bytes, limit: int) -> bytes:
    """HEADER + MSG, the MSG cut at its end so the whole is at most ``limit`` bytes."""
    return header + cut_utf8(msg, limit - len(header))


def frame(data: bytes, transport: Transport, stream: bool) -> bytes:
    """What goes on the wire: TCP ``LEN SP MSG`` (RFC 6587 3.4.1), a unix stream's message
    ended by NUL (glibc's way), a datagram as it is."""
    if transport is Transport.TCP:
        return b"%d %s" % (len(data), data)
    return data + b"\0" if stream else data


# -- sending -----------------------------------------------------------------------------------


class Link(enum.Enum):
    """The state of a :class:`Sender`'s connection to the collector."""

    CLOSED = "closed"
    """No socket yet (new, or reopened): the next send connects."""
    UP = "up"
    """Connected; the last send went through."""
    DOWN = "down"
    """The last try failed: lines are dropped until ``retry_at``, then it connects again."""


Report = Callable[[int, str], None]
"""Where a sender says what happened to its collector: ``(logging level, message)``."""


class Sender:
    """Sends messages to one :class:`Target`, from one thread; never raises for the network.

    ``send`` returns False for a line it dropped (collector down or failing): the caller counts
    it. The first failure of an outage is reported once (at most every :data:`WARN_EVERY`), and
    the recovery once.
    """

    def __init__(
        self,
        target: Target,
        report: Report,
        what: str = "access_log",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.report = report
        self.what = what
        self.clock = clock
        self.state = Link.CLOSED
        self.stream = target.transport is Transport.TCP
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._outage = False
        """An outage was reported and its end not yet."""
        self._proven = 0
        """Sends since the link came back that went through (UDP errors show one send late)."""
        self._dropped = 0
        self._last_warning = -WARN_EVERY

    @property
    def limit(self) -> int:
        return self.target.limit

    @property
    def failing(self) -> bool:
        return self.state is Link.DOWN

    def connect(self) -> bool:
        """Open the socket now (the writer does this at start so a down collector is said at
        once); False and DOWN if it cannot."""
        try:
            self._sock = self._open()
        except OSError as err:
            self._fail(err, "connect")
            return False
        if self.state is not Link.DOWN:
            self.state = Link.UP
        return True

    def _open(self) -> socket.socket:
        target = self.target
        if target.transport is Transport.UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(target.path)
                self.stream = False
            except OSError as err:
                sock.close()
                if err.errno != errno.EPROTOTYPE:  # EPROTOTYPE: the path is a stream socket
                    raise
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    sock.settimeout(CONNECT_TIMEOUT)
                    sock.connect(target.path)
                except OSError:
                    sock.close()
                    raise
                self.stream = True
            sock.settimeout(SEND_TIMEOUT)
            return sock
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if target.transport is Transport.UDP else socket.SOCK_STREAM
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect((target.host, target.port))  # UDP: errors of later sends reach us
            sock.settimeout(SEND_TIMEOUT)
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, data: bytes) -> bool:
        """Send one message (at most :attr:`limit` bytes, framed here); False if dropped."""
        sock = self._ready()
        if sock is None:
            self._dropped += 1
            return False
        try:
            if self.stream:
                sock.sendall(frame(data, self.target.transport, True))
            else:
                sock.send(data)
        except OSError as err:  # a partial frame cannot be finished: a new connection
            self._close()
            self._fail(err, "send")
            self._dropped += 1
            return False
        self._sent()
        return True

    def send_many(self, messages: list[bytes]) -> int:
        """Send ``messages`` in order; how many went (the rest were dropped). Over a stream they
        go in one write, the collector's close checked once: a batch costs two system calls,
        not three per line."""
        if not messages:
            return 0
        sock = self._ready()
        if sock is None:
            self._dropped += len(messages)
            return 0
        if not self.stream:
            return sum(self.send(data) for data in messages)
        transport = self.target.transport
        try:
            sock.sendall(b"".join(frame(data, transport, True) for data in messages))
        except OSError as err:  # what went before the error is not known: all counted lost
            self._close()
            self._fail(err, "send")
            self._dropped += len(messages)
            return 0
        self._sent()
        return len(messages)

    def _ready(self) -> socket.socket | None:
        """The socket to send on: connected now if it is time to, None while down."""
        sock = self._sock
        if sock is not None and self.stream:
            try:
                closed = self._closed_by_peer(sock)
            except OSError:  # ECONNRESET
                closed = True
            if closed:  # a restarted collector, an idle timeout: connect again at once
                self._close()
                sock = None
                if self.state is Link.UP:
                    self.state = Link.CLOSED
                    self.report(
                        logging.INFO,
                        f"event=syslog_reconnect log={self.what} target={self.target} "
                        "detail='the collector closed the connection'",
                    )
        if sock is None:
            if self.state is Link.DOWN and self.clock() < self._retry_at:
                return None
            if not self.connect():
                return None
        return self._sock

    @staticmethod
    def _closed_by_peer(sock: socket.socket) -> bool:
        """A collector never writes to us: a readable end of file is its close (FIN), found
        before a message is written into a connection it no longer reads."""
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""

    def _sent(self) -> None:
        if self.state is Link.UP:
            return
        # Over UDP a refused datagram's error only shows on the next send: a send after the
        # collector came back proves it once the one after it went through too.
        self._proven += 1
        if self.target.transport is Transport.UDP and self._proven < 2:
            return
        self.state = Link.UP
        self._backoff = BACKOFF_MIN
        if self._outage:
            self._outage = False
            self.report(
                logging.INFO,
                f"event=syslog_reachable log={self.what} target={self.target} "
                f"dropped={self._dropped}",
            )
        self._dropped = 0

    def _fail(self, err: OSError, during: str) -> None:
        now = self.clock()
        self.state = Link.DOWN
        self._proven = 0
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if self._outage or now - self._last_warning < WARN_EVERY:
            return
        self._outage = True
        self._last_warning = now
        reason = err.strerror or str(err) or type(err).__name__
        self.report(
            logging.WARNING,
            f"event=syslog_unreachable log={self.what} target={self.target} during={during} "
            f"error={reason!r} detail='lines are dropped and counted until the collector "
            f"answers; retrying every {BACKOFF_MAX:g}s at most'",
        )

    def reopen(self) -> None:
        """Close and connect again now (SIGUSR2, a reload): a restarted collector, a new
        /dev/log."""
        self._close()
        if self.state is Link.UP:
            self.state = Link.CLOSED
        self._backoff = BACKOFF_MIN
        self.connect()  # a DOWN link stays DOWN until a send goes through and says so

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._close()


# -- the event lines ---------------------------------------------------------------------------

_SEVERITIES = {
    logging.DEBUG: Severity.DEBUG,
    logging.INFO: Severity.INFO,
    logging.WARNING: Severity.WARNING,
    logging.ERROR: Severity.ERROR,
    logging.CRITICAL: Severity.CRITICAL,
}
_EVENT = re.compile(r"(?:^| )event=([\x21-\x7e]{1,32})")


class EventLines:
    """The balancer's event lines (stderr's ``level=... logger=... event=...`` format) as
    syslog messages: severity from the level, MSGID the event name, MSG the line without its
    time (the header has it). Owned by the log's writer thread."""

    def __init__(self, target: Target, facility: str, tag: str, report: Report) -> None:
        self.header = Header.here(facility, tag)
        self.sender = Sender(target, report, what="events")
        self.sender.connect()

    def send(self, level: int, created: float, line: str) -> bool:
        text = line.split(" ", 1)[1] if line[:1].isdigit() else line
        found = _EVENT.search(text)
        head = self.header.render(
            _SEVERITIES.get(level, Severity.INFO), created, found.group(1) if found else "-"
        )
        return self.sender.send(
            message(head, text.encode("utf-8", "backslashreplace"), self.sender.limit)
        )
