"""ProxyPolicy and HeaderGate: the accept_proxy rules as a table, fed whole and byte by byte."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.trust.policy import Decision, HeaderGate, Mode, PolicyError, ProxyPolicy, Reason

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
TRUSTED = "127.0.0.1"
UNTRUSTED = "127.0.0.9"
SOCK = ("127.0.0.2", 8080)


def v1(
    src: str = "198.51.100.42", dst: str = "203.0.113.7", sport: int = 40000, dport: int = 443
) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(
    src: str = "198.51.100.42",
    dst: str = "203.0.113.7",
    sport: int = 40000,
    dport: int = 443,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    if local:
        return V2_SIG + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    if ":" in src:
        addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        fam = 0x21
    else:
        addrs = socket.inet_aton(src) + socket.inet_aton(dst)
        fam = 0x11
    body = addrs + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


APP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CLIENT = ("198.51.100.42", 40000)
DEST = ("203.0.113.7", 443)


@dataclass(frozen=True)
class Row:
    name: str
    mode: str
    peer: str
    data: bytes
    reason: Reason | None  # None: still undecided after all the data
    client: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    consumed: int = 0
    trailing: bytes = b""


def _peer(host: str) -> tuple[str, int]:
    return (host, 5555)


ROWS = [
    # required
    Row(
        "required v1", "required", TRUSTED, v1() + APP, Reason.HEADER, CLIENT, DEST, len(v1()), APP
    ),
    Row(
        "required v2", "required", TRUSTED, v2() + APP, Reason.HEADER, CLIENT, DEST, len(v2()), APP
    ),
    Row("required v2 alone", "required", TRUSTED, v2(), Reason.HEADER, CLIENT, DEST, len(v2())),
    Row(
        "required v2 ipv6",
        "required",
        TRUSTED,
        v2("2001:db8::1", "2001:db8::2", 1, 2) + APP,
        Reason.HEADER,
        ("2001:db8::1", 1),
        ("2001:db8::2", 2),
        len(v2("2001:db8::1", "2001:db8::2", 1, 2)),
        APP,
    ),
    Row(
        "required v1 ipv6",
        "required",
        TRUSTED,
        v1("2001:db8::1", "2001:db8::2", 1, 2),
        Reason.HEADER,
        ("2001:db8::1", 1),
        ("2001:db8::2", 2),
        len(v1("2001:db8::1", "2001:db8::2", 1, 2)),
    ),
    Row(
        "required v2 LOCAL",
        "required",
        TRUSTED,
        v2(local=True) + APP,
        Reason.LOCAL,
        _peer(TRUSTED),
        SOCK,
        16,
        APP,
    ),
    Row(
        "required v1 UNKNOWN",
        "required",
        TRUSTED,
        b"PROXY UNKNOWN\r\n" + APP,
        Reason.LOCAL,
        _peer(TRUSTED),
        SOCK,
        15,
        APP,
    ),
    Row("required untrusted", "required", UNTRUSTED, v1() + APP, Reason.UNTRUSTED),
    Row("required untrusted silent", "required", UNTRUSTED, b"", Reason.UNTRUSTED),
    Row("required no header", "required", TRUSTED, APP, Reason.BAD_HEADER),
    Row(
        "required bad v1 port", "required", TRUSTED, v1(sport=0)[:-2] + b"x\r\n", Reason.BAD_HEADER
    ),
    Row(
        "required v1 two spaces",
        "required",
        TRUSTED,
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        Reason.BAD_HEADER,
    ),
    Row(
        "required bad v2 version",
        "required",
        TRUSTED,
        V2_SIG + b"\x31\x11\x00\x0c" + bytes(12),
        Reason.BAD_HEADER,
    ),
    Row("required partial v2", "required", TRUSTED, v2()[:20], None),
    Row("required partial v1", "required", TRUSTED, v1()[:20], None),
    Row("required nothing yet", "required", TRUSTED, b"", None),
    # optional
    Row(
        "optional trusted v1",
        "optional",
        TRUSTED,
        v1() + APP,
        Reason.HEADER,
        CLIENT,
        DEST,
        len(v1()),
        APP,
    ),
    Row(
        "optional trusted v2",
        "optional",
        TRUSTED,
        v2() + APP,
        Reason.HEADER,
        CLIENT,
        DEST,
        len(v2()),
        APP,
    ),
    Row(
        "optional trusted no header",
        "optional",
        TRUSTED,
        APP,
        Reason.NO_HEADER,
        _peer(TRUSTED),
        SOCK,
        0,
        APP,
    ),
    Row(
        "optional trusted LOCAL",
        "optional",
        TRUSTED,
        v2(local=True),
        Reason.LOCAL,
        _peer(TRUSTED),
        SOCK,
        16,
    ),
    Row("optional trusted bad header", "optional", TRUSTED, b"PROXY TCP9 x\r\n", Reason.BAD_HEADER),
    Row("optional untrusted v1 forged", "optional", UNTRUSTED, v1() + APP, Reason.SPOOFING_ATTEMPT),
    Row("optional untrusted v2 forged", "optional", UNTRUSTED, v2() + APP, Reason.SPOOFING_ATTEMPT),
    Row(
        "optional untrusted direct",
        "optional",
        UNTRUSTED,
        APP,
        Reason.DIRECT,
        _peer(UNTRUSTED),
        SOCK,
        0,
        APP,
    ),
    Row(
        "optional untrusted looks like PROX",
        "optional",
        UNTRUSTED,
        b"PROXIMITY\r\n",
        Reason.DIRECT,
        _peer(UNTRUSTED),
        SOCK,
        0,
        b"PROXIMITY\r\n",
    ),
    Row("optional untrusted partial signature", "optional", UNTRUSTED, b"PROX", None),
    Row("optional trusted partial v2 signature", "optional", TRUSTED, V2_SIG[:8], None),
    # off
    Row("off header is data", "off", TRUSTED, b"", Reason.DIRECT, _peer(TRUSTED), SOCK, 0, b""),
    Row("off untrusted", "off", UNTRUSTED, b"", Reason.DIRECT, _peer(UNTRUSTED), SOCK, 0, b""),
]


def _policy(mode: str) -> ProxyPolicy:
    return ProxyPolicy(mode=mode, trusted=["127.0.0.1/32", "10.0.0.0/8"], header_timeout=1.0)


def _run(row: Row, chunks: list[bytes]) -> tuple[HeaderGate, Decision | None]:
    gate = _policy(row.mode).start(_peer(row.peer), SOCK)
    decision = gate.decision
    fed = 0
    for chunk in chunks:
        if decision is not None:
            break
        decision = gate.feed(chunk)
        fed += len(chunk)
        if decision is None:
            assert gate.next_read_size() >= 1
    return gate, decision


def _check(row: Row, decision: Decision | None) -> None:
    if row.reason is None:
        assert decision is None
        return
    assert decision is not None
    assert decision.reason is row.reason, decision.detail
    assert decision.upstream == _peer(row.peer)
    if row.client is None:
        assert not decision.accepted
        assert decision.client is None
        assert decision.detail
        return
    assert decision.accepted
    assert decision.client == row.client
    assert decision.destination == row.destination
    assert decision.consumed == row.consumed
    # Bytes past the header come back untouched, whether fed whole or byte by byte.
    assert decision.trailing == row.trailing
    assert (decision.header is not None) == (row.consumed > 0)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_whole(row: Row) -> None:
    _, decision = _run(row, [row.data] if row.data else [])
    _check(row, decision)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_byte_by_byte(row: Row) -> None:
    # Fed one byte at a time, trailing bytes after the decision are not fed: the ones that
    # arrive in the deciding chunk are the trailing bytes, so compare only the header part.
    gate, decision = _run(row, [row.data[i : i + 1] for i in range(len(row.data))])
    if row.reason is None or row.client is None:
        _check(row, decision)
        return
    assert decision is not None
    expected_trailing = row.trailing if row.consumed == 0 and row.trailing else b""
    if row.consumed == 0 and row.trailing:
        # Without a header, the gate decides as soon as the signature is ruled out.
        assert row.trailing.startswith(decision.trailing)
        assert decision.trailing
    else:
        assert decision.trailing == expected_trailing
    assert decision.reason is row.reason
    assert decision.client == row.client
    assert decision.destination == row.destination
    assert decision.consumed == row.consumed
    assert gate.received == row.consumed + len(decision.trailing)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_split_in_two_everywhere(row: Row) -> None:
    for cut in range(1, len(row.data)):
        _, decision = _run(row, [row.data[:cut], row.data[cut:]])
        if decision is not None and decision.accepted and decision.consumed:
            assert decision.consumed == row.consumed
            assert decision.client == row.client
            # Decided by the first chunk when it holds the whole header; else by the second.
            end = cut if cut >= row.consumed else len(row.data)
            assert decision.trailing == row.data[row.consumed : end]
        elif row.reason is not None:
            assert decision is not None
            assert decision.reason is row.reason


TIMEOUT_ROWS = [
    # (mode, peer, data before the timeout, reason at expire(), accepted)
    ("required", TRUSTED, b"", Reason.HEADER_TIMEOUT, False),
    ("required", TRUSTED, v2()[:10], Reason.HEADER_TIMEOUT, False),
    ("required", TRUSTED, v1()[:-1], Reason.HEADER_TIMEOUT, False),
    ("optional", TRUSTED, b"", Reason.NO_HEADER, True),  # server-speaks-first, direct
    ("optional", UNTRUSTED, b"", Reason.DIRECT, True),
    ("optional", TRUSTED, b"PROX", Reason.HEADER_TIMEOUT, False),  # partial signature, then silence
    ("optional", UNTRUSTED, b"\r\n\r\n", Reason.HEADER_TIMEOUT, False),
    ("optional", TRUSTED, v2()[:14], Reason.HEADER_TIMEOUT, False),
    ("required", UNTRUSTED, b"", Reason.UNTRUSTED, False),
    ("off", UNTRUSTED, b"", Reason.DIRECT, True),
]


@pytest.mark.parametrize(("mode", "peer", "data", "reason", "accepted"), TIMEOUT_ROWS)
def test_expire(mode: str, peer: str, data: bytes, reason: Reason, accepted: bool) -> None:
    gate = _policy(mode).start(_peer(peer), SOCK)
    if gate.decision is None:
        for i in range(len(data)):
            assert gate.feed(data[i : i + 1]) is None
    decision = gate.expire()
    assert decision.reason is reason
    assert decision.accepted is accepted
    assert gate.decision is decision
    assert gate.next_read_size() == 0
    if accepted:
        assert decision.client == _peer(peer)
        assert decision.destination == SOCK
    else:
        assert decision.detail


@pytest.mark.parametrize(
    ("mode", "data", "reason"),
    [
        ("required", b"", Reason.EOF),
        ("required", v1()[:9], Reason.EOF),
        ("optional", b"", Reason.NO_HEADER),
        ("optional", b"PR", Reason.EOF),
    ],
)
def test_eof(mode: str, data: bytes, reason: Reason) -> None:
    gate = _policy(mode).start(_peer(TRUSTED), SOCK)
    if data:
        assert gate.feed(data) is None
    assert gate.eof().reason is reason


def test_feed_after_decision_is_an_error() -> None:
    gate = _policy("required").start(_peer(TRUSTED), SOCK)
    assert gate.feed(v2()) is not None
    with pytest.raises(RuntimeError):
        gate.feed(b"more")


def test_tlvs_reach_the_decision() -> None:
    authority = b"example.com"
    tlvs = bytes([0x02]) + struct.pack("!H", len(authority)) + authority
    gate = _policy("required").start(_peer(TRUSTED), SOCK)
    decision = gate.feed(v2(tlvs=tlvs))
    assert decision is not None and decision.header is not None
    assert decision.header.authority == "example.com"


def test_next_read_size_never_passes_the_end_of_a_v2_header() -> None:
    data = v2(tlvs=bytes([0x05, 0x00, 0x04]) + b"abcd") + APP
    gate = _policy("optional").start(_peer(TRUSTED), SOCK)
    pos = 0
    decision = None
    while decision is None:
        size = gate.next_read_size()
        decision = gate.feed(data[pos : pos + size])
        pos += size
    assert decision.reason is Reason.HEADER
    assert pos == decision.consumed  # exact reads: not one application byte taken
    assert decision.trailing == b""


# --- the policy object itself -------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "ip", "expected"),
    [
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.1/32"], "127.0.0.2", False),
        (["10.0.0.0/8"], "10.200.3.4", True),
        (["10.0.0.0/8"], "::ffff:10.200.3.4", True),  # IPv4-mapped peer of a dual-stack socket
        (["::ffff:10.0.0.0/104"], "10.1.1.1", True),  # mapped block normalised to 10.0.0.0/8
        (["2001:db8::/32"], "2001:db8::7", True),
        (["2001:db8::/32"], "2001:db9::7", False),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["0.0.0.0/0"], "::1", False),
        ([], "127.0.0.1", False),
        (["127.0.0.0/8"], "not an address", False),
        (["127.0.0.0/8"], "", False),
        ([ipaddress.ip_network("192.0.2.0/24")], "192.0.2.9", True),
    ],
)
def test_is_trusted(trusted: list[object], ip: str, expected: bool) -> None:
    assert ProxyPolicy(mode="optional", trusted=trusted).is_trusted(ip) is expected  # type: ignore[arg-type]


def test_trusted_is_normalised_to_a_tuple_of_networks() -> None:
    policy = ProxyPolicy(trusted=["10.0.0.0/8", "::1"])
    assert policy.trusted == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert policy.mode is Mode.REQUIRED
    assert policy == ProxyPolicy(mode=Mode.REQUIRED, trusted=("10.0.0.0/8", "::1"))
    hash(policy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sometimes"}, "mode 'sometimes' is not one of"),
        ({"trusted": ["10.0.0.1/8"]}, "write 10.0.0.0/8"),
        ({"trusted": ["ten"]}, "'ten' is not a CIDR block"),
        ({"trusted": "10.0.0.0/8"}, "must be a list"),
        ({"trusted": [8]}, "is not a CIDR block"),
        ({"header_timeout": 0}, "header_timeout must be a positive"),
        ({"header_timeout": -1.0}, "header_timeout must be a positive"),
        ({"header_timeout": "5s"}, "header_timeout must be a positive"),
    ],
)
def test_bad_policy_is_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ProxyPolicy(**kwargs)  # type: ignore[arg-type]


def test_ipv6_peer_tuples_and_mapped_peers() -> None:
    policy = ProxyPolicy(mode="required", trusted=["127.0.0.1"])
    gate = policy.start(("::ffff:127.0.0.1", 4000, 0, 0), ("::ffff:127.0.0.2", 80, 0, 0))
    assert gate.decision is None and gate.trusted
    decision = gate.feed(v1())
    assert decision is not None and decision.client == CLIENT
    assert decision.upstream == ("::ffff:127.0.0.1", 4000)


def test_describe() -> None:
    gate = _policy("optional").start(_peer(UNTRUSTED), SOCK)
    decision = gate.feed(v1())
    assert decision is not None
    assert decision.describe().startswith("rejected 127.0.0.9:5555: spoofing_attempt (")
    ok = _policy("required").start(_peer(TRUSTED), SOCK).feed(v1())
    assert ok is not None
    assert ok.describe() == "accepted 198.51.100.42:40000 via 127.0.0.1:5555: header (v1)"


# --- properties: any split of the same bytes decides the same way -------------------------

_PREFIXES = [v1(), v2(), v2(local=True), b"PROXY UNKNOWN\r\n", b"PROXY ", V2_SIG, b"", b"GET "]


def _decide(mode: str, peer: str, chunks: list[bytes]) -> tuple[object, ...]:
    gate = _policy(mode).start(_peer(peer), SOCK)
    decision = gate.decision
    fed = b""
    for chunk in chunks:
        if decision is not None:
            break
        fed += chunk
        decision = gate.feed(chunk)
    if decision is None:
        return ("undecided", gate.received)
    header_end = decision.consumed
    # What the caller holds after the decision: the header, then the trailing bytes, in order.
    assert fed[header_end:] == decision.trailing or not decision.accepted
    return (decision.reason, decision.accepted, decision.client, decision.consumed)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(["required", "optional"]),
    peer=st.sampled_from([TRUSTED, UNTRUSTED]),
    prefix=st.sampled_from(_PREFIXES),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_any_split_decides_like_whole(
    mode: str, peer: str, prefix: bytes, tail: bytes, cuts: list[int]
) -> None:
    data = prefix + tail
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole = _decide(mode, peer, [data] if data else [])
    split = _decide(mode, peer, chunks if data else [])
    assert whole == split
