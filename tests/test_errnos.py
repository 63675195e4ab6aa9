"""What a caller's arguments get back through rofs, against ext4 (the oracle): the same
random data-path calls (tests/errno_fuzz.py: lseek, pread, pwrite, fallocate,
copy_file_range, setxattr, getxattr, listxattr, ioctl, with offsets, lengths, modes,
flags and buffer sizes at the edges of their ranges) on an ext4 directory and through
rofs whose layers are on the same ext4 must answer the same, call by call."""

import difflib
import os
import subprocess
import sys

import pytest
from helpers import RofsProcess

pytestmark = pytest.mark.fuse

FUZZ = os.path.join(os.path.dirname(__file__), "errno_fuzz.py")
SEEDS = (1, 2, 3)
CALLS = 600


@pytest.fixture
def ext4(tmp_path):
    """Two ext4 filesystems alike (loop devices): the native one and rofs's; or a skip
    where there are no loop devices."""
    mounts = []
    try:
        for name in ("native", "rofs"):
            image, at = tmp_path / (name + ".img"), tmp_path / name
            at.mkdir()
            with open(image, "wb") as f:
                f.truncate(256 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
            mounted = subprocess.run(["mount", "-o", "loop", str(image), str(at)],
                                     capture_output=True, text=True)
            if mounted.returncode:
                pytest.skip("needs loop devices: %s" % mounted.stderr.strip())
            mounts.append(at)
        yield mounts
    finally:
        for at in mounts:
            subprocess.run(["umount", "-l", str(at)], check=True)


def fuzz(directory, seed):
    out = subprocess.run([sys.executable, FUZZ, str(directory), str(seed), str(CALLS)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    subprocess.run(["chattr", "-i", "-a", os.path.join(directory, "fuzzed")],
                   capture_output=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("options", [(), ("--no-open",)], ids=["default", "no-open"])
def test_data_path_calls_answer_as_ext4_does(ext4, options):
    theirs_fs, ours_fs = ext4
    lower, mnt = ours_fs / "lower", ours_fs / "mnt"
    lower.mkdir()
    mnt.mkdir()
    for seed in SEEDS:
        native = theirs_fs / str(seed)
        native.mkdir()
        theirs = fuzz(native, seed)
        # No write log: it would take space on the filesystem the calls fill.
        with RofsProcess(str(mnt), str(ours_fs / ("state%d" % seed)), str(lower),
                         options + ("--no-log",)) as proc:
            ours = fuzz(mnt, seed)
        assert not proc.internal_errors(), proc.output()
        assert ours == theirs, "seed %d:\n%s" % (seed, "\n".join(
            list(difflib.unified_diff(theirs, ours, "ext4", "rofs", lineterm=""))[:40]))
