"""The Balancer in-process: its listening-socket factory is passed in, and a reload is atomic.

No subprocess: the balancer runs on an event loop in the test's thread; configs are parsed from
text; the sockets come from the factory the test gives it.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from l4lb.balancer.listener import BindError, open_listening_socket
from l4lb.balancer.runtime import Balancer
from l4lb.config.loader import parse_config
from l4lb.config.schema import Config
from tests.support.peers import free_port


def _config(tmp_path: Path, backend: str, deny_file: str | None = None, port: int = 0) -> Config:
    port = port or free_port()
    listener = f'name = "main"\nbind = "127.0.0.1:{port}"\npool = "main"\n'
    if deny_file is not None:
        listener += f'deny_file = "{deny_file}"\n'
    text = (
        'workers = 1\n[log]\naccess = "off"\n'
        f"[[listeners]]\n{listener}"
        f'[pools.main]\nbackends = [{{ address = "{backend}" }}]\n'
    )
    return parse_config(text, base_dir=tmp_path)


def _run(coro_fn: object) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro_fn())  # type: ignore[operator]
    finally:
        loop.close()


def test_listening_sockets_come_from_the_factory_it_is_given(tmp_path: Path) -> None:
    made: list[tuple[str, int]] = []

    def factory(host: str, port: int) -> socket.socket:
        made.append((host, port))
        return open_listening_socket(host, port)

    async def main() -> None:
        balancer = Balancer(_config(tmp_path, "127.0.0.1:9"), open_socket=factory)
        balancer.start()
        try:
            assert made == [("127.0.0.1", balancer.config.listeners[0].bind_addr[1])]
            assert balancer.listeners["main"].address == made[0]
        finally:
            await balancer.stop(0)

    _run(main)


def test_a_failed_bind_at_start_leaves_nothing_bound(tmp_path: Path) -> None:
    opened: list[socket.socket] = []

    def factory(host: str, port: int) -> socket.socket:
        if opened:
            raise BindError(98, "cannot bind: in use")
        sock = open_listening_socket(host, port)
        opened.append(sock)
        return sock

    text = (
        'workers = 1\n[log]\naccess = "off"\n'
        f'[[listeners]]\nname = "a"\nbind = "127.0.0.1:{free_port()}"\npool = "main"\n'
        f'[[listeners]]\nname = "b"\nbind = "127.0.0.1:{free_port()}"\npool = "main"\n'
        '[pools.main]\nbackends = [{ address = "127.0.0.1:9" }]\n'
    )

    async def main() -> None:
        balancer = Balancer(parse_config(text), open_socket=factory)
        with pytest.raises(BindError):
            balancer.start()
        assert balancer.listeners == {}
        assert opened[0].fileno() == -1
        balancer.access_log.close()

    _run(main)


def test_a_reload_that_fails_changes_nothing(tmp_path: Path) -> None:
    """Bug: the pool switched to the new backends before the listener's new trust policy failed
    to build (then the reload answered an error while half applied). Here the deny_file turns
    bad between the check and the reload (an IPv6 zone id that the check let through did the
    same)."""
    deny = tmp_path / "deny.txt"
    deny.write_text("192.0.2.0/24\n")

    async def main() -> None:
        balancer = Balancer(_config(tmp_path, "127.0.0.1:9", "deny.txt"))
        balancer.start()
        try:
            port = balancer.listeners["main"].address[1]
            before = (balancer.pools, balancer.listeners["main"].admission, balancer.config)
            new = _config(tmp_path, "127.0.0.1:10", "deny.txt", port=port)
            deny.write_text("192.0.2.0/24\nnot-a-network\n")  # changed after the check
            with pytest.raises(ValueError, match=r"deny\.txt:2"):
                balancer.reload(new)
            assert (balancer.pools, balancer.listeners["main"].admission, balancer.config) == before
            assert [b.address for b in balancer.pools["main"].backends] == ["127.0.0.1:9"]
            assert balancer.reloads == 0
            # and through the file path (SIGHUP, POST /reload): the error is reported, not raised
            cfg = tmp_path / "l4lb.toml"
            cfg.write_text(
                'workers = 1\n[log]\naccess = "off"\n'
                f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:{port}"\npool = "main"\n'
                'deny_file = "deny.txt"\n'
                '[pools.main]\nbackends = [{ address = "127.0.0.1:10" }]\n'
            )
            balancer.config_path = str(cfg)
            errors = balancer.reload_file()
            assert len(errors) == 1 and "deny.txt:2" in errors[0]
            assert balancer.pools is before[0]
            deny.write_text("192.0.2.0/24\n")
            assert balancer.reload_file() == []
            assert [b.address for b in balancer.pools["main"].backends] == ["127.0.0.1:10"]
            assert balancer.listeners["main"].admission is not before[1]
        finally:
            await balancer.stop(0)

    _run(main)


def test_a_reload_whose_new_listener_cannot_bind_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        balancer = Balancer(_config(tmp_path, "127.0.0.1:9"))
        balancer.start()
        try:
            port = balancer.listeners["main"].address[1]
            pools = balancer.pools
            with socket.socket() as busy:  # bound without SO_REUSEPORT: the bind below fails
                busy.bind(("127.0.0.1", 0))
                busy.listen(1)
                text = (
                    'workers = 1\n[log]\naccess = "off"\n'
                    f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:{port}"\npool = "main"\n'
                    f'[[listeners]]\nname = "more"\nbind = "127.0.0.1:{busy.getsockname()[1]}"\n'
                    'pool = "main"\n'
                    '[pools.main]\nbackends = [{ address = "127.0.0.1:10" }]\n'
                )
                with pytest.raises(BindError):
                    balancer.reload(parse_config(text))
            assert balancer.pools is pools and list(balancer.listeners) == ["main"]
        finally:
            await balancer.stop(0)

    _run(main)


def test_a_refused_reload_leaves_the_kept_backends_settings_alone(tmp_path: Path) -> None:
    """Bug: staging a reload copied the new weight, max_conns and PROXY version onto the
    backends the running pools share with it, so a reload refused later (here: its deny_file
    turned bad after the check) still changed how the running config balanced."""
    deny = tmp_path / "deny.txt"
    deny.write_text("192.0.2.0/24\n")

    async def main() -> None:
        balancer = Balancer(_config(tmp_path, "127.0.0.1:9", "deny.txt"))
        balancer.start()
        try:
            port = balancer.listeners["main"].address[1]
            kept = balancer.pools["main"].backends[0]
            before = (kept.weight, kept.max_conns, kept.proxy_version, kept.backup)
            text = (
                'workers = 1\n[log]\naccess = "off"\n'
                f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:{port}"\npool = "main"\n'
                'deny_file = "deny.txt"\n[pools.main]\nsend_proxy = "v1"\nbackends = ['
                '{ address = "127.0.0.1:9", weight = 7, max_conns = 3, backup = true }]\n'
            )
            new = parse_config(text, base_dir=tmp_path)
            deny.write_text("192.0.2.0/24\nnot-a-network\n")  # changed after the check
            with pytest.raises(ValueError, match=r"deny\.txt:2"):
                balancer.reload(new)
            assert (kept.weight, kept.max_conns, kept.proxy_version, kept.backup) == before
            deny.write_text("192.0.2.0/24\n")
            balancer.reload(new)  # applied: now the kept backend takes the new settings
            assert balancer.pools["main"].backends == [kept]
            assert (kept.weight, kept.max_conns, kept.proxy_version, kept.backup) == (7, 3, 1, True)
        finally:
            await balancer.stop(0)

    _run(main)
