"""The states and reasons of the anycast part, defined once for logs, /status and /metrics."""

from __future__ import annotations

import enum


class VipReason(enum.Enum):
    """Why a VIP is announced (``SERVING``) or not (every other member)."""

    SERVING = "serving"
    """Its listeners are bound and each of their pools has a backend up: announced."""
    STARTING = "starting"
    """A pool's health checks have not yet brought a backend up (``rise`` checks at start)."""
    NOT_BOUND = "listener_not_bound"
    """No bound listener accepts connections to it."""
    NO_BACKEND = "no_backend_up"
    """A pool behind it has no backend up."""
    DRAINING = "draining"
    """The node is draining (SIGTERM or ``POST /drain``): withdrawn first, then stopping."""
    SPEAKER_DOWN = "speaker_down"
    """ExaBGP is not running (starting, restarting after a crash, or stopped by the watchdog)."""

    @property
    def announced(self) -> bool:
        return self is VipReason.SERVING


class SessionState(enum.Enum):
    """A BGP session as ExaBGP reports it (its JSON ``state`` messages)."""

    DOWN = "down"
    CONNECTED = "connected"
    UP = "up"


class SpeakerState(enum.Enum):
    """The ExaBGP child process."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    """Running, and its API process is connected to l4lb."""
    FAILED = "failed"
    """It exited on its own; restarted after a short pause."""
