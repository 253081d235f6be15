"""The codec's one exception tree: every failure is a ProxyProtocolError with a machine reason."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a header was rejected; stable strings for logs, metrics and tests."""

    TRUNCATED = "truncated"
    BAD_SIGNATURE = "bad_signature"
    BAD_VERSION = "bad_version"
    BAD_COMMAND = "bad_command"
    BAD_FAMILY = "bad_family"
    BAD_ADDRESS = "bad_address"
    BAD_PORT = "bad_port"
    BAD_SYNTAX = "bad_syntax"
    TOO_LONG = "too_long"
    BAD_CRLF = "bad_crlf"
    TLV_OVERFLOW = "tlv_overflow"
    TLV_TOO_MANY = "tlv_too_many"
    BAD_TLV = "bad_tlv"
    CRC_MISMATCH = "crc_mismatch"
    UNIQUE_ID_TOO_LONG = "unique_id_too_long"
    BAD_SSL_TLV = "bad_ssl_tlv"
    UNENCODABLE = "unencodable"


class ProxyProtocolError(Exception):
    """Base of every error the codec raises; ``reason`` says why, the message says where."""

    reason: Reason

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"


class IncompleteHeader(ProxyProtocolError):
    """The bytes so far are a valid prefix of a header; more bytes are needed."""

    def __init__(self, message: str = "more bytes are needed to complete the header") -> None:
        super().__init__(Reason.TRUNCATED, message)


class NotProxyProtocol(ProxyProtocolError):
    """The bytes cannot start a PROXY header: neither the v1 nor the v2 signature."""

    def __init__(
        self, message: str = "data starts with neither the v1 nor the v2 signature"
    ) -> None:
        super().__init__(Reason.BAD_SIGNATURE, message)


class InvalidHeader(ProxyProtocolError):
    """A signature matched but the rest of the header is malformed (or cannot be encoded)."""
