"""``l4lb decode``: hex argument, raw or hex stdin, --json, and exit 1 with the reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb import decode

from .vectors import INVALID, VALID

ROOT = Path(__file__).resolve().parents[2]
BY_ID = {v.id: v for v in VALID}
# The spec's own examples (doc/proxy-protocol.txt sections 2.1 and 2.2).
SPEC_V1 = [
    b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    b" 65535 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    b" 65535 65535\r\n",
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
]


def run(argv: list[str], stdin: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return decode.main(argv)


@pytest.mark.parametrize("line", SPEC_V1)
def test_spec_v1_examples_raw_stdin(
    line: bytes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([], line + b"GET / HTTP/1.0\r\n\r\n", monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"v1 header, {len(line)} bytes" in out
    assert "more byte(s) of payload" in out


def test_hex_argument_text(capsys: pytest.CaptureFixture[str]) -> None:
    data = BY_ID["v2-ssl-all-subtypes"].data
    assert decode.main([data.hex()]) == 0
    out = capsys.readouterr().out
    assert "PROXY protocol v2 header" in out
    assert "192.0.2.1:56324" in out and "198.51.100.2:443" in out
    assert "client=0x07 verify=0" in out
    for name, value in [
        ("SSL_VERSION", "TLSv1.3"),
        ("SSL_CN", "client.example"),
        ("SSL_GROUP", "X25519"),
    ]:
        assert any(name in line and repr(value) in line for line in out.splitlines()), name
    assert "version=TLSv1.3" in out and "cn=client.example" in out


def test_hex_with_spaces_colons_and_0x(capsys: pytest.CaptureFixture[str]) -> None:
    data = BY_ID["v2-tcp6"].data
    spaced = " ".join(f"0x{b:02x}" for b in data[:8]) + " " + ":".join(f"{b:02x}" for b in data[8:])
    assert decode.main(spaced.split(" ")) == 0
    assert "[2001:db8::1]:1" in capsys.readouterr().out


def test_hex_text_on_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = BY_ID["v2-cloud-custom-tlvs"].data
    assert run(["--json"], data.hex().encode() + b"\n", monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aws_vpce_id"] == "vpce-08d2bf15fac5001c9"
    assert doc["azure_link_id"] == 0x12345678
    assert doc["gcp_psc_id"] == 0x0102030405060708


def test_header_survives_pickle_replace_asdict() -> None:
    import pickle
    from dataclasses import asdict, replace

    from l4lb.proxy_protocol import parse

    header, _ = parse(BY_ID["v2-ssl-all-subtypes"].data)
    assert pickle.loads(pickle.dumps(header)) == header
    assert replace(header, tlvs=()).tlvs == () and replace(header, tlvs=()).source == header.source
    assert asdict(header)["source"] == ("192.0.2.1", 56324)


def test_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    data = BY_ID["v2-crc32c"].data
    assert decode.main(["--json", data.hex() + "cafe"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 2 and doc["command"] == "PROXY" and doc["family"] == "INET"
    assert doc["source"] == {"host": "192.0.2.1", "port": 56324}
    assert doc["destination"] == {"host": "198.51.100.2", "port": 443}
    assert doc["authority"] == "example.com"
    assert doc["crc32c"] == "0x" + data[-4:].hex()
    assert [t["name"] for t in doc["tlvs"]] == ["AUTHORITY", "CRC32C"]
    assert doc["length"] == len(data) and doc["trailing_bytes"] == 2


@pytest.mark.parametrize(
    "vec", [v for v in INVALID if v.id in {"v1-port-leading-zero", "v2-crc-mismatch", "not-http"}]
)
def test_invalid_exit_1_with_reason(
    vec: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data: bytes = vec.data  # type: ignore[attr-defined]
    assert run(["--raw"], data, monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"invalid PROXY header: {vec.reason.value}" in err  # type: ignore[attr-defined]
    assert "Traceback" not in err


def test_invalid_json_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert decode.main(["--json", BY_ID["v2-tcp4"].data[:-2].hex()]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["reason"] == "truncated"


def test_policy_switches(capsys: pytest.CaptureFixture[str]) -> None:
    line = b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n".hex()
    assert decode.main([line]) == 1
    assert "bad_address" in capsys.readouterr().err
    assert decode.main(["--allow-ipv4-in-tcp6", line]) == 0
    assert "[::ffff:c000:201]:1" in capsys.readouterr().out
    long_unknown = b"PROXY UNKNOWN ::1 ::1 1 2\r\n".hex()
    assert decode.main(["--no-v1-unknown-long", long_unknown]) == 1
    assert decode.main(["--max-v2-size", "20", BY_ID["v2-tcp4"].data.hex()]) == 1
    assert "too_long" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert decode.main(["zz"]) == 2
    assert decode.main(["--max-v2-size", "5", "00"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_subprocess_via_l4lb_cli() -> None:
    """The installed command end to end: python -m l4lb decode, stdin and argument forms."""
    python = ROOT / ".venv" / "bin" / "python"
    exe = str(python) if python.exists() else sys.executable
    ok = subprocess.run(
        [exe, "-m", "l4lb", "decode", "--json"],
        input=SPEC_V1[4],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["source"] == {"host": "192.168.0.1", "port": 56324}
    bad = subprocess.run(
        [exe, "-m", "l4lb", "decode", b"PROXY TCP4 1.2.3.4 1.2.3.4 8_0 2\r\n".hex()],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert b"bad_port" in bad.stderr and b"Traceback" not in bad.stderr


# -- ``l4lb decode`` as an operator uses it: a v1 line pasted from a capture, as one or many args.


def _decode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "decode", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443",),
        ("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",),
        ("PROXY", "TCP4", "192.168.0.1", "192.168.0.11", "56324", "443"),  # unquoted
    ],
)
def test_v1_line_as_text(args: tuple[str, ...]) -> None:
    result = _decode(*args)
    assert result.returncode == 0, result.stderr
    assert "192.168.0.1:56324" in result.stdout
    assert "192.168.0.11:443" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("PROXY TCP4 1.2.3.4 5.6.7.8 1 +2",), 1, "bad_port"),  # as strict as ever
        (("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\u00e9",), 1, "bad_port"),
        (("zz",), 2, "a v1 line may be given as text"),
    ],
)
def test_bad_text_says_why(args: tuple[str, ...], code: int, message: str) -> None:
    result = _decode(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
