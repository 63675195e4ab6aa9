"""A full state filesystem: ENOSPC, nothing half-made in the merged view, reads go on,
and freeing space makes writes work again."""

import errno
import os
import subprocess

import pytest
from helpers import RofsProcess, manifest

pytestmark = pytest.mark.fuse

BIG = 12 << 20


@pytest.fixture
def small_state(tmp_path):
    """A state dir on an 8 MiB tmpfs (whiteouts and trusted xattrs work there), always
    unmounted."""
    d = tmp_path / "statefs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=400", "rofs-full",
                    str(d)], check=True)
    try:
        yield d / "state"
    finally:
        subprocess.run(["umount", "-l", str(d)])


def enospc(fn):
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.ENOSPC, e.value
    return e.value


def test_full_state_filesystem(tmp_path, small_state):
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    big = os.urandom(BIG)
    (lower / "big").write_bytes(big)
    (lower / "etc" / "shadow").write_text("root:old:1::::::\n")
    for i in range(20):
        (lower / "etc" / ("f%02d" % i)).write_text("lower %d\n" % i)
    before = manifest(str(lower))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with RofsProcess(str(mnt), str(small_state), str(lower)) as daemon:
        # A copy-up that does not fit: ENOSPC, and the lower content still shows whole.
        def append():
            with open(mnt / "big", "ab") as f:
                f.write(b"+")
        enospc(append)
        assert (mnt / "big").read_bytes() == big
        work = small_state / ".rofs" / "work" / str(mnt).lstrip("/")
        assert os.listdir(work) == []

        # Fill the rest with a new file: write stops with ENOSPC (what fitted is the
        # file's content, as on any filesystem).
        def fill():
            with open(mnt / "filler", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))
        enospc(fill)

        # passwd's cycle on a full disk fails before the rename: shadow is unchanged.
        def passwd():
            fd = os.open(mnt / "etc" / "nshadow", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o600)
            try:
                os.write(fd, b"root:new:2::::::\n" * 20000)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(mnt / "etc" / "nshadow", mnt / "etc" / "shadow")
        enospc(passwd)
        assert (mnt / "etc" / "shadow").read_text() == "root:old:1::::::\n"

        # Creates until the inodes run out too; the mount keeps serving reads.
        def create_many():
            for i in range(1000):
                (mnt / "etc" / ("new%04d" % i)).write_text("")
        enospc(create_many)
        assert (mnt / "etc" / "f07").read_text() == "lower 7\n"
        assert len(os.listdir(mnt / "etc")) > 20
        assert os.listdir(work) == []

        # Freeing space makes writes work again, copy-ups included.
        os.unlink(mnt / "filler")
        os.unlink(mnt / "etc" / "nshadow")
        for name in os.listdir(mnt / "etc"):
            if name.startswith("new"):
                os.unlink(mnt / "etc" / name)
        with open(mnt / "etc" / "f03", "a") as f:
            f.write("appended\n")
        assert (mnt / "etc" / "f03").read_text() == "lower 3\nappended\n"
        (mnt / "etc" / "nshadow").write_text("root:new:2::::::\n")
        os.rename(mnt / "etc" / "nshadow", mnt / "etc" / "shadow")
        assert (mnt / "etc" / "shadow").read_text() == "root:new:2::::::\n"
    assert daemon.proc.returncode == 0
    assert not daemon.internal_errors(), daemon.output()
    assert manifest(str(lower)) == before
    with RofsProcess(str(mnt), str(small_state), str(lower)):
        assert (mnt / "etc" / "shadow").read_text() == "root:new:2::::::\n"
        assert (mnt / "big").read_bytes() == big
