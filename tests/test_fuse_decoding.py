"""Every field of every request a caller can reach, at any value it can take, through
the real decoder and the real filesystem: random values (hypothesis) in each field of
each opcode, sent to a Session serving rofs's own operations over real layers, must be
answered with a reply and never be an internal error (a traceback in the log, EIO).

What the kernel itself decides (node ids, file handles, the request's unique id, sizes
it caps at the negotiated maximum, names it has checked) is valid here, as the kernel
would send it; everything that comes from a caller's arguments (offsets, lengths,
whence, modes, flags, xattr sizes, ioctl commands, times, ids) ranges over its whole
field.  The layers sit on a small tmpfs, so a huge fallocate is a quick ENOSPC."""

import errno
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest
from conftest import build_lower
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rofs.fuse import LOOP, proto
from rofs.fuse.session import MAX_WRITE, Session
from rofs.ops import RofsOperations
from rofs.overlay import Overlay
from rofs.store import state

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-2**63, 2**63 - 1)
NSEC = st.integers(0, 2**32 - 1)
SIZE = st.integers(0, MAX_WRITE)  # the kernel caps what it asks for
# Names as the kernel passes them: 1-255 bytes, no NUL or slash, not . or ..
NAME = st.binary(min_size=1, max_size=255).map(
    lambda b: b.replace(b"\0", b"x").replace(b"/", b"y")).filter(
    lambda b: b not in (b".", b".."))
XATTR = st.sampled_from([b"user.", b"trusted.", b"security.", b"system.", b"other."]).flatmap(
    lambda ns: NAME.map(lambda n: (ns + n)[:255]))


class Served:
    """A Session serving RofsOperations over real layers; replies go to a socket."""

    def __init__(self, base: str) -> None:
        lower = os.path.join(base, "lower")
        os.mkdir(lower)
        build_lower(lower)
        self.prepared = state.prepare(os.path.join(base, "state"), "/mnt", lower)
        p = self.prepared
        self.overlay = Overlay(p.lower_fd, p.upper_fd, p.work_fd, index_fd=p.index_fd,
                               loop=LOOP)
        self.ops = RofsOperations(self.overlay)
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.session = Session(self.ours.fileno(), self.ops, want=self.ops.want)
        self.unique = 0
        error, _ = self.call(proto.INIT, 0, proto.INIT_IN.pack(
            proto.KERNEL_VERSION, proto.KERNEL_MINOR_VERSION, 0, 0xFFFFFFFF) +
            struct.pack("<I", 0xFFFFFFFF) + bytes(44))
        assert error == 0
        # What the kernel would hold: nodes it looked up and handles it opened.
        self.file = self.entry(proto.ROOT_ID, b"passwd")
        self.big = self.entry(proto.ROOT_ID, b"big")
        self.dir = self.entry(proto.ROOT_ID, b"d")
        error, body = self.call(proto.CREATE, proto.ROOT_ID, proto.CREATE_IN.pack(
            os.O_RDWR | os.O_CREAT, 0o100644, 0o022, 0) + b"mine\0")
        assert error == 0, error
        self.mine = proto.ENTRY_OUT.unpack_from(body)[0]
        self.mine_fh = proto.OPEN_OUT.unpack_from(body, proto.ENTRY_OUT.size)[0]
        self.file_fh = self.open(self.file, os.O_RDONLY)
        self.big_fh = self.open(self.big, os.O_RDWR)
        error, body = self.call(proto.OPENDIR, proto.ROOT_ID, proto.OPEN_IN.pack(0, 0))
        assert error == 0
        self.dir_fh = proto.OPEN_OUT.unpack_from(body)[0]

    def entry(self, parent: int, name: bytes) -> int:
        error, body = self.call(proto.LOOKUP, parent, name + b"\0")
        assert error == 0, (name, error)
        return proto.ENTRY_OUT.unpack_from(body)[0]

    def open(self, node: int, flags: int) -> int:
        error, body = self.call(proto.OPEN, node, proto.OPEN_IN.pack(flags, 0))
        assert error == 0, error
        return proto.OPEN_OUT.unpack_from(body)[0]

    def call(self, opcode: int, nodeid: int, body: bytes, uid: int = 0,
             reply: bool = True) -> tuple[int, bytes]:
        """Send one request; run what it hands to the loop until its reply is out.
        Returns (error, reply body): error 0 or minus an errno."""
        self.unique += 2
        request = proto.IN_HEADER.pack(proto.IN_HEADER.size + len(body), opcode,
                                       self.unique, nodeid, uid, uid, os.getpid(), 0, 0)
        data = bytearray(request + body)
        before = self.session.internal_errors
        self.session._dispatch(memoryview(data), len(data))
        deadline = time.monotonic() + 30
        self.theirs.setblocking(False)
        while True:
            while self.session._ready:
                self.session._ready.popleft()()
            try:
                answer = self.theirs.recv(MAX_WRITE + 4096)
                break
            except BlockingIOError:
                if not reply:
                    answer = None
                    break
                assert time.monotonic() < deadline, "no reply to opcode %d" % opcode
                time.sleep(0.001)
        assert self.session.internal_errors == before, "internal error in opcode %d" % opcode
        if answer is None:
            return 0, b""
        length, error, unique = proto.OUT_HEADER.unpack_from(answer)
        assert unique == self.unique and length == len(answer)
        assert -4095 <= error <= 0
        return error, answer[proto.OUT_HEADER.size:]

    def close(self) -> None:
        for pool in (self.session._pool, self.session._short_pool):
            pool.shutdown()
        self.session.close()
        self.ours.close()
        self.theirs.close()
        self.overlay.close()
        self.prepared.close()


@pytest.fixture(scope="module")
def served():
    base = tempfile.mkdtemp(prefix="rofs-decoding-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "rofs-decoding", base],
                   check=True)
    try:
        s = Served(base)
        try:
            yield s
        finally:
            s.close()
    finally:
        subprocess.run(["umount", "-l", base], check=True)
        os.rmdir(base)


def handle(s: Served, writing: bool = False):
    """A (node, handle) the kernel could send: a file open for reading, or for writing
    (the kernel sends write, fallocate and a copy's destination only on those)."""
    return st.sampled_from([(s.big, s.big_fh), (s.mine, s.mine_fh)] +
                           ([] if writing else [(s.file, s.file_fh)]))


EXAMPLES = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def requests(s: Served):
    """opcode -> strategy of (nodeid, body, uid)."""
    uid = st.sampled_from([0, 0, 1234, 65534])

    def on_handle(make, writing=False):
        return st.tuples(handle(s, writing), uid).flatmap(
            lambda hu: make(*hu[0]).map(lambda body: (hu[0][0], body, hu[1])))

    def on_node(nodes, body):
        return st.tuples(st.sampled_from(nodes), body, uid)

    nodes = [proto.ROOT_ID, s.file, s.big, s.dir, s.mine]
    return {
        "lseek": on_handle(lambda node, fh: st.builds(
            lambda off, whence: proto.LSEEK_IN.pack(fh, off, whence, 0), S64,
            st.sampled_from([3, 4]))),
        "read": on_handle(lambda node, fh: st.builds(
            lambda off, size: proto.READ_IN.pack(fh, off, size, 0, 0, 0, 0), S64, SIZE)),
        "write": on_handle(lambda node, fh: st.builds(
            lambda off, data, flags: proto.WRITE_IN.pack(fh, off, len(data), 0, 0, flags, 0)
            + data, S64, st.binary(max_size=64), U32), writing=True),
        "fallocate": on_handle(lambda node, fh: st.builds(
            lambda off, length, mode: proto.FALLOCATE_IN.pack(fh, off, length, mode, 0),
            S64, S64, U32), writing=True),
        "copy_file_range": on_handle(lambda node, fh: st.builds(
            lambda src, off_in, off_out, length, flags: proto.COPY_FILE_RANGE_IN.pack(
                src[1], off_in, s.mine, s.mine_fh, off_out, length, flags),
            handle(s), S64, S64, U64, U64)),
        "ioctl": on_handle(lambda node, fh: st.builds(
            lambda flags, cmd, arg, data, out: proto.IOCTL_IN.pack(
                fh, flags, cmd, arg, len(data), out) + data,
            U32, U32, U64, st.binary(max_size=32), st.integers(0, 16384))),
        "fsync": on_handle(lambda node, fh: st.builds(
            lambda flags: proto.FSYNC_IN.pack(fh, flags, 0), U32)),
        "getattr": on_handle(lambda node, fh: st.builds(
            lambda flags: proto.GETATTR_IN.pack(flags, 0, fh), U32)),
        "setattr": on_handle(lambda node, fh: st.builds(
            lambda valid, size, a, m, c, an, mn, cn, mode, u, g: proto.SETATTR_IN.pack(
                valid & ~proto.FATTR_FH | (proto.FATTR_FH if fh else 0), 0, fh, size, 0,
                a, m, c, an, mn, cn, mode, 0, u, g, 0),
            U32, S64, S64, S64, S64, NSEC, NSEC, NSEC, U32, U32, U32)),
        "setxattr": on_node(nodes, st.builds(
            lambda size, flags, name, value: proto.SETXATTR_IN.pack(size, flags, 0, 0) +
            name + b"\0" + value, st.integers(0, 65536), U32, XATTR,
            st.binary(max_size=64))),
        "getxattr": on_node(nodes, st.builds(
            lambda size, name: proto.GETXATTR_IN.pack(size, 0) + name + b"\0",
            st.integers(0, 65536), XATTR)),
        "listxattr": on_node(nodes, st.builds(
            lambda size: proto.GETXATTR_IN.pack(size, 0), st.integers(0, 65536))),
        "removexattr": on_node(nodes, XATTR.map(lambda name: name + b"\0")),
        "access": on_node(nodes, st.builds(lambda mask: proto.ACCESS_IN.pack(mask, 0), U32)),
        "open": on_node(nodes, st.builds(lambda flags: proto.OPEN_IN.pack(flags, 0), U32)),
        "mknod": on_node([proto.ROOT_ID, s.dir], st.builds(
            lambda mode, rdev, umask, name: proto.MKNOD_IN.pack(mode, rdev, umask, 0) + name
            + b"\0", U32, U32, U32, NAME)),
        "mkdir": on_node([proto.ROOT_ID, s.dir], st.builds(
            lambda mode, umask, name: proto.MKDIR_IN.pack(mode, umask) + name + b"\0",
            U32, U32, NAME)),
        "create": on_node([proto.ROOT_ID, s.dir], st.builds(
            lambda flags, mode, umask, name: proto.CREATE_IN.pack(flags, mode, umask, 0) +
            name + b"\0", U32, U32, U32, NAME)),
        "rename2": on_node([proto.ROOT_ID, s.dir], st.builds(
            lambda newdir, flags, old, new: proto.RENAME2_IN.pack(newdir, flags, 0) + old +
            b"\0" + new + b"\0", st.sampled_from([proto.ROOT_ID, s.dir]), U32,
            st.sampled_from([b"mine", b"passwd", b"nothing", b"d"]), NAME)),
        "readdir": st.tuples(st.just(proto.ROOT_ID), st.builds(
            lambda off, size: proto.READDIR_IN.pack(s.dir_fh, off, size, 0, 0, 0, 0), U64,
            SIZE), uid),
    }


OPCODES = {"lseek": proto.LSEEK, "read": proto.READ, "write": proto.WRITE,
           "fallocate": proto.FALLOCATE, "copy_file_range": proto.COPY_FILE_RANGE,
           "ioctl": proto.IOCTL, "fsync": proto.FSYNC, "getattr": proto.GETATTR,
           "setattr": proto.SETATTR, "setxattr": proto.SETXATTR,
           "getxattr": proto.GETXATTR, "listxattr": proto.LISTXATTR,
           "removexattr": proto.REMOVEXATTR, "access": proto.ACCESS, "open": proto.OPEN,
           "mknod": proto.MKNOD, "mkdir": proto.MKDIR, "create": proto.CREATE,
           "rename2": proto.RENAME2, "readdir": proto.READDIR}


@pytest.mark.parametrize("name", sorted(OPCODES))
def test_any_value_a_caller_can_send_is_answered_without_an_internal_error(served, name):
    strategy = requests(served)[name]

    @EXAMPLES
    @given(strategy)
    def check(request):
        nodeid, body, uid = request
        error, reply = served.call(OPCODES[name], nodeid, body, uid)
        if error == 0 and name in ("open", "create"):
            # Let go of what the kernel would release again.
            fh = proto.OPEN_OUT.unpack_from(reply, proto.ENTRY_OUT.size if name == "create"
                                            else 0)[0]
            if fh:
                served.call(proto.RELEASE, nodeid, proto.RELEASE_IN.pack(fh, 0, 0, 0))
        assert -error != errno.EIO or name in ("fsync",), "EIO from %s" % name

    check()


def test_lseek_before_the_start_is_enxio_as_on_ext4(served):
    """The offset is a loff_t: -1 arrives as -1, not 2**64 - 1 (which Python's lseek
    refused with OverflowError, answered EIO with a traceback)."""
    for whence in (3, 4):
        error, _ = served.call(proto.LSEEK, served.file, proto.LSEEK_IN.pack(
            served.file_fh, -1, whence, 0))
        assert -error == errno.ENXIO


def test_requests_of_different_uids_are_served_by_turns(tmp_path):
    """The loop reads the requests waiting (up to READ_AHEAD) and serves the uids by
    turns: root's request queued behind ten of a user's is answered first or second,
    not eleventh; each uid's in the order they came."""
    served = Served(str(tmp_path))
    try:
        def getattr_as(uid, unique):
            body = proto.GETATTR_IN.pack(0, 0, 0)
            served.theirs.send(proto.IN_HEADER.pack(proto.IN_HEADER.size + len(body),
                                                    proto.GETATTR, unique, proto.ROOT_ID,
                                                    uid, uid, 1, 0, 0) + body)

        for i in range(10):
            getattr_as(1000, 1000 + 2 * i)
        getattr_as(0, 9000)
        loop = threading.Thread(target=served.session.run, daemon=True)
        loop.start()
        served.theirs.setblocking(True)
        served.theirs.settimeout(30)
        order = [proto.OUT_HEADER.unpack_from(served.theirs.recv(65536))[2]
                 for _ in range(11)]
        served.session.stop()
        loop.join(timeout=30)
        assert order.index(9000) <= 1, order
        users = [u for u in order if u != 9000]
        assert users == sorted(users)
    finally:
        served.close()
