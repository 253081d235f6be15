"""The ``bpf(2)`` system call through ctypes: maps, program load, attach, and a tiny assembler.

Only what the kernel relay (:mod:`l4lb.balancer.kernel_relay`) needs, with no bcc, clang or
libbpf at run time: create, update, look up and delete map elements, ``mmap`` an array map,
load a program (the verifier's log goes into the error when it refuses), attach it to a map, and
assemble eBPF instructions with labels for jumps. Every failure is a :class:`BpfError` carrying
the ``errno`` (``EPERM``: no ``CAP_BPF``/``CAP_NET_ADMIN``; ``EINVAL``: a kernel too old for a
map type or attach type).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

__all__ = [
    "Asm",
    "BpfError",
    "map_create",
    "map_delete",
    "map_fd_by_id",
    "map_keys",
    "map_lookup",
    "map_mmap",
    "map_update",
    "prog_attach",
    "prog_load",
]

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}
_ATTR_SIZE = 128

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, PROG_ATTACH, PROG_DETACH, MAP_GET_FD_BY_ID = 5, 8, 9, 14

# map types, program types, attach types, flags
MAP_HASH, MAP_ARRAY, MAP_SOCKMAP, MAP_RINGBUF = 1, 2, 15, 27
F_NO_PREALLOC, F_MMAPABLE = 1, 1 << 10
PROG_SK_SKB = 14
ATTACH_SK_SKB_VERDICT = 38
ANY, NOEXIST = 0, 1

# helpers
MAP_LOOKUP_ELEM_FN, GET_SOCKET_COOKIE_FN, SK_REDIRECT_MAP_FN, RINGBUF_OUTPUT_FN = 1, 46, 52, 130
SKB_ADJUST_ROOM_FN = 50

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A ``bpf(2)`` call failed; ``errno`` says why, ``str()`` says what was asked."""


def _nr() -> int:
    machine = os.uname().machine
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise BpfError(0, f"bpf(2): unknown system call number on {machine}")
    return nr


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """One ``bpf(cmd, attr)``; raises :class:`BpfError` naming ``what`` on failure."""
    ret = int(_libc.syscall(_nr(), cmd, attr, _ATTR_SIZE))
    if ret < 0:
        code = ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


def _attr(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)


def map_create(
    kind: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = ""
) -> int:
    """A new map's descriptor (the caller closes it)."""
    attr = struct.pack(
        "<IIIIIII16s", kind, key_size, value_size, max_entries, flags, 0, 0, name.encode()[:15]
    )
    return bpf(MAP_CREATE, _attr(attr), f"map_create({name or kind})")


def _elem(
    cmd: int, fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int, what: str
) -> None:
    k = ctypes.create_string_buffer(key, len(key))  # alive until the call returns
    v = ctypes.addressof(value) if value is not None else 0
    bpf(cmd, _attr(struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), v, flags)), what)


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    v = ctypes.create_string_buffer(value, len(value))
    _elem(MAP_UPDATE_ELEM, fd, key, v, flags, "map_update")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under ``key``, or None when there is none."""
    v = ctypes.create_string_buffer(value_size)
    try:
        _elem(MAP_LOOKUP_ELEM, fd, key, v, 0, "map_lookup")
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Remove ``key``; False when it was not there."""
    try:
        _elem(MAP_DELETE_ELEM, fd, key, None, 0, "map_delete")
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a map (a snapshot: elements can come and go meanwhile)."""
    key = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    keys: list[bytes] = []
    while True:
        prev = ctypes.addressof(key) if keys else 0  # no key: the first one
        attr = struct.pack("<IIQQ", fd, 0, prev, ctypes.addressof(nxt))
        try:
            bpf(MAP_GET_NEXT_KEY, _attr(attr), "map_get_next_key")
        except BpfError as err:
            if err.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt.raw)
        ctypes.memmove(key, nxt, key_size)


def map_fd_by_id(map_id: int) -> int:
    """A new descriptor of the map ``map_id`` (any process's; needs CAP_SYS_ADMIN)."""
    return bpf(MAP_GET_FD_BY_ID, _attr(struct.pack("<III", map_id, 0, 0)), "map_get_fd_by_id")


def map_mmap(fd: int, size: int, writable: bool = True, offset: int = 0) -> mmap.mmap:
    """Map an ``F_MMAPABLE`` array (or a ring buffer's pages) into this process."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
    except OSError as err:
        raise BpfError(err.errno or 0, f"mmap of a bpf map: {err.strerror}") from err


PROG_LOAD_ATTEMPTS = 5
"""Loads tried when the kernel answers EAGAIN."""


def prog_load(kind: int, code: bytes, attach_type: int, name: str, license: str = "GPL") -> int:
    """Load a program; on refusal the error carries the end of the verifier's log.

    Loaded without a log first: the verifier's full log of a program with a loop overflows any
    reasonable buffer (``ENOSPC``); the log is asked for only to explain a refusal.
    """
    text = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 16)

    def attr(level: int) -> ctypes.Array[ctypes.c_char]:
        return _attr(struct.pack(
            "<IIQQIIQII16sII",
            kind, len(code) // 8, ctypes.addressof(text), ctypes.addressof(lic),
            level, len(log) if level else 0, ctypes.addressof(log) if level else 0, 0, 0,
            name.encode()[:15], 0, attach_type,
        ))  # fmt: skip

    for _ in range(PROG_LOAD_ATTEMPTS - 1):
        # EAGAIN: the verifier was interrupted (a signal, or memory pressure); try again, as
        # libbpf does. Seen once under a loaded full suite.
        try:
            return bpf(PROG_LOAD, attr(0), f"prog_load({name})")
        except BpfError as err:
            if err.errno != errno.EAGAIN:
                break
    try:
        return bpf(PROG_LOAD, attr(0), f"prog_load({name})")
    except BpfError as err:
        with contextlib.suppress(BpfError):  # the same refusal, with the verifier's reasons
            os.close(bpf(PROG_LOAD, attr(1), f"prog_load({name})"))  # (accepted this time)
        verifier = log.value.decode("utf-8", "replace").strip()
        if verifier:
            lines = " | ".join(verifier.splitlines()[-6:])
            raise BpfError(err.errno or 0, f"{err.strerror}; verifier: {lines}") from err
        raise


def prog_attach(map_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(PROG_ATTACH, _attr(struct.pack("<IIII", map_fd, prog_fd, attach_type, 0)), "prog_attach")


def prog_detach(map_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(PROG_DETACH, _attr(struct.pack("<IIII", map_fd, prog_fd, attach_type, 0)), "prog_detach")


# -- the assembler --------------------------------------------------------------------------

# opcodes: class | size/op | source
_LDX, _STX, _ALU64, _JMP = 0x61, 0x63, 0x07, 0x05  # (with size W for LDX/STX)
_SIZES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_JUMPS = {"==": 0x10, "!=": 0x50, ">": 0x20, ">=": 0x30, "<": 0xA0, "<=": 0xB0}
_X = 0x08  # source is a register


@dataclass(frozen=True, slots=True)
class _Jump:
    code: int
    dst: int
    src: int
    imm: int
    label: str


class Asm:
    """Builds a program instruction by instruction; jumps name a :meth:`label`.

    Registers are 0-10 (r10 the read-only frame pointer); only the instructions the kernel
    relay's program uses are here.
    """

    def __init__(self) -> None:
        self._items: list[bytes | _Jump] = []
        self._labels: dict[str, int] = {}

    @staticmethod
    def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
        return struct.pack("<BBhi", code, dst | (src << 4), off, imm)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._items.append(self._insn(code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._items)

    def mov(self, dst: int, src: int) -> None:
        """``dst = src`` (registers)."""
        self._emit(0xBF, dst, src)

    def mov_imm(self, dst: int, imm: int) -> None:
        self._emit(0xB7, dst, imm=imm)

    def add(self, dst: int, src: int) -> None:
        self._emit(0x0F, dst, src)

    def add_imm(self, dst: int, imm: int) -> None:
        self._emit(0x07, dst, imm=imm)

    def sub(self, dst: int, src: int) -> None:
        """``dst -= src`` (registers, 64-bit)."""
        self._emit(0x1F, dst, src)

    def rsh_imm(self, dst: int, imm: int) -> None:
        """``dst >>= imm`` (64-bit, logical)."""
        self._emit(0x77, dst, imm=imm)

    def lsh_imm(self, dst: int, imm: int) -> None:
        """``dst <<= imm`` (64-bit)."""
        self._emit(0x67, dst, imm=imm)

    def mov32(self, dst: int, src: int) -> None:
        """``dst = (u32)src`` (the upper half cleared)."""
        self._emit(0xBC, dst, src)

    def load(self, size: int, dst: int, src: int, off: int) -> None:
        """``dst = *(size *)(src + off)``."""
        self._emit(_LDX | _SIZES[size], dst, src, off)

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        """``*(size *)(dst + off) = src``."""
        self._emit(_STX | _SIZES[size], dst, src, off)

    def load_map(self, dst: int, map_fd: int) -> None:
        """``dst = map`` (``ld_imm64`` with BPF_PSEUDO_MAP_FD: two instruction slots)."""
        self._items.append(self._insn(0x18, dst, 1, 0, map_fd) + self._insn(0))

    def call(self, helper: int) -> None:
        self._emit(0x85, imm=helper)

    def exit(self) -> None:
        self._emit(0x95)

    def jump(self, label: str) -> None:
        self._items.append(_Jump(_JMP, 0, 0, 0, label))

    def jump_if(self, dst: int, op: str, imm: int, label: str) -> None:
        """``if dst <op> imm goto label`` (64-bit, unsigned)."""
        self._items.append(_Jump(_JMP | _JUMPS[op], dst, 0, imm, label))

    def jump_if_reg(self, dst: int, op: str, src: int, label: str) -> None:
        """``if dst <op> src goto label`` (64-bit, unsigned)."""
        self._items.append(_Jump(_JMP | _JUMPS[op] | _X, dst, src, 0, label))

    def assemble(self) -> bytes:
        # each item's position in 8-byte slots (ld_imm64 takes two)
        slots, pos = [], 0
        for item in self._items:
            slots.append(pos)
            pos += len(item) // 8 if isinstance(item, bytes) else 1
        slots.append(pos)
        out = []
        for index, item in enumerate(self._items):
            if isinstance(item, bytes):
                out.append(item)
                continue
            target = self._labels.get(item.label)
            if target is None:
                raise ValueError(f"no label {item.label!r}")
            off = slots[target] - slots[index] - 1
            out.append(self._insn(item.code, item.dst, item.src, off, item.imm))
        return b"".join(out)
