"""IPv6 zone ids (``fe80::1%eth0``) in CIDR blocks are refused with a message that says so, by the
runtime's own parsers too (deny_file lines, ProxyPolicy's ``trusted``), not reported as a bad
address or accepted by one parser and refused by the next."""

from __future__ import annotations

import pytest

from l4lb.trust.cidr import CidrError, CidrSet, parse_cidr
from l4lb.trust.policy import PolicyError, ProxyPolicy


@pytest.mark.parametrize("text", ["fe80::%lo/64", "fe80::1%eth0", "fe80::%1/10"])
def test_parse_cidr_names_the_zone(text: str) -> None:
    with pytest.raises(CidrError, match="zone id"):
        parse_cidr(text)


def test_deny_file_line_with_a_zone(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "deny.txt"
    path.write_text("2001:db8::/32\nfe80::%lo/64\n")
    with pytest.raises(CidrError, match=r"deny\.txt:2: .*zone id"):
        CidrSet.from_file(path)


@pytest.mark.parametrize("text", ["fe80::%lo/64", "fe80::1%eth0"])
def test_policy_refuses_a_zone_in_trusted(text: str) -> None:
    with pytest.raises(PolicyError, match="zone id"):
        ProxyPolicy("required", [text])


def test_a_peer_with_a_zone_is_still_matched_without_it() -> None:
    """Peers are what the kernel reports (``fe80::1%eth0``): the zone is ignored when matching."""
    assert "fe80::1%eth0" in CidrSet(["fe80::/64"])
