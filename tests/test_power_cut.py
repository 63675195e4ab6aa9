"""Power cuts: the state dir on a block device whose every write and flush is recorded,
replayed to flush points and to random points between them, then recovered and checked.

As xfstests does with dm-log-writes (this kernel has no device-mapper): the state dir
is on ext4, xfs or btrfs in a loop device whose backing file is served by
tests/blocklog.py, which
logs each block write and flush.  tests/crashload.py runs a fixed number of operations
through a rofs mount over it (passwd cycles, sed -i, copy-ups, renames, a directory
moved back and forth, whiteouts, hard links), journaling each with the checksums of
what it touches, and marks each one in the block log when it has returned.

Then for each replay point: the image as the device could hold it after a power cut
there (every write before the last flush, and a random half of the 4 KiB blocks
written after it), mounted (the filesystem recovers its journal or log), `rofs check`
(only leftovers
of interrupted operations, which --repair removes), a rofs mount on it, and the
journal's rule (docs/reliability.md): every operation marked before the point shows
its result, the one in flight its start, its result or the state in between, whole;
no work file is visible.  The lower layer stays byte-identical.

ROFS_POWER_CUT_POINTS (CI: 24) replay points, ROFS_POWER_CUT_OPS (CI: 80) operations,
ROFS_POWER_CUT_SEED; docs/reliability.md records the soak.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
from blocklog import FLUSH, MARK, WRITE, read_log
from crashload import build, state
from helpers import RofsProcess, manifest, run_rofs

pytestmark = pytest.mark.fuse

POINTS = int(os.environ.get("ROFS_POWER_CUT_POINTS", "24"))
# Filesystems to run on (each is skipped where mkfs or the kernel lacks it).
FILESYSTEMS = os.environ.get("ROFS_POWER_CUT_FS", "ext4,xfs,btrfs").split(",")
# 0: replay points at flushes only (no unflushed writes kept), to tell the model of a
# disk's cache from the filesystem in a failure.
BETWEEN = os.environ.get("ROFS_POWER_CUT_BETWEEN", "1") == "1"
OPS = int(os.environ.get("ROFS_POWER_CUT_OPS", "80"))
SEED = int(os.environ.get("ROFS_POWER_CUT_SEED", "1"))
REPORT = os.environ.get("ROFS_POWER_CUT_REPORT")
HERE = os.path.dirname(__file__)
BLOCK = 4096
# mkfs for each filesystem, and its image size (mkfs.xfs wants 300 MiB at least).
# Everything is initialized by mkfs: no lazy init writing behind the workload's back.
MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-J", "size=4",
              "-E", "lazy_itable_init=0,lazy_journal_init=0"], 96 << 20),
    "xfs": (["mkfs.xfs", "-q", "-f"], 300 << 20),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], 128 << 20),
}


def run(*cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120,
                          **kwargs)


class Recorder:
    """tests/blocklog.py serving IMAGE at `at`, and a loop device on it."""

    def __init__(self, at, image, log):
        self.at, self.image, self.log = at, image, log
        self.proc = None
        self.loop = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "blocklog.py"),
                                      self.at, self.image, self.log],
                                     env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(self.at, "disk")):
            assert self.proc.poll() is None, "blocklog.py exited"
            assert time.monotonic() < deadline, "blocklog.py did not mount"
            time.sleep(0.02)
        self.loop = run("losetup", "--find", "--show",
                        os.path.join(self.at, "disk")).stdout.strip()
        return self

    def mark(self, label: bytes) -> None:
        fd = os.open(os.path.join(self.at, "marks"), os.O_WRONLY)
        try:
            os.write(fd, label)
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        try:
            if self.loop is not None:
                subprocess.run(["losetup", "-d", self.loop], timeout=60)
        finally:
            for _ in range(50):  # the loop device lets go of the file asynchronously
                if subprocess.run(["umount", self.at], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            self.proc.wait(timeout=30)


class Mounted:
    """An ext4 image mounted (loop) at `at` for the block of a `with`."""

    def __init__(self, source, at, *options):
        self.source, self.at, self.options = source, at, options

    def __enter__(self):
        run("mount", *self.options, self.source, self.at)
        return self

    def __exit__(self, *exc):
        run("umount", self.at)


def expected_at(entries, marked):
    """The states the journal requires once the operations in `marked` are durable:
    {path: state}, and the first operation not marked (in flight), if any."""
    expected = {}
    for entry in entries:
        if entry["id"] not in marked:
            return expected, entry
        expected.update(zip(entry["paths"], entry["new"], strict=True))
    return expected, None


def replay_points(records, start, count, rng):
    """(index, last flush) pairs: flush points and points between flushes, in order."""
    flushes = [i for i in range(start, len(records)) if records[i][0] == FLUSH]
    if not BETWEEN:
        return sorted((f, f) for f in rng.sample(flushes, min(len(flushes), count)))
    points = [(f, f) for f in rng.sample(flushes, min(len(flushes), count // 2))]
    gaps = [(a, b) for a, b in zip(flushes, flushes[1:], strict=False) if b - a > 1]
    for a, b in rng.sample(gaps, min(len(gaps), count - len(points))):
        points.append((rng.randrange(a + 1, b), a))
    return sorted(points)


def apply(image_fd, records, lo, hi, rng=None):
    """Write records[lo:hi] to the image: all of them, or (rng) a random half of their
    4 KiB blocks, as a disk cache might have kept them at a power cut."""
    for kind, offset, data in records[lo:hi]:
        if kind != WRITE:
            continue
        if rng is None:
            os.pwrite(image_fd, data, offset)
            continue
        for at in range(0, len(data), BLOCK):
            if rng.random() < 0.5:
                os.pwrite(image_fd, data[at:at + BLOCK], offset + at)


def content(mnt, paths):
    """What the paths hold (for a failure's message)."""
    found = {}
    for path in paths:
        try:
            with open(os.path.join(mnt, path), "rb") as f:
                found[path] = f.read(200)
        except OSError as e:
            found[path] = e
    return found


def no_work_files(mnt):
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            assert not name.startswith("#rofs"), os.path.join(dirpath, name)


def copy_image(src, dst):
    """A copy of a sparse image, in milliseconds (shutil copies every zero)."""
    run("cp", "--sparse=always", src, dst)


def supported(fs):
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fs for line in f if line.strip())


@pytest.mark.parametrize("fs_type", [fs for fs in sorted(MKFS) if fs in FILESYSTEMS])
def test_power_cut_replay(tmp_path, fs_type):
    mkfs, size = MKFS[fs_type]
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs loop devices")
    if shutil.which(mkfs[0]) is None or not supported(fs_type):
        pytest.skip("needs %s and %s in the kernel (setup.sh --test installs it)"
                    % (mkfs[0], fs_type))
    lower, mnt, fs, blk = (str(tmp_path / n) for n in ("lower", "mnt", "fs", "blk"))
    for d in (mnt, fs, blk):
        os.makedirs(d)
    build(lower)
    before = manifest(lower)
    state_dir = os.path.join(fs, "state")
    base, disk, log = (str(tmp_path / n) for n in ("base.img", "disk.img", "blocks.log"))
    journal = str(tmp_path / "journal")
    with open(base, "wb") as f:
        f.truncate(size)
    run(*mkfs, base)
    copy_image(base, disk)

    # Record: the workload through rofs, with the state on the logged device.
    with Recorder(blk, disk, log) as recorder, Mounted(recorder.loop, fs):
        with RofsProcess(mnt, state_dir, lower) as daemon:
            recorder.mark(b"start")
            load = subprocess.run([sys.executable, os.path.join(HERE, "crashload.py"), mnt,
                                   journal, str(SEED), os.path.join(blk, "marks"),
                                   str(OPS)], timeout=600)
            assert load.returncode == 0
        assert not daemon.internal_errors()

    records = read_log(log)
    mark_at = {data.decode(): i for i, (kind, _, data) in enumerate(records)
               if kind == MARK}
    with open(journal) as f:
        entries = [e for e in map(json.loads, f) if e["phase"] == "begin"]
    # (a rename and the create after it run as a pair: one more operation at most)
    assert len(entries) in (OPS, OPS + 1) and all(e["id"] in mark_at for e in entries)
    rng = random.Random(SEED)
    points = replay_points(records, mark_at["start"], POINTS, rng)
    assert len(points) >= min(POINTS, 8), "too few flushes recorded: %d" % len(points)

    # Replay: the image at each point, recovered, checked, mounted, held to the journal.
    work = str(tmp_path / "work.img")
    copy_image(base, work)
    applied = 0
    repaired = in_flight = durable = 0
    work_fd = os.open(work, os.O_RDWR)
    try:
        for point, flush in points:
            apply(work_fd, records, applied, flush + 1)
            applied = flush + 1
            # A new file for each point: `mount -o loop` reuses a loop device still
            # attached to the same file, whose block cache then shows the previous
            # point's filesystem (it made acknowledged changes look lost).
            cut = str(tmp_path / ("cut-%d.img" % point))
            copy_image(work, cut)
            cut_fd = os.open(cut, os.O_RDWR)
            try:
                apply(cut_fd, records, applied, point + 1, rng)
            finally:
                os.close(cut_fd)
            marked = {label for label, i in mark_at.items() if i < point}
            expected, flying = expected_at(entries, marked)
            durable += len(marked & {e["id"] for e in entries})
            # (nouuid: xfs refuses a second filesystem with one UUID while the first is
            # still known to it)
            with Mounted(cut, fs, "-o", "loop,nouuid" if fs_type == "xfs" else "loop"):
                found = run_rofs("check", state_dir, code=None)
                if found.returncode:
                    assert all("left over by an interrupted operation" in line
                               for line in found.stdout.splitlines()), (point, found.stdout)
                    run_rofs("check", "--repair", state_dir)
                    repaired += 1
                assert run_rofs("check", state_dir, code=None).returncode == 0, point
                with RofsProcess(mnt, state_dir, lower) as daemon:
                    if flying is not None:
                        actual = [state(os.path.join(mnt, p)) for p in flying["paths"]]
                        assert actual in (flying["old"], flying["new"],
                                          flying.get("between")), (
                            point, flush, flying, actual, content(mnt, flying["paths"]))
                        expected.update(zip(flying["paths"], actual, strict=True))
                        in_flight += 1
                    for path, expect in expected.items():
                        assert state(os.path.join(mnt, path)) == expect, (
                            "replay point %d (flush %d): %s is not as the operations "
                            "acknowledged before it left it" % (point, flush, path))
                    no_work_files(mnt)
                assert not daemon.internal_errors()
            os.unlink(cut)
    finally:
        os.close(work_fd)
    assert manifest(lower) == before, "the lower layer changed"
    if REPORT:
        with open(REPORT, "a") as f:
            f.write("%s points %d operations %d records %d durable-operations-checked %d "
                    "in-flight-checked %d repaired %d\n" % (
                        fs_type, len(points), OPS, len(records), durable, in_flight,
                        repaired))
