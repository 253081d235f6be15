"""Every node of a fleet with the same pool config sends a client to the same backend (Maglev),
so a client whose new connection lands on another node after a rehash reaches the same backend.
The fleet test observes the same property through nginx's log."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from l4lb.balancer.pool import Pool
from l4lb.config import load_config

NODE = """
workers = 1

[admin]
bind = "127.0.0.1:{admin}"

[[listeners]]
name = "web"
bind = "127.0.0.{node}:8443"
pool = "web"

[pools.web]
balance = "maglev"
backends = [
    {{ address = "198.51.100.100:8080" }},
    {{ address = "198.51.100.101:8080", weight = 2 }},
    {{ address = "198.51.100.102:8080" }},
    {{ address = "198.51.100.103:8080" }},
]
"""

CLIENTS = [str(ipaddress.ip_address("203.0.113.0") + i) for i in range(256)] + [
    f"2001:db8::{i:x}" for i in range(1, 2000)
]


def _pool(tmp_path: Path, node: int) -> Pool:
    path = tmp_path / f"node{node}.toml"
    path.write_text(NODE.format(node=node, admin=9100 + node))
    config = load_config(path)
    return Pool("web", config.pools["web"])


def _picks(pool: Pool) -> list[str | None]:
    picks = []
    for client in CLIENTS:
        backend = pool.pick(client)
        picks.append(backend.address if backend is not None else None)
    return picks


def test_two_nodes_pick_the_same_backend_for_every_client(tmp_path: Path) -> None:
    a, b = _pool(tmp_path, 1), _pool(tmp_path, 2)
    picks = _picks(a)
    assert picks == _picks(b)
    assert len(set(picks)) == 4  # every backend takes some clients
    # one backend down on both nodes: its clients move, to the same place on both
    for pool in (a, b):
        pool.set_health(pool.backend("198.51.100.101:8080"), False, "test")
    moved = _picks(a)
    assert moved == _picks(b)
    assert "198.51.100.101:8080" not in moved
    kept = [p for p, m in zip(picks, moved, strict=True) if p != "198.51.100.101:8080"]
    assert kept == [m for p, m in zip(picks, moved, strict=True) if p != "198.51.100.101:8080"]
