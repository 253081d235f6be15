"""Hypothesis strategies for PROXY headers of every version, family, command and TLV list."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from l4lb.proxy_protocol import TLV, Command, Family, ProxyHeader, SSLInfo, Transport

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: ipaddress.IPv6Address(a).compressed)
unix_paths = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
).filter(lambda s: len(s.encode()) <= 108)

ssl_info = st.builds(
    SSLInfo,
    client=st.integers(0, 255),
    verify=st.integers(0, 2**32 - 1),
    tlvs=st.lists(
        st.builds(
            TLV,
            type=st.sampled_from([0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]),
            value=st.binary(max_size=40),
        ),
        max_size=5,
    ).map(tuple),
)

plain_tlvs = st.builds(
    TLV,
    type=st.sampled_from(
        [0x01, 0x02, 0x04, 0x05, 0x30, 0xE0, 0xE5, 0xEA, 0xEE, 0xEF, 0xF0, 0xF8, 0xFF, 0x10]
    ),
    value=st.binary(max_size=64),
)
tlv_lists = st.lists(st.one_of(plain_tlvs, ssl_info.map(SSLInfo.to_tlv)), max_size=8).map(tuple)

FAMILIES = [
    (Family.UNSPEC, Transport.UNSPEC),
    (Family.INET, Transport.STREAM),
    (Family.INET, Transport.DGRAM),
    (Family.INET6, Transport.STREAM),
    (Family.INET6, Transport.DGRAM),
    (Family.UNIX, Transport.STREAM),
    (Family.UNIX, Transport.DGRAM),
]


@st.composite
def v2_headers(draw: st.DrawFn) -> ProxyHeader:
    family, transport = draw(st.sampled_from(FAMILIES))
    command = draw(st.sampled_from([Command.LOCAL, Command.PROXY]))
    tlvs = draw(tlv_lists)
    src: object = None
    dst: object = None
    if command is Command.PROXY:
        if family is Family.INET:
            src, dst = (draw(ipv4), draw(ports)), (draw(ipv4), draw(ports))
        elif family is Family.INET6:
            src, dst = (draw(ipv6), draw(ports)), (draw(ipv6), draw(ports))
        elif family is Family.UNIX:
            src, dst = draw(unix_paths), draw(unix_paths)
    return ProxyHeader(2, command, family, transport, src, dst, tlvs)  # type: ignore[arg-type]


@st.composite
def v1_headers(draw: st.DrawFn) -> ProxyHeader:
    family = draw(st.sampled_from([Family.INET, Family.INET6, Family.UNSPEC]))
    if family is Family.UNSPEC:
        return ProxyHeader(1, Command.PROXY, family, Transport.UNSPEC, None, None)
    hosts = ipv4 if family is Family.INET else ipv6
    return ProxyHeader(
        1,
        Command.PROXY,
        family,
        Transport.STREAM,
        (draw(hosts), draw(ports)),
        (draw(hosts), draw(ports)),
    )


headers = st.one_of(v1_headers(), v2_headers())
