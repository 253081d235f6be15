"""Tell systemd how the service is doing (``sd_notify``), with a plain datagram socket.

systemd passes ``NOTIFY_SOCKET`` to ``Type=notify`` services; we send ``READY=1`` once every
listener is bound, ``RELOADING=1`` / ``READY=1`` around a reload and ``STOPPING=1`` when a
graceful stop begins. Without ``NOTIFY_SOCKET`` every call does nothing, so the balancer runs
the same under a shell, a container or systemd. No dependency on libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.systemd")


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; True when it was sent.

    An abstract socket is written ``@name`` in the variable (systemd's convention). A failure
    to notify is logged, never raised: the balancer keeps serving either way.
    """
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        # never blocks: a receiver that does not read (its queue full) must not stop the
        # event loop that relays traffic; the message is dropped with a warning instead
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        ) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("event=sd_notify_failed socket=%s error=%r", path, str(err))
        return False
    return True


def ready(status: str = "") -> bool:
    """The balancer serves: every listener is bound."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    """A reload starts (``Type=notify-reload`` wants the monotonic time with it)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """A graceful stop begins: no new connections, the ones in flight may finish."""
    return notify("STOPPING=1")


def reload_outcome(applied: bool, count: int, serving: str, errors: Sequence[str] = ()) -> bool:
    """``RELOADING=1``, then ``READY=1`` with a ``STATUS=`` saying how the reload ended."""
    reloading()
    if applied:
        return ready(f"reload applied ({count}); serving {serving}")
    first = errors[0] if errors else "?"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return ready(f"reload refused: {first}{more}; serving the previous config")


def attach(balancer: Balancer, reloads: bool = True) -> None:
    """Runtime extension hook: READY once the listeners are up, then reloads and the stop.

    ``reloads=False`` in a worker of several: their supervisor tells each reload's outcome once.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    listeners = ", ".join(balancer.listeners)
    ready(f"serving {listeners}")

    def on_reload(b: Balancer) -> None:
        reload_outcome(True, b.reloads, ", ".join(b.listeners))

    def on_refused(b: Balancer, errors: list[str]) -> None:
        reload_outcome(False, b.reloads_refused, "", errors)

    def on_stop(b: Balancer) -> None:
        stopping()

    if reloads:
        balancer.on_reload.append(on_reload)
        balancer.on_reload_refused.append(on_refused)
    balancer.on_stop.append(on_stop)
