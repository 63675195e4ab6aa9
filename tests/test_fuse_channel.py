"""rofs.fuse on its own: a two-file filesystem served through a real mount, without any
overlay.  The loop answers while a handler's slow work runs on a worker thread; a bug
in a handler is EIO and the mount stays; what a filesystem does not implement is
ENOSYS; an unmount ends the loop."""

import errno
import os
import stat
import subprocess
import threading

import pytest

from rofs.fuse import FuseError, Operations, Session, offload, proto
from rofs.fuse import mount as fuse_mount

pytestmark = pytest.mark.fuse

DATA = b"hello\n"


def attr(ino: int) -> tuple:
    if ino == proto.ROOT_ID:
        return (1, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
    return (ino, len(DATA), 1, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o644, 1, 0, 0, 0, 4096, 0)


class Hello(Operations):
    """/hello (2) and /slow (3), whose lookup waits for the test's go-ahead on a worker
    thread; looking up /bug raises a bug."""

    def __init__(self) -> None:
        self.release_slow = threading.Event()
        self.slow_started = threading.Event()

    def lookup(self, req, parent, name):
        if name == b"hello":
            return proto.ENTRY_OUT.pack(2, 0, 0, 0, 0, 0, *attr(2))
        if name == b"slow":
            return self._slow()
        if name == b"bug":
            raise KeyError("a bug")
        raise FuseError(errno.ENOENT)

    async def _slow(self):
        self.slow_started.set()
        await offload(self.release_slow.wait, 30)
        return proto.ENTRY_OUT.pack(3, 0, 0, 0, 0, 0, *attr(3))

    def getattr(self, req, ino, fh):
        return proto.ATTR_OUT.pack(0, 0, 0, *attr(ino))

    def open(self, req, ino, flags):
        return proto.OPEN_OUT.pack(ino, 0, 0)

    def read(self, req, ino, fh, offset, size):
        return DATA[offset:offset + size]

    def release(self, req, ino, fh):
        return None


@pytest.fixture
def served(tmp_path):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    fd = fuse_mount.mount(mnt, ["fsname=hello", "subtype=hello", "default_permissions"])
    ops = Hello()
    # PARALLEL_DIROPS: else the kernel holds a lookup in a directory while another runs.
    session = Session(fd, ops, want=proto.ASYNC_READ | proto.PARALLEL_DIROPS)
    thread = threading.Thread(target=session.run, daemon=True)
    thread.start()
    try:
        yield mnt, ops, session, thread
    finally:
        ops.release_slow.set()
        if fuse_mount.still_mounted(fd):
            fuse_mount.unmount(mnt, fd)
        thread.join(30)
        os.close(fd)
        session.close()


def test_the_loop_answers_while_slow_work_runs(served):
    mnt, ops, session, thread = served
    results = {}

    def slow_lookup():
        results["slow"] = os.stat(os.path.join(mnt, "slow")).st_ino

    waiter = threading.Thread(target=slow_lookup)
    waiter.start()
    assert ops.slow_started.wait(10)
    # The slow lookup is parked on a worker thread; the loop serves others meanwhile.
    with open(os.path.join(mnt, "hello"), "rb") as f:
        assert f.read() == DATA
    assert waiter.is_alive() and "slow" not in results
    ops.release_slow.set()
    waiter.join(10)
    assert results["slow"] == 3


def test_bugs_are_eio_unimplemented_is_enosys_and_unmount_ends_the_loop(served):
    mnt, ops, session, thread = served
    for _ in range(2):
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(mnt, "bug"))
        assert e.value.errno == errno.EIO
    assert session.internal_errors == 2
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(mnt, "new"))
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mnt, "missing"))
    assert os.stat(os.path.join(mnt, "hello")).st_size == len(DATA)
    fuse_mount.unmount(mnt)
    thread.join(10)
    assert not thread.is_alive()


def test_an_unknown_mount_option_is_refused_before_mounting(tmp_path):
    with pytest.raises(fuse_mount.MountError) as e:
        fuse_mount.mount(str(tmp_path), ["no_such_option_xyz"])
    assert "no_such_option_xyz" in str(e.value)


class Prompt(Hello):
    """Hello, but /slow answers at once."""

    def lookup(self, req, parent, name):
        if name == b"slow":
            return proto.ENTRY_OUT.pack(3, 0, 0, 0, 0, 0, *attr(3))
        return super().lookup(req, parent, name)


def test_a_session_taking_over_answers_what_the_last_one_left_unanswered(served):
    """A request a server had read and never answered (it died, or stopped) left its
    caller waiting for good.  A session taking over the connection (no INIT: it is
    `resumed` with what the first one negotiated) has the kernel send such requests
    again (`resend`, FUSE_NOTIFY_RESEND) and answers them; new requests come to it."""
    mnt, ops, session, thread = served
    results = {}

    def slow_lookup():
        results["slow"] = os.stat(os.path.join(mnt, "slow")).st_ino

    waiter = threading.Thread(target=slow_lookup, daemon=True)
    waiter.start()
    assert ops.slow_started.wait(10)  # read by the first session, its answer held
    session.stop()  # which serves no more (its loop waits for its workers)
    waiter.join(0.5)
    assert waiter.is_alive() and "slow" not in results
    takeover = Session(session.fd, Prompt(), want=session.want,
                       resumed=session.negotiated)
    served_by_takeover = threading.Thread(target=takeover.run, daemon=True)
    served_by_takeover.start()
    try:
        assert session.kernel_flags & proto.HAS_RESEND, "the kernel cannot resend (< 6.9)"
        assert takeover.resend() == 0
        waiter.join(10)
        assert results.get("slow") == 3
        with open(os.path.join(mnt, "hello"), "rb") as f:
            assert f.read() == DATA
    finally:
        ops.release_slow.set()
        if waiter.is_alive():  # never answered: umount -f aborts the connection, or
            # the waiting thread keeps this process (and the connection) alive for good
            subprocess.run(["umount", "-f", mnt], capture_output=True)
            waiter.join(10)
            subprocess.run(["umount", "-l", mnt], capture_output=True)  # (now dead)
        fuse_mount.unmount(mnt, session.fd)
        served_by_takeover.join(30)
        takeover.close()
