"""ClientLimiter: concurrent and rate limits per client, IPv6 per prefix, bounded memory."""

from __future__ import annotations

import tracemalloc

from l4lb.trust.limits import ClientLimiter, Rate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_limit_per_client() -> None:
    limiter = ClientLimiter(max_conns=2)
    assert limiter.acquire("127.0.0.7") is None
    assert limiter.acquire("127.0.0.7") is None
    assert limiter.acquire("127.0.0.7") == "over_conn_limit"
    assert limiter.acquire("127.0.0.8") is None  # another client has its own budget
    assert limiter.acquire("::ffff:127.0.0.7") == "over_conn_limit"  # same client, mapped
    limiter.release("127.0.0.7")
    assert limiter.acquire("127.0.0.7") is None
    for _ in range(3):
        limiter.release("127.0.0.7")
    limiter.release("127.0.0.8")
    assert limiter.sizes() == (0, 0)  # nothing held once every connection has closed


def test_ipv6_clients_share_their_prefix() -> None:
    limiter = ClientLimiter(max_conns=1, v6_prefix=64)
    assert limiter.acquire("2001:db8:1:2::1") is None
    assert limiter.acquire("2001:db8:1:2:ffff::9") == "over_conn_limit"  # same /64
    assert limiter.acquire("2001:db8:1:3::1") is None  # next /64
    per_address = ClientLimiter(max_conns=1, v6_prefix=128)
    assert per_address.acquire("2001:db8:1:2::1") is None
    assert per_address.acquire("2001:db8:1:2::2") is None
    # an IPv4 client never shares a key with an IPv6 prefix
    assert limiter.key("0.0.0.1") != limiter.key("::1")


def test_token_bucket_burst_then_rate() -> None:
    clock = Clock()
    limiter = ClientLimiter(rate=Rate(per_second=2.0, burst=3.0), clock=clock)
    results = [limiter.acquire("127.0.0.7") for _ in range(4)]
    assert results == [None, None, None, "over_rate_limit"]
    assert limiter.acquire("127.0.0.8") is None  # per client
    clock.now += 0.5  # one token back
    assert limiter.acquire("127.0.0.7") is None
    assert limiter.acquire("127.0.0.7") == "over_rate_limit"
    clock.now += 10  # refills to the burst, not beyond
    assert [limiter.acquire("127.0.0.7") for _ in range(4)] == [None, None, None, "over_rate_limit"]


def test_rate_rejection_holds_no_concurrent_slot() -> None:
    clock = Clock()
    limiter = ClientLimiter(max_conns=1, rate=Rate(1.0, 1.0), clock=clock)
    assert limiter.acquire("127.0.0.7") is None
    limiter.release("127.0.0.7")
    assert limiter.acquire("127.0.0.7") == "over_rate_limit"
    assert limiter.active("127.0.0.7") == 0
    clock.now += 1
    assert limiter.acquire("127.0.0.7") is None
    assert limiter.acquire("127.0.0.7") == "over_conn_limit"


def test_full_buckets_expire() -> None:
    clock = Clock()
    limiter = ClientLimiter(rate=Rate(10.0, 5.0), clock=clock)
    for i in range(100):
        assert limiter.acquire(f"10.0.0.{i}") is None
        limiter.release(f"10.0.0.{i}")
    assert limiter.sizes() == (0, 100)
    clock.now += 0.6  # every bucket is full again after burst/rate = 0.5 s
    for i in range(20):  # each call sweeps a few expired entries off the front
        limiter.acquire(f"10.1.0.{i}")
    assert limiter.sizes()[1] == 20


def test_unparseable_address_is_refused_not_counted() -> None:
    limiter = ClientLimiter(max_conns=5)
    assert limiter.acquire("not-an-ip") == "over_conn_limit"
    limiter.release("not-an-ip")
    assert limiter.sizes() == (0, 0)


def flood(limiter: ClientLimiter, clock: Clock, start: int, stop: int) -> None:
    """Distinct sources start..stop, half IPv4 and half IPv6 (each in its own /64), each
    opening and closing one connection; the flood arrives within about a second."""
    acquire, release = limiter.acquire_key, limiter.release_key
    for i in range(start, stop):
        if i % 100 == 0:  # some go through the address-string API
            ip = (
                f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"
                if i & 2
                else f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            )
            assert limiter.acquire(ip) is None
            limiter.release(ip)
            continue
        key = limiter.key_of(6, (0x20010DB8 << 96) | (i << 64) | 1) if i & 1 else i
        assert acquire(key) is None
        release(key)
        if i % 1000 == 0:
            clock.now += 0.001


def test_million_distinct_addresses_tables_stay_at_their_cap() -> None:
    clock = Clock()
    limiter = ClientLimiter(
        max_conns=10, rate=Rate(1.0, 20.0), v6_prefix=64, max_buckets=10_000, clock=clock
    )
    for start in range(0, 1_000_000, 100_000):
        flood(limiter, clock, start, start + 100_000)
        assert limiter.sizes() == (0, 10_000)
    assert limiter.evictions >= 1_000_000 - 10_000 - 100


def test_flood_memory_does_not_grow_once_the_cap_is_reached() -> None:
    clock = Clock()
    limiter = ClientLimiter(
        max_conns=10, rate=Rate(1.0, 20.0), v6_prefix=64, max_buckets=10_000, clock=clock
    )
    tracemalloc.start()
    try:
        flood(limiter, clock, 0, 20_000)  # the table is full from here on
        at_cap = tracemalloc.get_traced_memory()[0]
        flood(limiter, clock, 20_000, 150_000)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert limiter.sizes() == (0, 10_000)
    assert after < at_cap + 64 * 1024, (at_cap, after)


def test_open_connections_are_never_forgotten_under_a_flood() -> None:
    """Buckets are evicted; concurrent counts of open connections are not."""
    limiter = ClientLimiter(max_conns=1, rate=Rate(1000.0, 1000.0), max_buckets=100)
    assert limiter.acquire("127.0.0.7") is None
    for i in range(5000):
        limiter.acquire(f"10.{i >> 8 & 255}.{i & 255}.1")
    assert limiter.acquire("127.0.0.7") == "over_conn_limit"
    assert limiter.sizes()[1] <= 100
