"""Balancing algorithms, in one registry by the name ``balance`` uses in the config.

Every algorithm is given the backends *in rotation* (state up, weight > 0), and all the
configured ones, by :meth:`rebuild`, called again whenever that set changes, and skips at pick
time the ones that are full (``max_conns``) or excluded (already tried for this connection).
``pick`` gets the real client IP, which only Maglev uses. The weighted algorithms read
``Backend.eff_weight`` (the weight, lowered during a slow start); Maglev's table uses the
configured ``weight`` only, so a slow start does not move clients between backends: a backend
coming back up gets its own clients back at once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from l4lb.balancer.pool import Backend

MAGLEV_TABLE_SIZE = 65537
"""A prime, so every backend's permutation visits every slot (Maglev paper, 3.4)."""


def _free(b: Backend, exclude: Collection[Backend]) -> bool:
    m = b.max_conns
    return (m is None or b.active < m) and b not in exclude


class Algorithm(Protocol):
    def rebuild(self, members: Sequence[Backend], configured: Sequence[Backend]) -> None:
        """The backends in rotation changed (order is the config's)."""

    def pick(self, client_ip: str, exclude: Collection[Backend]) -> Backend | None:
        """The backend for a new connection, or None when no backend can take it."""


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: exact proportions over each cycle, well interleaved."""

    __slots__ = ("current", "members")

    def __init__(self) -> None:
        self.members: list[Backend] = []
        self.current: list[int] = []

    def rebuild(self, members: Sequence[Backend], configured: Sequence[Backend] = ()) -> None:
        # Members that stay keep their place in the cycle: a slow start rebuilds every step,
        # and starting every cycle over would starve a backend whose weight is still 1.
        kept = dict(zip(map(id, self.members), self.current, strict=True))
        self.members = list(members)
        self.current = [kept.get(id(b), 0) for b in self.members]

    def pick(self, client_ip: str, exclude: Collection[Backend]) -> Backend | None:
        current = self.current
        best = -1
        total = 0
        for i, b in enumerate(self.members):
            m = b.max_conns
            if (m is not None and b.active >= m) or b in exclude:
                continue
            current[i] += b.eff_weight
            total += b.eff_weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.members[best]


class LeastConn:
    """Fewest active connections relative to weight; ties rotate so equals share the load."""

    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: list[Backend] = []
        self.turn = 0

    def rebuild(self, members: Sequence[Backend], configured: Sequence[Backend] = ()) -> None:
        self.members = list(members)

    def pick(self, client_ip: str, exclude: Collection[Backend]) -> Backend | None:
        members = self.members
        n = len(members)
        if not n:
            return None
        self.turn = start = (self.turn + 1) % n
        best: Backend | None = None
        best_load = 0.0
        for k in range(n):
            b = members[(start + k) % n]
            if not _free(b, exclude):
                continue
            load = b.active / b.eff_weight
            if best is None or load < best_load:
                best, best_load = b, load
        return best


class RandomTwo:
    """Power of two random choices (weighted draw), the less loaded of the two wins."""

    __slots__ = ("cum", "members", "rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self.members: list[Backend] = []
        self.cum: list[int] = []
        self.rng = rng or random.Random()

    def rebuild(self, members: Sequence[Backend], configured: Sequence[Backend] = ()) -> None:
        self.members = list(members)
        total = 0
        self.cum = []
        for b in self.members:
            total += b.eff_weight
            self.cum.append(total)

    def pick(self, client_ip: str, exclude: Collection[Backend]) -> Backend | None:
        if not self.members:
            return None
        a, b = self.rng.choices(self.members, cum_weights=self.cum, k=2)
        fa, fb = _free(a, exclude), _free(b, exclude)
        if fa and fb:
            return a if a.active / a.eff_weight <= b.active / b.eff_weight else b
        if fa or fb:
            return a if fa else b
        free = [m for m in self.members if _free(m, exclude)]
        return min(free, key=lambda m: m.active / m.eff_weight) if free else None


def _hash64(data: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8, salt=salt).digest())


_KEY_SALT = b"l4lb-key"
_OFFSET_SALT = b"l4lb-off"
_SKIP_SALT = b"l4lb-skp"


def maglev_table(members: Sequence[tuple[str, int]], size: int = MAGLEV_TABLE_SIZE) -> list[int]:
    """The Maglev lookup table for ``(name, weight)`` members: slot -> member index.

    Each member walks its own permutation of the slots (offset and skip from hashes of its name,
    so every instance with the same config builds the same table) and claims ``weight`` free
    slots per round until the table is full.
    """
    table = [-1] * size
    if not members:
        return table
    offsets = [_hash64(name, _OFFSET_SALT) % size for name, _ in members]
    skips = [_hash64(name, _SKIP_SALT) % (size - 1) + 1 for name, _ in members]
    nexts = [0] * len(members)
    filled = 0
    while True:
        for i, (_, weight) in enumerate(members):
            offset, skip, j = offsets[i], skips[i], nexts[i]
            for _ in range(weight):
                c = (offset + j * skip) % size
                while table[c] >= 0:
                    j += 1
                    c = (offset + j * skip) % size
                table[c] = i
                j += 1
                filled += 1
                if filled == size:
                    return table
            nexts[i] = j


class Maglev:
    """Maglev consistent hashing of the real client IP.

    The table is built from every configured backend with weight > 0, whatever its state, so
    it only changes when the config does: the same client reaches the same backend across
    restarts and across instances with the same config, and removing one backend of N from the
    config moves about 1/N of the clients. A backend that is down, drained, disabled, full or
    excluded is passed over by probing the following slots, so exactly its own clients move
    (spread over the others as the table is) and come back when it does.
    """

    __slots__ = ("_cache", "any_free", "members", "size", "table")

    def __init__(self, size: int = MAGLEV_TABLE_SIZE) -> None:
        self.size = size
        self.members: list[Backend] = []
        self.table: list[int] = []
        self.any_free = False
        self._cache: dict[tuple[tuple[str, int], ...], list[int]] = {}

    def rebuild(self, members: Sequence[Backend], configured: Sequence[Backend] = ()) -> None:
        self.any_free = bool(members)
        self.members = [b for b in (configured or members) if b.weight > 0]
        key = tuple((b.address, b.weight) for b in self.members)
        table = self._cache.get(key)
        if table is None:
            table = maglev_table(key, self.size)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = table
        self.table = table

    def lookup(self, client_ip: str) -> int:
        """The slot of ``client_ip`` in the table."""
        return _hash64(client_ip, _KEY_SALT) % self.size

    def pick(self, client_ip: str, exclude: Collection[Backend]) -> Backend | None:
        if not self.any_free:
            return None
        members = self.members
        slot = self.lookup(client_ip)
        b = members[self.table[slot]]
        if b.in_rotation and _free(b, exclude):
            return b
        if not any(m.in_rotation and _free(m, exclude) for m in members):
            return None
        table, size = self.table, self.size
        while True:
            slot = (slot + 1) % size
            b = members[table[slot]]
            if b.in_rotation and _free(b, exclude):
                return b


ALGORITHMS: dict[str, Callable[[], Algorithm]] = {
    "roundrobin": SmoothRoundRobin,
    "leastconn": LeastConn,
    "random2": RandomTwo,
    "maglev": Maglev,
}
"""Balancing algorithms by the name used in ``[pools.NAME] balance``."""
