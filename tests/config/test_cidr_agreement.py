"""The config's CIDR check and the runtime's CIDR parser accept exactly the same texts.

``l4lb check`` validates allow/deny with config/values.py; ``l4lb run`` builds its sets with
trust/cidr.py. Where they disagreed, check said OK and run died with a CidrError traceback
(IPv6 zone ids, issue 11 bug 6; netmask and hostmask prefixes such as '10.0.0.0/255.0.0.0').
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.config import values
from l4lb.trust import cidr

CASES = [
    "10.0.0.0/8",
    "10.0.0.0/08",
    "10.0.0.0/0008",
    "10.0.0.0/255.0.0.0",
    "10.0.0.0/0.255.255.255",
    "2001:db8::/ffff:ffff::",
    "10.0.0.0/ 8",
    "10.0.0.0/8\n",
    " fe80::/10 ",
    "fe80::%lo/64",
    "fe80::1%eth0",
    "::ffff:1.2.3.0/120",
    "::ffff:0:0/95",
    "1.2.3.4",
    "01.2.3.4",
    "10.0.0.0/+8",
    "10.0.0.0/٨",
    "::1/129",
    "[::1]/128",
    "10.0.0.1/8",
]


def _config_accepts(text: str) -> bool:
    try:
        values.parse_cidr(text)
    except ValueError:
        return False
    return True


def _runtime_accepts(text: str) -> bool:
    try:
        cidr.parse_cidr(text)
    except cidr.CidrError:
        return False
    return True


@pytest.mark.parametrize("text", CASES)
def test_check_and_run_agree(text: str) -> None:
    assert _config_accepts(text) == _runtime_accepts(text), text


@given(
    st.one_of(
        st.from_regex(r"\A[0-9a-f:.%/ +\-٨]{0,24}\Z"),
        st.tuples(st.ip_addresses(), st.text("0123456789.:f", max_size=12)).map(
            lambda t: f"{t[0]}/{t[1]}"
        ),
    )
)
def test_check_and_run_agree_on_random_texts(text: str) -> None:
    assert _config_accepts(text) == _runtime_accepts(text), text
