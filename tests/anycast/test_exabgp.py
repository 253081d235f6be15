"""The ExaBGP side: the generated configuration is one ExaBGP itself accepts, its neighbour
messages are read into session states, and the watchdog stops the child when the loop hangs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from l4lb.anycast.announcer import Announcer
from l4lb.anycast.exabgp import ExaBgp, parse_message, render_config, route_line
from l4lb.anycast.state import SessionState, SpeakerState, VipReason
from l4lb.balancer.runtime import Balancer
from l4lb.config import parse_config
from l4lb.config.anycast import AnycastConfig

ANYCAST = msgspec.convert(
    {
        "vips": ["192.0.2.10/32", "2001:db8::10/128"],
        "local_as": 65010,
        "router_id": "203.0.113.2",
        "neighbors": [
            {"address": "203.0.113.1", "remote_as": 65000},
            {"address": "2001:db8::1", "remote_as": 65000, "local_address": "2001:db8::2"},
        ],
        "watchdog": "500ms",
    },
    AnycastConfig,
)


def test_generated_config_is_accepted_by_exabgp(tmp_path: Path) -> None:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(render_config(ANYCAST, [sys.executable, "-m", "l4lb.anycast.bridge", "x"]))
    result = subprocess.run(
        [sys.executable, "-m", "exabgp", "validate", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = conf.read_text()
    assert "hold-time 3;" in text and "neighbor-changes;" in text and "ipv6 unicast;" in text


# (line from ExaBGP, expected) - the JSON encoder's "state" messages, as exabgp 5 writes them
MESSAGES = [
    (
        b'{ "exabgp": "5.0.0", "time": 1.0, "host" : "n1", "pid" : 7, "ppid" : 1, "counter": 1, '
        b'"type": "state", "neighbor": { "address": { "local": "203.0.113.2", "peer": '
        b'"203.0.113.1" }, "asn": { "local": 65010, "peer": 65000 } , "state": "up" } }\n',
        ("203.0.113.1", SessionState.UP, ""),
    ),
    (
        b'{ "exabgp": "5.0.0", "time": 1.0, "type": "state", "neighbor": { "address": { '
        b'"local": "203.0.113.2", "peer": "203.0.113.1" }, "asn": { "local": 65010, "peer": '
        b'65000 } , "state": "down", "reason": "peer reset, message [closing]" } }\n',
        ("203.0.113.1", SessionState.DOWN, "peer reset, message [closing]"),
    ),
    (b'{ "exabgp": "5.0.0", "type": "notification", "notification": "shutdown" }\n', None),
    (b'{ "type": "state", "neighbor": { "state": "sideways" } }\n', None),
    (b"done\n", None),
    (b"[1, 2]\n", None),
]


@pytest.mark.parametrize(("line", "expected"), MESSAGES)
def test_neighbour_messages(line: bytes, expected: object) -> None:
    assert parse_message(line) == expected


def test_route_lines() -> None:
    assert (
        route_line("announce", "192.0.2.10/32") == b"announce route 192.0.2.10/32 next-hop self\n"
    )
    assert route_line("withdraw", "2001:db8::10/128") == (
        b"withdraw route 2001:db8::10/128 next-hop self\n"
    )


def test_watchdog_stops_the_speaker_when_the_loop_hangs(tmp_path: Path) -> None:
    """A stuck event loop must not leave the node announced: the child is stopped (its BGP
    sessions close), and restarted once the loop runs again."""

    async def scenario() -> None:
        config = parse_config(
            '[[listeners]]\nname = "w"\nbind = "127.0.0.1:1"\npool = "p"\n'
            '[pools.p]\nbackends = [{ address = "127.0.0.1:2" }]\n'
        )
        balancer = Balancer(config, None, asyncio.get_running_loop())
        # a stand-in child that only lives: the watchdog's job is to stop whatever runs
        speaker = ExaBgp(ANYCAST, command=[sys.executable, "-c", "import time; time.sleep(60)"])
        announcer = Announcer(ANYCAST, speaker, None)
        await announcer.start(balancer)
        try:
            first = speaker.process
            assert first is not None and first.poll() is None
            assert announcer.reason("192.0.2.10/32") is VipReason.NOT_BOUND
            time.sleep(1.5)  # the loop hangs (no await) past the 500ms watchdog
            assert first.wait(5) == -15  # SIGTERM from the watchdog thread
            assert announcer.watchdog_trips == 1
            deadline = time.monotonic() + 10
            while speaker.restarts == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert speaker.restarts == 1 and speaker.process is not None
            assert speaker.process.poll() is None
        finally:
            await announcer.close()
        assert speaker.state is SpeakerState.STOPPED and speaker.process is None
        assert first.poll() is not None

    asyncio.run(scenario())
