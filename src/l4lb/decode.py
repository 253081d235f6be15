"""``l4lb decode``: show the PROXY header in a capture, from a hex argument or raw stdin.

    l4lb decode 0d0a0d0a000d0a515549540a2111000c...
    printf 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\\r\\n' | l4lb decode --json

Exit status: 0 decoded, 1 invalid or incomplete header (the reason is printed), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from typing import Any

from l4lb.config.values import format_hostport
from l4lb.proxy_protocol import (
    CRC32C_IMPLEMENTATION,
    TLV,
    ParseOptions,
    ProxyHeader,
    ProxyProtocolError,
    TLVType,
    parse,
)
from l4lb.proxy_protocol.options import V2_MAX_POSSIBLE
from l4lb.proxy_protocol.tlv import parse_ssl

_HEX_TEXT = set(string.hexdigits + string.whitespace + ":")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="l4lb decode",
        description="Decode a PROXY protocol header (v1 or v2) and print it.",
        epilog="Without HEX, reads stdin: raw bytes, or hex text if it is only hex digits.",
    )
    p.add_argument(
        "hex",
        nargs="*",
        help="the header as hex (spaces, colons and 0x allowed), or a v1 line 'PROXY ...'",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--raw", action="store_true", help="treat stdin as raw bytes, never as hex")
    p.add_argument(
        "--allow-ipv4-in-tcp6", action="store_true", help="accept dotted IPv4 in a v1 TCP6 line"
    )
    p.add_argument(
        "--no-v1-unknown-long",
        action="store_true",
        help="reject addresses after 'PROXY UNKNOWN' (accepted by default, as the spec says)",
    )
    p.add_argument(
        "--max-v2-size",
        type=int,
        default=V2_MAX_POSSIBLE,
        help=f"largest v2 header accepted (default {V2_MAX_POSSIBLE}: decode anything)",
    )
    p.add_argument("--max-tlvs", type=int, default=4096, help="most TLVs accepted")
    return p


class UsageError(Exception):
    pass


def _from_hex(text: str) -> bytes:
    cleaned = text.replace("0x", "").replace("0X", "").replace("\\x", "")
    cleaned = "".join(ch for ch in cleaned if ch not in string.whitespace and ch != ":")
    try:
        return bytes.fromhex(cleaned)
    except ValueError as err:
        raise UsageError(
            f"not valid hex: {err}; a v1 line may be given as text ('PROXY TCP4 ...'), "
            "or raw bytes on stdin"
        ) from None


def _input(args: argparse.Namespace) -> bytes:
    if args.hex:
        text = " ".join(args.hex)
        if text.startswith("PROXY "):  # a v1 line pasted as text (from a capture, a log)
            line = text.encode("ascii", "backslashreplace")
            return line if line.endswith(b"\r\n") else line.rstrip(b"\r\n") + b"\r\n"
        return _from_hex("".join(args.hex))
    data = sys.stdin.buffer.read()
    if not args.raw and data.strip() and set(data.decode("latin-1")) <= _HEX_TEXT:
        return _from_hex(data.decode("ascii"))
    return data


def _text(value: bytes) -> str | None:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _tlv_name(t: int) -> str:
    try:
        return TLVType(t).name
    except ValueError:
        if 0xE0 <= t <= 0xEF:
            return "CUSTOM"
        return "UNKNOWN"


def _endpoint(value: object) -> Any:
    if isinstance(value, tuple):
        return {"host": value[0], "port": value[1]}
    return value


def to_json(header: ProxyHeader, length: int, trailing: int) -> dict[str, Any]:
    """A JSON-ready description of ``header``."""
    out: dict[str, Any] = {
        "version": header.version,
        "length": length,
        "command": header.command.name,
        "family": header.family.name,
        "transport": header.transport.name,
        "source": _endpoint(header.source),
        "destination": _endpoint(header.destination),
        "tlvs": [
            {
                "type": t.type,
                "name": _tlv_name(t.type),
                "length": len(t.value),
                "hex": t.value.hex(),
                "text": _text(t.value),
            }
            for t in header.tlvs
        ],
        "trailing_bytes": trailing,
    }
    extras: dict[str, Any] = {
        "authority": header.authority,
        "alpn": _text(header.alpn) if header.alpn is not None else None,
        "unique_id": header.unique_id.hex() if header.unique_id is not None else None,
        "crc32c": f"0x{header.crc32c:08x}" if header.crc32c is not None else None,
        "netns": header.netns,
        "aws_vpce_id": header.aws_vpce_id,
        "azure_link_id": header.azure_link_id,
        "gcp_psc_id": header.gcp_psc_id,
    }
    ssl = header.ssl
    if ssl is not None:
        extras["ssl"] = {
            "client": ssl.client,
            "verify": ssl.verify,
            "version": ssl.version,
            "cn": ssl.cn,
            "cipher": ssl.cipher,
            "sig_alg": ssl.sig_alg,
            "key_alg": ssl.key_alg,
            "group": ssl.group,
            "sig_scheme": ssl.sig_scheme,
            "client_cert_bytes": len(ssl.client_cert) if ssl.client_cert is not None else None,
        }
    out.update({k: v for k, v in extras.items() if v is not None})
    return out


def _fmt_endpoint(value: object) -> str:
    if isinstance(value, tuple):
        host, port = value
        return format_hostport(host, port)
    if value is None:
        return "-"
    return repr(value)


def _tlv_line(t: TLV) -> str:
    text = _text(t.value)
    shown = repr(text) if text is not None else t.value[:64].hex()
    if text is None and len(t.value) > 64:
        shown += "..."
    return f"0x{t.type:02X} {_tlv_name(t.type):<16} {len(t.value):>5} B  {shown}"


def to_text(header: ProxyHeader, length: int, trailing: int) -> str:
    """A human-readable description of ``header``."""
    lines = [
        f"PROXY protocol v{header.version} header, {length} bytes",
        f"  command      {header.command.name}",
        f"  family       {header.family.name} / {header.transport.name}",
        f"  source       {_fmt_endpoint(header.source)}",
        f"  destination  {_fmt_endpoint(header.destination)}",
    ]
    if header.tlvs:
        lines.append(f"  TLVs         {len(header.tlvs)}")
        for t in header.tlvs:
            if t.type == TLVType.SSL:
                info = parse_ssl(t.value)  # validated by parse already
                shown = f"client=0x{info.client:02x} verify={info.verify}"
                lines.append(f"    0x{t.type:02X} {'SSL':<16} {len(t.value):>5} B  {shown}")
                lines += [f"      {_tlv_line(sub)}" for sub in info.tlvs]
                continue
            lines.append(f"    {_tlv_line(t)}")
    if header.crc32c is not None:
        lines.append(f"  crc32c       0x{header.crc32c:08x} (verified, {CRC32C_IMPLEMENTATION})")
    ssl = header.ssl
    if ssl is not None:
        lines.append(
            f"  ssl          client=0x{ssl.client:02x} verify={ssl.verify} version={ssl.version}"
            f" cipher={ssl.cipher} cn={ssl.cn}"
        )
    for name in ("aws_vpce_id", "azure_link_id", "gcp_psc_id"):
        value = getattr(header, name)
        if value is not None:
            lines.append(f"  {name:<12} {value}")
    if trailing:
        lines.append(f"  after it     {trailing} more byte(s) of payload")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        options = ParseOptions(
            allow_ipv4_in_tcp6=args.allow_ipv4_in_tcp6,
            allow_v1_unknown_long=not args.no_v1_unknown_long,
            max_v2_size=args.max_v2_size,
            max_tlvs=args.max_tlvs,
        )
        data = _input(args)
    except (UsageError, ValueError) as err:
        print(f"l4lb decode: {err}", file=sys.stderr)
        return 2
    try:
        header, length = parse(data, options)
    except ProxyProtocolError as err:
        if args.json:
            print(json.dumps({"error": {"reason": err.reason.value, "message": err.message}}))
        print(f"l4lb decode: invalid PROXY header: {err}", file=sys.stderr)
        return 1
    trailing = len(data) - length
    if args.json:
        print(json.dumps(to_json(header, length, trailing), indent=2))
    else:
        print(to_text(header, length, trailing))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
