"""The per-connection deny/allow check: lookup cost with 10 CIDR blocks vs 100,000.

A CidrSet probes one hash set per distinct prefix length, so its cost follows the number of
prefix lengths in use, not the number of blocks. For contrast, the obvious implementation (a
linear scan of ``ipaddress`` networks) is timed on a sample. Prints a table and writes
``bench/results/cidr.json``.

    .venv/bin/python bench/cidr.py [--quick]
"""

from __future__ import annotations

import ipaddress
import json
import platform
import random
import sys
import time
from pathlib import Path

from l4lb.trust.cidr import CidrSet, ip_to_int

RESULTS = Path(__file__).parent / "results" / "cidr.json"

# A blocklist's usual shape: mostly single addresses and /24s, some wider blocks, some IPv6.
V4_LENGTHS = (20, 22, 24, 24, 24, 28, 29, 30, 32, 32, 32, 32, 32, 32)
V4_WIDE = (8, 12, 16)  # one block in ten thousand
V6_LENGTHS = (32, 48, 56, 64, 64, 128)


def blocks(count: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        if rng.random() < 0.9:
            plen = rng.choice(V4_WIDE if rng.random() < 1e-4 else V4_LENGTHS)
            net = ipaddress.IPv4Network((rng.getrandbits(32) >> (32 - plen) << (32 - plen), plen))
        else:
            plen = rng.choice(V6_LENGTHS)
            net6 = rng.getrandbits(128) >> (128 - plen) << (128 - plen)
            out.add(str(ipaddress.IPv6Network((net6, plen))))
            continue
        out.add(str(net))
    return sorted(out)


def probes(cidrs: list[str], rng: random.Random, count: int) -> list[str]:
    """Half addresses inside listed blocks (hits), half random IPv4 (almost all misses)."""
    inside = []
    for text in rng.sample(cidrs, min(count // 2, len(cidrs))):
        net = ipaddress.ip_network(text)
        inside.append(str(net.network_address + rng.randrange(min(net.num_addresses, 2**32))))
    while len(inside) < count // 2:
        inside.append(inside[len(inside) % max(1, len(inside))] if inside else "10.0.0.1")
    outside = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(count - len(inside))]
    mixed = inside + outside
    rng.shuffle(mixed)
    return mixed


def per_lookup_ns(fn: object, items: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for item in items:
            fn(item)  # type: ignore[operator]
        best = min(best, (time.perf_counter_ns() - start) / len(items))
    return best


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    rng = random.Random(7)
    lookups = 20_000 if quick else 200_000
    rows = []
    for size in (10, 100_000):
        listed = blocks(size, rng)
        started = time.perf_counter()
        cidrs = CidrSet(listed)
        build_s = time.perf_counter() - started
        items = probes(listed, rng, lookups)
        hits = sum(ip in cidrs for ip in items)
        ints = [ip_to_int(ip) for ip in items]
        contains_int = cidrs.contains_int

        def by_int(pair: tuple[int, int], f=contains_int) -> bool:  # type: ignore[no-untyped-def]
            return f(*pair)

        string_ns = per_lookup_ns(cidrs.__contains__, items, 3)
        int_ns = per_lookup_ns(by_int, ints, 3)  # type: ignore[arg-type]
        nets = [ipaddress.ip_network(c) for c in listed]
        sample = items[: 2000 if size == 10 else 20]

        def linear(
            ip: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = nets
        ) -> bool:
            addr = ipaddress.ip_address(ip)
            return any(addr in n for n in nets)

        linear_ns = per_lookup_ns(linear, sample, 1)
        lengths = cidrs.prefix_lengths()
        rows.append(
            {
                "cidrs": size,
                "prefix_lengths": len(lengths[4]) + len(lengths[6]),
                "build_s": round(build_s, 3),
                "lookup_str_ns": round(string_ns),
                "lookup_int_ns": round(int_ns),
                "linear_ipaddress_ns": round(linear_ns),
                "hit_ratio": round(hits / len(items), 3),
            }
        )
    header = (
        f"{'CIDRs':>8} {'prefix lens':>11} {'build s':>8} {'lookup ns (str)':>16} "
        f"{'lookup ns (int)':>16} {'linear ipaddress ns':>20} {'hits':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['cidrs']:>8} {r['prefix_lengths']:>11} {r['build_s']:>8} {r['lookup_str_ns']:>16} "
            f"{r['lookup_int_ns']:>16} {r['linear_ipaddress_ns']:>20} {r['hit_ratio']:>5}"
        )
    print(
        "lookup ns (str): `ip in CidrSet` from the socket's address text (what admission pays "
        "once per connection); (int): the probes alone."
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "cidr",
                "command": "python bench/cidr.py" + (" --quick" if quick else ""),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "lookups": lookups,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
