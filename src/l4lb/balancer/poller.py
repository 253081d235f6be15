"""One epoll set per event loop for the sockets the balancer watches itself.

Three users share it:

- **the backend connect** (:meth:`Poller.wait_connected`): every backend ``connect()``, whatever
  the relay, is watched here instead of with ``loop.add_writer``/``remove_writer``;
- **the splice relay** (:meth:`Poller.take`): both sockets, edge-triggered, for input and output;
  the kernel relay takes them too, with a narrower mask that it changes with its modes
  (:meth:`Poller.modify`), and watches its program's ring buffer (:meth:`Poller.watch`);
- **the stream relay's paused sides** (:meth:`Poller.watch_errors`): a socket whose reading is
  paused by backpressure, registered with no event bits so only ``EPOLLERR``/``EPOLLHUP`` show.

The loop watches the set itself with a single ``add_reader``. The syscall-saving design: a
socket is added once, for input and output, edge-triggered, and (but for the splice relay's client
socket, whose output is added when a write to it first blocks) never modified; an edge-triggered
reader moves bytes until ``EAGAIN``, and closing a socket removes it from the set. A backend
socket added while it connects stays in the set as a marker, so a splice relay takes it over
without another ``epoll_ctl``. This costs two ``epoll_ctl`` calls per connection, where
``add_reader``/``remove_reader`` on uvloop cost about five system calls per change (libuv's
checks, ``FIONBIO`` and io_uring submissions). Measured with ``strace -c`` over 2000 new
connections: the splice relay went from 36 to 29 system calls per connection and the stream
relay from 48 to 43 when the connect moved here from ``add_writer``.

The connect watcher keeps the events it saw: the event that says "connected" may carry
``EPOLLIN`` too (a backend that speaks first, such as an SMTP banner, already sent bytes), and an
edge-triggered set reports that edge only once, so :meth:`Poller.take` hands those events to the
new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import weakref
from collections.abc import Callable
from typing import Final, Protocol

from l4lb.balancer.relay_contract import Socket

__all__ = [
    "EPOLLERR",
    "EPOLLET",
    "EPOLLHUP",
    "EPOLLIN",
    "EPOLLOUT",
    "EPOLLRDHUP",
    "INPUT_EVENTS",
    "Handler",
    "NativeHandler",
    "Poller",
    "available",
    "connected_cleanly",
    "for_loop",
    "stop_waiting",
    "wait_connected",
]

log = logging.getLogger("l4lb.poller")

# Linux's values, spelled out so the module imports anywhere (``available()`` says if it runs)
# ``Final``: the compiled modules read them as constants, not from the module's dict
EPOLLIN: Final = 0x1
EPOLLOUT: Final = 0x4
EPOLLERR: Final = 0x8
EPOLLHUP: Final = 0x10
EPOLLRDHUP: Final = 0x2000
EPOLLET: Final = 1 << 31
EDGE_EVENTS: Final = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
"""What a socket is registered for (once): both directions, edge-triggered."""
INPUT_EVENTS: Final = EPOLLIN | EPOLLRDHUP | EPOLLET
"""Input only (:meth:`Poller.take_input`): a new socket is writable, and registering it for
output would report that at once, a wake-up for nothing."""

SCRATCH_SIZE: Final = 1 << 16
SCRATCH_ROOM: Final = 256
"""Bytes at the scratch buffer's start kept for a header written in front of what a read put
after them (:attr:`Poller.room`: the splice relay's first write, PROXY header + client bytes)."""

_HAVE_EPOLL: Final = hasattr(select, "epoll")


def available() -> bool:
    """True where epoll exists (Linux)."""
    return _HAVE_EPOLL


class Handler(Protocol):
    """Receives the readiness of the descriptors it registered."""

    def event(self, fd: int, events: int) -> None: ...


class NativeHandler:
    """A :class:`Handler` the poller calls without a Python-level call: compiled, a call
    through the protocol is a method look-up and an argument parse (about 400 instructions per
    event), one on a subclass of this class a C call through its vtable. The splice relay and
    the connect watcher are ones; any other handler is called through the protocol."""

    __slots__ = ()

    def event(self, fd: int, events: int) -> None:
        raise NotImplementedError


class Poller:
    """The epoll set of one event loop, and which handler each descriptor's events go to."""

    __slots__ = ("__weakref__", "ep", "fds", "loop", "room", "scratch")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.scratch = memoryview(bytearray(SCRATCH_SIZE))
        """A buffer any handler may fill and use within one callback (the splice relay's copies)."""
        self.room = self.scratch[SCRATCH_ROOM:]
        """The scratch buffer after its first :data:`SCRATCH_ROOM` bytes (a view made once)."""
        self.ep = select.epoll()
        self.fds: dict[int, Handler] = {}
        loop.add_reader(self.ep.fileno(), self._dispatch)

    # -- the backend connect -----------------------------------------------------------------

    def wait_connected(self, sock: Socket, callback: Callable[[], object]) -> None:
        """Call ``callback`` once when the connecting ``sock`` is writable (connected or failed)."""
        fd = sock.fileno()
        self.fds[fd] = _Connecting(self, sock, callback)
        try:
            self.ep.register(fd, EDGE_EVENTS)
        except FileExistsError:  # a number reused by a socket we stopped watching
            self.ep.modify(fd, EDGE_EVENTS)

    def stop_waiting(self, sock: Socket) -> None:
        """Forget a :meth:`wait_connected` that will not be needed (the caller closes ``sock``)."""
        current = self.fds.get(sock.fileno())
        if isinstance(current, _Connecting) and current.sock is sock:
            current.callback = None

    def connected_cleanly(self, sock: Socket) -> bool:
        """True when the wake-up that ended ``sock``'s connect said "writable" and nothing
        else: the connect succeeded, no ``SO_ERROR`` look-up needed. False: ask ``SO_ERROR``."""
        current = self.fds.get(sock.fileno())
        return (
            isinstance(current, _Connecting)
            and current.sock is sock
            and current.writable
            and not current.seen & (EPOLLERR | EPOLLHUP)
        )

    # -- edge-triggered owners (the splice relay) --------------------------------------------

    def take(self, sock: Socket, fd: int, handler: Handler, events: int = EDGE_EVENTS) -> int:
        """Send ``sock``'s events to ``handler`` from now on; returns events not yet handled.

        A socket still in the set from its connect costs no system call; the events its connect
        watcher saw (``EPOLLIN`` from a backend that spoke first, a hang-up) are returned, since
        the set will not report those edges again. Otherwise the socket is added, and the
        registration itself reports what is already pending: 0 is returned.
        """
        current = self.fds.get(fd)
        self.fds[fd] = handler
        if isinstance(current, _Connecting) and current.sock is sock:
            if events != EDGE_EVENTS:  # the kernel relay's own mask
                self.ep.modify(fd, events)
            return current.seen
        try:
            self.ep.register(fd, events)
        except FileExistsError:  # a socket we stopped watching but that was never closed
            self.ep.modify(fd, events)
        return 0

    def take_input(self, sock: Socket, fd: int, handler: Handler) -> int:
        """:meth:`take` for a socket whose output edges are not wanted yet; returns the events
        not yet handled, or -1 when the socket was added for input only (:data:`INPUT_EVENTS`).

        A socket still in the set from its connect keeps that registration (both directions:
        its connect's wake-up has reported the output edge already). Any other socket (a
        connect seen finished without a wake-up, ``Connection.connect_next`` on loopback) is
        added for input only: added for output too, a new socket's room to write would be
        reported at once, and wake the loop for nothing. On -1 the caller asks for output with
        :meth:`modify` when a write would block.
        """
        current = self.fds.get(fd)
        if isinstance(current, _Connecting) and current.sock is sock:
            return self.take(sock, fd, handler)
        self.take(sock, fd, handler, INPUT_EVENTS)
        return -1

    def modify(self, fd: int, events: int) -> None:
        """Watch other events of a socket taken with :meth:`take` (the kernel relay's modes);
        a modification reports at once what is already pending, edge-triggered or not."""
        self.ep.modify(fd, events)

    def watch(self, fd: int, handler: Handler, events: int) -> None:
        """Send ``events`` of a descriptor that is no socket (a bpf ring buffer) to ``handler``."""
        self.fds[fd] = handler
        self.ep.register(fd, events)

    def forget(self, fd: int) -> None:
        """Send ``fd``'s events nowhere; the caller closes it (which removes it from the set)."""
        fds = self.fds
        if fd in fds:  # compiled, two C look-ups; ``pop(fd, None)`` is a method call (~400)
            del fds[fd]

    # -- error-only watches (the stream relay's paused sides) --------------------------------

    def watch_errors(self, fd: int, handler: Handler) -> bool:
        """Report only ``EPOLLERR``/``EPOLLHUP`` of ``fd`` (level-triggered) to ``handler``."""
        try:
            self.ep.register(fd, 0)
        except FileExistsError:  # still there from its connect, or a number reused
            self.ep.modify(fd, 0)
        except OSError:
            return False
        self.fds[fd] = handler
        return True

    def unwatch(self, fd: int, handler: Handler) -> None:
        """Remove ``fd`` from the set if ``handler`` still owns it."""
        if self.fds.get(fd) is handler:
            del self.fds[fd]
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(fd)

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        fds = self.fds
        for fd, events in self.ep.poll(0):
            handler = fds.get(fd)
            if handler is not None:
                try:
                    if isinstance(handler, NativeHandler):
                        handler.event(fd, events)  # the C call (see NativeHandler)
                    else:
                        handler.event(fd, events)
                except Exception as err:  # a bug in one handler: the rest of the batch runs
                    log.error("event=poller_handler_failed fd=%d error=%r", fd, err)
            else:  # nobody owns it any more (an error-only watch would report it again)
                with contextlib.suppress(OSError, ValueError):
                    self.ep.unregister(fd)


class _Connecting(NativeHandler):
    """Waits for one non-blocking ``connect()`` to finish, then stays as a marker.

    The marker lets a splice relay take the socket over without another ``epoll_ctl``; for any
    other use, the socket's first later event removes it from the set (one ``epoll_ctl``).
    """

    __slots__ = ("callback", "poller", "seen", "sock", "writable")

    def __init__(self, poller: Poller, sock: Socket, callback: Callable[[], object] | None) -> None:
        self.poller = poller
        self.sock = sock
        """Held, not weakly: the C socket type takes no weak references. Its owner closes it; the
        marker goes at the descriptor's next event or when the number is registered again."""
        self.callback = callback
        self.seen = 0
        """The events of the wake-up that ended the connect (handed on by :meth:`Poller.take`)."""
        self.writable = False
        """Whether that wake-up had ``EPOLLOUT``."""

    def event(self, fd: int, events: int) -> None:
        callback = self.callback
        if callback is None:  # connected and handed to something else: leave the set
            self.poller.fds.pop(fd, None)
            with contextlib.suppress(OSError):
                self.poller.ep.unregister(fd)
            return
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            self.callback = None
            self.seen = events & ~EPOLLOUT
            self.writable = bool(events & EPOLLOUT)
            callback()


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


def for_loop(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller (created on first use). Only where :func:`available` is true."""
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = Poller(loop)
    return poller


def wait_connected(
    loop: asyncio.AbstractEventLoop, sock: Socket, callback: Callable[[], object]
) -> None:
    """Call ``callback`` once when the connecting ``sock`` is writable (connected or failed).

    A cheaper ``loop.add_writer`` (see the module docstring); where there is no epoll, it is
    the loop's own one-shot writer watch. Call :func:`stop_waiting` if the wait is abandoned
    (timeout, shutdown) before closing the socket.
    """
    if _HAVE_EPOLL:
        for_loop(loop).wait_connected(sock, callback)
        return
    fd = sock.fileno()

    def once() -> None:
        loop.remove_writer(fd)
        callback()

    loop.add_writer(fd, once)


def connected_cleanly(loop: asyncio.AbstractEventLoop, sock: Socket) -> bool:
    """Inside a :func:`wait_connected` callback: True when the connect surely succeeded
    (writable, no error or hang-up), so ``getsockopt(SO_ERROR)`` can be skipped."""
    if not _HAVE_EPOLL:
        return False
    poller = _POLLERS.get(loop)
    return poller is not None and poller.connected_cleanly(sock)


def stop_waiting(loop: asyncio.AbstractEventLoop, sock: Socket) -> None:
    """Forget a :func:`wait_connected` that will not be needed (the caller closes ``sock``)."""
    if not _HAVE_EPOLL:
        loop.remove_writer(sock.fileno())
        return
    poller = _POLLERS.get(loop)
    if poller is not None:
        poller.stop_waiting(sock)
