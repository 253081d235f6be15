"""Reading a header off a real socket without taking a byte of what follows it.

v2: ``HeaderReader.next_read_size()`` is exact. v1: peek, ``v1_line_length``, then recv exactly.
The payload must still be in the socket afterwards (a balancer splices or hands it over).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from l4lb.proxy_protocol import HeaderReader, build, parse, v1_line_length

PAYLOAD = b"\x16\x03\x01 not for the header reader"


def _send_slowly(sock: socket.socket, data: bytes, pieces: list[int]) -> threading.Thread:
    def run() -> None:
        pos = 0
        for n in pieces:
            sock.sendall(data[pos : pos + n])
            pos += n
            time.sleep(0.01)
        sock.sendall(data[pos:])

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("version", [1, 2])
def test_reader_never_takes_payload_bytes(version: int) -> None:
    header = build(version, ("2001:db8::7", 40000), ("2001:db8::1", 443))
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        sender = _send_slowly(a, header + PAYLOAD, [3, 9, 11, 1])
        reader = HeaderReader()
        if version == 2:
            while reader.header is None:
                chunk = b.recv(reader.next_read_size())
                assert chunk
                reader.feed(chunk)
        else:
            while True:
                peeked = b.recv(256, socket.MSG_PEEK)
                length = v1_line_length(peeked)
                if length is not None:
                    break
                time.sleep(0.005)
            reader.feed(b.recv(length))
        sender.join()
        assert reader.header == parse(header)[0]
        assert reader.trailing == b""
        rest = b""
        while len(rest) < len(PAYLOAD):
            rest += b.recv(4096)
        assert rest == PAYLOAD
