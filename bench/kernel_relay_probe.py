"""Probe for the kernel relay of issue 16 (not product code): does this kernel relay a proxied
pair with an eBPF sockmap, and which of the issue's pitfalls show here?

    sudo .venv/bin/python bench/kernel_relay_probe.py

Loads, with the bpf(2) system call through ctypes (no bcc, no clang), a hand-assembled
``SK_SKB`` verdict program attached (``BPF_SK_SKB_VERDICT``, Linux >= 5.13) to a ``SOCKHASH``
keyed by socket cookie, plus a ``HASH`` map from each socket's cookie to its peer's. The program
drops 0-byte skbs (a redirected one breaks the peer with EPIPE), passes bytes of sockets without
a peer to userspace, and redirects the rest to the peer's egress. Then, on loopback pairs
``client <-> [lb_c | lb_b] <-> backend``, it checks and prints:

1. bytes relayed both ways through the kernel, none of them read by this process;
2. bytes queued before the insertion: stuck until something reads the socket; one non-blocking
   ``recv`` after inserting (it answers EAGAIN) sends them through the program, in order;
3. a FIN is not forwarded: the source shows ``EPOLLRDHUP`` and ``recv`` gives 0, the backend
   sees no EOF (userspace must pass it on once the peer has sent everything);
4. a socket no longer ESTABLISHED (its peer sent FIN) cannot be inserted (EOPNOTSUPP);
5. no backpressure: a client that reads nothing lets the backend push far beyond any socket
   buffer (the bytes wait in the psock's backlog, outside TCP memory accounting).

Findings on this machine (Linux 6.18, root) are in docs/performance.md ("The kernel relay").
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import select
import socket
import struct
import sys
import time

NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
MAP_HASH, MAP_SOCKHASH = 1, 18
PROG_SK_SKB = 14
ATTACH_SK_SKB_VERDICT = 38
SO_COOKIE = 57
SK_DROP, SK_PASS = 0, 1
HELPER_MAP_LOOKUP, HELPER_GET_SOCKET_COOKIE, HELPER_SK_REDIRECT_HASH = 1, 46, 72
TIOCOUTQ = 0x5411

_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    ret = int(_libc.syscall(NR_BPF, cmd, buf, 128))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"bpf({cmd}): {os.strerror(code)}")
    return ret


def map_create(kind: int, key_size: int, value_size: int, entries: int) -> int:
    return bpf(BPF_MAP_CREATE, struct.pack("<IIIII", kind, key_size, value_size, entries, 0))


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(
        BPF_MAP_UPDATE_ELEM,
        struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0),
    )


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def load_map_fd(dst: int, fd: int) -> bytes:
    """``ld_imm64 dst, map_fd`` (BPF_PSEUDO_MAP_FD): two instruction slots."""
    return insn(0x18, dst, 1, 0, fd) + insn(0)


def verdict_program(peers: int, sockets: int) -> bytes:
    return b"".join(
        [
            insn(0xBF, 6, 1),  # r6 = skb
            insn(0x61, 2, 6, 0),  # r2 = skb->len
            insn(0x55, 2, 0, 2, 0),  # if r2 != 0 goto +2
            insn(0xB7, 0, 0, 0, SK_DROP),  # a 0-byte skb: drop it
            insn(0x95),
            insn(0xBF, 1, 6),  # r1 = skb
            insn(0x85, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),
            insn(0x7B, 10, 0, -8),  # *(u64 *)(fp - 8) = cookie
            insn(0xBF, 2, 10),
            insn(0x07, 2, 0, 0, -8),  # r2 = fp - 8
            load_map_fd(1, peers),
            insn(0x85, 0, 0, 0, HELPER_MAP_LOOKUP),
            insn(0x15, 0, 0, 7, 0),  # no peer: goto pass
            insn(0xBF, 3, 0),  # r3 = &peer cookie
            insn(0xBF, 1, 6),
            load_map_fd(2, sockets),
            insn(0xB7, 4, 0, 0, 0),  # flags 0: the peer's egress
            insn(0x85, 0, 0, 0, HELPER_SK_REDIRECT_HASH),
            insn(0x95),
            insn(0xB7, 0, 0, 0, SK_PASS),  # pass: to this socket's own reader
            insn(0x95),
        ]
    )


def prog_load(code: bytes) -> int:
    lic = ctypes.create_string_buffer(b"GPL")
    text = ctypes.create_string_buffer(code, len(code))
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack(
        "<IIQQIIQII16sII",
        PROG_SK_SKB, len(code) // 8, ctypes.addressof(text), ctypes.addressof(lic),
        1, len(log), ctypes.addressof(log), 0, 0, b"l4lb_probe", 0, ATTACH_SK_SKB_VERDICT,
    )  # fmt: skip
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror}: {log.value.decode()[-600:]}") from err


def cookie(sock: socket.socket) -> int:
    return int(struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
    return c, s


class Sockmap:
    def __init__(self) -> None:
        self.peers = map_create(MAP_HASH, 8, 8, 1024)
        self.sockets = map_create(MAP_SOCKHASH, 8, 4, 1024)
        self.prog = prog_load(verdict_program(self.peers, self.sockets))
        bpf(
            BPF_PROG_ATTACH, struct.pack("<IIII", self.sockets, self.prog, ATTACH_SK_SKB_VERDICT, 0)
        )

    def insert(self, a: socket.socket, b: socket.socket) -> None:
        ka, kb = struct.pack("<Q", cookie(a)), struct.pack("<Q", cookie(b))
        map_update(self.peers, ka, kb)
        map_update(self.peers, kb, ka)
        map_update(self.sockets, ka, struct.pack("<I", a.fileno()))
        map_update(self.sockets, kb, struct.pack("<I", b.fileno()))


def read_for(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
        got += b"<EOF>"
    except TimeoutError:
        pass
    return got


def main() -> int:
    try:
        sm = Sockmap()
    except OSError as err:
        print(f"kernel relay unavailable: {err}")
        return 1
    print("1. program loaded and attached (SK_SKB verdict on a SOCKHASH)")
    client, lb_c = pair()
    lb_b, backend = pair()
    client.sendall(b"early ")
    time.sleep(0.05)
    sm.insert(lb_c, lb_b)
    print(f"   before any read, the backend has {read_for(backend, 0.5)!r}")
    try:
        answer: object = lb_c.recv(1 << 16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        answer = "EAGAIN"
    print(f"2. one recv after inserting answers {answer!r}; the backend then has ", end="")
    print(f"{read_for(backend, 0.5)!r}")
    client.sendall(b"request")
    backend.sendall(b"x" * 1_000_000)
    print(f"   relayed: backend got {read_for(backend, 0.5)!r}; ", end="")
    print(f"client got {len(read_for(client, 0.5))} bytes")
    ep = select.epoll()
    ep.register(lb_c.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    events = ep.poll(1)
    print(
        f"3. client FIN: lb_c events {events}, recv {lb_c.recv(100, socket.MSG_DONTWAIT)!r}; ",
        end="",
    )
    print(f"backend got {read_for(backend, 1.0)!r}")
    client, lb_c = pair()
    lb_b, backend = pair()
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    try:
        sm.insert(lb_c, lb_b)
        print("4. a CLOSE_WAIT socket was inserted")
    except OSError as err:
        print(f"4. a CLOSE_WAIT socket cannot be inserted: {err}")
    client, lb_c = pair()
    lb_b, backend = pair()
    sm.insert(lb_c, lb_b)
    backend.setblocking(False)
    sent, chunk, start = 0, b"y" * (1 << 20), time.monotonic()
    while time.monotonic() - start < 3 and sent < 256 << 20:
        try:
            sent += backend.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    queued = array.array("i", [0])
    fcntl.ioctl(lb_c.fileno(), TIOCOUTQ, queued)
    print(
        f"5. to a client reading nothing the backend sent {sent >> 20} MiB in at most 3 s; ", end=""
    )
    print(f"lb_c's socket send queue holds {queued[0] >> 20} MiB, the rest is in the psock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
