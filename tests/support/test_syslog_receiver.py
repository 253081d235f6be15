"""The test receiver's RFC 5424 parser is strict: what it accepts, what it refuses."""

from __future__ import annotations

import pytest

from tests.support.syslog_receiver import ParseError, parse

GOOD = b"<134>1 2026-12-06T07:46:34.390569+00:00 lb1 l4lb 4242 access - {}"


def test_a_well_formed_message_parses_to_its_fields() -> None:
    msg = parse(GOOD)
    assert (msg.facility, msg.severity, msg.version) == (16, 6, 1)
    assert (msg.hostname, msg.app_name, msg.procid, msg.msgid, msg.sd) == (
        "lb1",
        "l4lb",
        "4242",
        "access",
        "-",
    )
    assert msg.timestamp.microsecond == 390569 and msg.msg == b"{}"


def test_structured_data_elements_parse() -> None:
    data = b'<13>1 2026-12-06T07:46:34Z h a 1 m [origin software="l4lb"][x@1 a="b\\"c"] hi'
    assert parse(data).sd == '[origin software="l4lb"][x@1 a="b\\"c"]'


@pytest.mark.parametrize(
    "data",
    [
        b"<192>1 2026-12-06T07:46:34Z h a 1 m - x",  # PRI above 191
        b"<01>1 2026-12-06T07:46:34Z h a 1 m - x",  # leading zero in PRI
        b"<134>2026-12-06T07:46:34Z h a 1 m - x",  # no VERSION
        b"<134>1 2026-12-06T07:46:34 h a 1 m - x",  # no offset
        b"<134>1 2026-12-06 07:46:34Z h a 1 m - x",  # not a TIMESTAMP
        b"<134>1 2026-13-06T07:46:34Z h a 1 m - x",  # month 13
        b"<134>1 - h a 1 m - x",  # NILVALUE timestamp (l4lb always sends one)
        b"<134>1 2026-12-06T07:46:34Z h a 1 m",  # no STRUCTURED-DATA
        b"<134>1 2026-12-06T07:46:34Z h  a 1 m - x",  # two spaces
        b"<134>1 2026-12-06T07:46:34Z h a 1 m - \xc3",  # half a UTF-8 character
        b"134>1 2026-12-06T07:46:34Z h a 1 m - x",
    ],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises((ParseError, ValueError)):
        parse(data)
