"""Per-client limits on the real client address: concurrent connections and a new-connection rate.

Two tables, each bounded:

- concurrent counts exist only while a client has a connection open, so that table is never
  larger than the number of open connections (which the listener's own ``max_conns`` bounds);
- token buckets live in an LRU table with a hard cap. A bucket that has refilled to its burst is
  the same as no bucket at all, so it expires exactly then; under a flood of distinct addresses
  the least recently seen buckets are evicted first (a client evicted early gets a fresh burst,
  the one leniency that keeps memory bounded).

IPv6 clients are aggregated per ``client_v6_prefix`` (a /64 by default: one subscriber, one
budget), IPv4 clients per address. Keys are plain integers, so an entry costs a few dozen bytes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from l4lb.trust.cidr import CidrError, ip_to_int

__all__ = ["ClientLimiter", "Rate"]

OVER_CONN_LIMIT = "over_conn_limit"
OVER_RATE_LIMIT = "over_rate_limit"

_V6_TAG = 1 << 128


@dataclass(frozen=True, slots=True)
class Rate:
    """New connections allowed per second, and how many may come at once (the bucket's size).

    The config's ``new_conns_per_client`` and ``new_conns_burst`` give both
    (``ListenerConfig.new_conns_rate`` and ``.new_conns_burst_size``).
    """

    per_second: float
    burst: float


class ClientLimiter:
    """Concurrent-connection and token-bucket limits per client (or per IPv6 prefix).

    ``acquire(ip)`` returns None and counts the connection, or the reason it is over a limit;
    ``release(key)`` gives back the slot of the key ``acquire`` reported through :meth:`key`.
    """

    __slots__ = (
        "_active",
        "_buckets",
        "_clock",
        "_full_after",
        "_v6_shift",
        "evictions",
        "max_buckets",
        "max_conns",
        "rate",
        "v6_prefix",
    )

    def __init__(
        self,
        *,
        max_conns: int | None = None,
        rate: Rate | None = None,
        v6_prefix: int = 64,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= v6_prefix <= 128:
            raise ValueError(f"client_v6_prefix must be 1..128, not {v6_prefix}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, not {max_buckets}")
        self.max_conns = max_conns
        self.rate = rate
        self.max_buckets = max_buckets
        self.evictions = 0
        self.v6_prefix = v6_prefix
        self._v6_shift = 128 - v6_prefix
        self._clock = clock
        self._active: dict[int, int] = {}
        # key -> (tokens, time of last update); ordered from least to most recently touched.
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self._full_after = rate.burst / rate.per_second if rate else 0.0

    def key(self, ip: str) -> int:
        """The integer a client is counted under: its IPv4 address or its IPv6 prefix."""
        return self.key_of(*ip_to_int(ip))

    def key_of(self, version: int, value: int) -> int:
        """:meth:`key` of an address already converted with :func:`~l4lb.trust.cidr.ip_to_int`."""
        if version == 4:
            return value
        return _V6_TAG | (value >> self._v6_shift)

    def acquire(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; None if within limits, else the reason it is not.

        A rejected connection leaves no trace in the concurrent table. An address that cannot be
        parsed is refused as over the connection limit would be, never counted.
        """
        try:
            key = self.key(ip)
        except CidrError:
            return OVER_CONN_LIMIT
        return self.acquire_key(key)

    def acquire_key(self, key: int) -> str | None:
        """:meth:`acquire` by key. Open connections are counted only under a ``max_conns``."""
        max_conns = self.max_conns
        if max_conns is not None:
            active = self._active.get(key, 0)
            if active >= max_conns:
                return OVER_CONN_LIMIT
        if self.rate is not None and not self._take_token(key):
            return OVER_RATE_LIMIT
        if max_conns is not None:
            self._active[key] = active + 1
        return None

    def release(self, ip: str) -> None:
        """A connection counted by :meth:`acquire` has closed."""
        try:
            key = self.key(ip)
        except CidrError:
            return
        self.release_key(key)

    def release_key(self, key: int) -> None:
        """:meth:`release` by key; a key that holds no slot is ignored."""
        active = self._active.get(key, 0)
        if active > 1:
            self._active[key] = active - 1
        elif active == 1:
            del self._active[key]

    def _take_token(self, key: int) -> bool:
        assert self.rate is not None
        now = self._clock()
        buckets = self._buckets
        self._expire(now)
        entry = buckets.pop(key, None)
        burst = self.rate.burst
        if entry is None:
            tokens = burst
        else:
            tokens = min(burst, entry[0] + (now - entry[1]) * self.rate.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        buckets[key] = (tokens, now)
        if len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
            self.evictions += 1
        return allowed

    def _expire(self, now: float) -> None:
        # The table is ordered by last touch, so the refilled buckets are all at the front. A
        # bucket touched at time t is full by t + burst/rate at the latest: forgetting it changes
        # nothing. Bounded work per call keeps the hot path flat; the cap does the rest.
        buckets = self._buckets
        horizon = now - self._full_after
        for _ in range(8):
            if not buckets:
                return
            key, (_, touched) = next(iter(buckets.items()))
            if touched > horizon:
                return
            del buckets[key]

    def active(self, ip: str) -> int:
        """Connections currently counted for ``ip``'s key."""
        return self._active.get(self.key(ip), 0)

    def sizes(self) -> tuple[int, int]:
        """(clients with open connections, token buckets held): what the limiter's memory holds."""
        return len(self._active), len(self._buckets)
