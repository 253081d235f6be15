"""The value parsers' messages show the right form (what ``l4lb check`` prints after the path)."""

from __future__ import annotations

import pytest

from l4lb.config.values import parse_backend_address, parse_duration, parse_hostport

DURATIONS = [
    ("30", "the unit is missing: write '30s'"),
    ("1.5", "the unit is missing: write '1.5s'"),
    ("5sec", "unknown unit 'sec': write '5s'"),
    ("10 seconds", "unknown unit 'seconds': write '10s'"),
    ("2min", "unknown unit 'min': write '2m'"),
    ("1hr", "unknown unit 'hr': write '1h'"),
    ("250msec", "unknown unit 'msec': write '250ms'"),
    ("2d", "unknown unit 'd': write '48h'"),
    ("5S", "units are lower case: write '5s'"),
    ("100us", "the smallest unit is 'ms'"),
    ("3x", "unknown unit 'x'; units: ms, s, m, h"),
    ("soon", "expected a number and a unit (ms, s, m, h)"),
]


@pytest.mark.parametrize(("text", "right"), DURATIONS)
def test_durations_show_the_right_form(text: str, right: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert right in str(info.value)


@pytest.mark.parametrize(
    ("text", "right"),
    [
        (
            "127.0.0.1:70000",
            "port 70000 is out of range: port must be 1..65535, such as '127.0.0.1:8443'",
        ),
        ("[::1]:0", "port 0 is out of range: port must be 1..65535, such as '[::1]:8443'"),
        ("127.0.0.1:http", "port 'http' is not a number: port must be 1..65535"),
        (":443", "write '0.0.0.0:443' (IPv4) or '[::]:443' (IPv6)"),
        ("10.0.0.300:80", "IPv4 is four numbers 0..255 separated by dots"),
    ],
)
def test_addresses_show_the_right_form(text: str, right: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert right in str(info.value)


def test_a_named_backend_port_out_of_range() -> None:
    with pytest.raises(ValueError) as info:
        parse_backend_address("app.internal:99999")
    assert "port 99999 is out of range: port must be 1..65535, such as 'app.internal:8443'" in (
        str(info.value)
    )
