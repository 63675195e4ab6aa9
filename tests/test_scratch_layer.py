"""The scratch layer: scratch paths keep their changes apart from the state dir (in
STATE/.rofs/scratch, or a tmpfs given with --scratch), merged with persistent ones."""

import errno
import os
import stat
import subprocess
import threading
import time

import pytest
from helpers import ROFS, RofsProcess, read_text, write_text

pytestmark = pytest.mark.fuse


@pytest.fixture
def tmpfs(tmp_path):
    """A size-limited tmpfs for --scratch, always unmounted."""
    d = tmp_path / "scratch-tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "rofs-scratch", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)])


@pytest.fixture
def site(site):
    """conftest's layers, and a /var/cache with a file in the lower."""
    lower = site[0]
    (lower / "var" / "cache").mkdir(parents=True)
    write_text(lower / "var" / "cache" / "old", "old\n")
    return site


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, names in os.walk(root) for n in dirs + names)


def test_scratch_on_tmpfs_never_touches_the_state_dir(site, tmpfs):
    lower, mnt, state = site
    policy = mnt.parent / "policy"
    write_text(policy, "scratch %s/var\nscratch %s/d\n" % (mnt, mnt))
    args = ("--policy", str(policy), "--scratch", str(tmpfs))
    with RofsProcess(str(mnt), str(state), str(lower), args):
        write_text(mnt / "var" / "cache" / "new", "new\n")
        write_text(mnt / "var" / "cache" / "old", "changed\n")
        os.unlink(mnt / "d" / "file")
        os.mkdir(mnt / "d" / "newdir")
        write_text(mnt / "hosts", "persistent\n")
        upper = state / str(mnt).lstrip("/")
        assert files_under(upper) == ["hosts"]
        layer = tmpfs / "upper" / str(mnt).lstrip("/")
        assert files_under(layer) == ["d", "d/file", "d/newdir", "var", "var/cache",
                                      "var/cache/new", "var/cache/old"]
        assert sorted(os.listdir(mnt / "var" / "cache")) == ["new", "old"]
    with RofsProcess(str(mnt), str(state), str(lower), args):
        assert read_text(mnt / "var" / "cache" / "old") == "old\n"
        assert os.listdir(mnt / "var" / "cache") == ["old"]
        assert read_text(mnt / "d" / "file") == "in d\n"
        assert read_text(mnt / "hosts") == "persistent\n"
        assert files_under(tmpfs / "upper" / str(mnt).lstrip("/")) == []


def test_classes_mix_in_one_directory(site):
    """A persistent rule inside a scratch directory and the other way round: one
    listing merges both layers and the lower, each name from its own class's layer."""
    lower, mnt, state = site
    m = str(mnt)
    policy = mnt.parent / "policy"
    write_text(policy, "default scratch\npersistent %s/d/keep\npersistent %s/ssh\n"
          "scratch %s/ssh/tmp\n" % (m, m, m))
    args = ("--policy", str(policy))
    with RofsProcess(m, str(state), str(lower), args):
        write_text(mnt / "d" / "keep", "kept\n")
        write_text(mnt / "d" / "lost", "lost\n")
        write_text(mnt / "ssh" / "sshd_config", "Port 2222\n")
        os.mkdir(mnt / "ssh" / "tmp")
        write_text(mnt / "ssh" / "tmp" / "x", "x\n")
        assert sorted(os.listdir(mnt / "d")) == ["file", "keep", "lost", "sub"]
        assert sorted(os.listdir(mnt / "ssh")) == ["sshd_config", "tmp"]
        # A name cannot be linked across classes, nor a directory moved across them.
        with pytest.raises(OSError) as e:
            os.link(mnt / "d" / "keep", mnt / "d" / "keep-link")
        assert e.value.errno == errno.EXDEV
        with pytest.raises(OSError) as e:
            os.rename(mnt / "ssh" / "tmp", mnt / "ssh" / "kept-dir")
        assert e.value.errno == errno.EXDEV
        # A directory holding changes of the other class cannot move in one rename
        # either (they would stay behind at the old path).
        with pytest.raises(OSError) as e:
            os.rename(mnt / "d", mnt / "d-moved")
        assert e.value.errno == errno.EXDEV
        # mv falls back to copy and delete.
        subprocess.run(["mv", str(mnt / "ssh" / "tmp"), str(mnt / "ssh" / "kept-dir")],
                       check=True)
        assert read_text(mnt / "ssh" / "kept-dir" / "x") == "x\n"
        assert not (mnt / "ssh" / "tmp").exists()
        # A file moves across classes, and keeps its inode number.
        ino = os.stat(mnt / "d" / "lost").st_ino
        os.rename(mnt / "d" / "lost", mnt / "d" / "keep")
        assert read_text(mnt / "d" / "keep") == "lost\n"
        assert os.stat(mnt / "d" / "keep").st_ino == ino
        assert sorted(os.listdir(mnt / "d")) == ["file", "keep", "sub"]
    with RofsProcess(m, str(state), str(lower), args):
        assert read_text(mnt / "d" / "keep") == "lost\n"
        assert sorted(os.listdir(mnt / "d")) == ["file", "keep", "sub"]
        assert read_text(mnt / "ssh" / "sshd_config") == "Port 2222\n"
        assert sorted(os.listdir(mnt / "ssh")) == ["kept-dir", "sshd_config"]
        assert read_text(mnt / "ssh" / "kept-dir" / "x") == "x\n"


def test_persistent_file_moved_into_scratch_is_gone_after_remount(site):
    lower, mnt, state = site
    m = str(mnt)
    policy = mnt.parent / "policy"
    write_text(policy, "scratch %s/var\n" % m)
    args = ("--policy", str(policy))
    with RofsProcess(m, str(state), str(lower), args):
        os.rename(mnt / "passwd", mnt / "var" / "passwd")
        assert not (mnt / "passwd").exists()
        assert read_text(mnt / "var" / "passwd") == read_text(lower / "passwd")
        # The other names of a lower hard link are not affected.
        assert read_text(mnt / "passwd-hardlink") == read_text(lower / "passwd")
    with RofsProcess(m, str(state), str(lower), args):
        assert not (mnt / "passwd").exists()  # the removal was persistent
        assert not (mnt / "var" / "passwd").exists()  # the scratch copy is gone


def test_scratch_dir_made_when_missing(site, tmpfs):
    """--scratch /run/rofs-scratch after a boot: the tmpfs is there, the directory not
    yet; rofs makes it (mode 0700).  A missing parent is an error, nothing mounted."""
    lower, mnt, state = site
    policy = mnt.parent / "policy"
    write_text(policy, "default scratch\n")
    scratch = tmpfs / "rofs-scratch"
    with RofsProcess(str(mnt), str(state), str(lower),
                     ("--policy", str(policy), "--scratch", str(scratch))):
        write_text(mnt / "hosts", "scratch\n")
        assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700
        assert read_text(scratch / "upper" / str(mnt).lstrip("/") / "hosts") == "scratch\n"
    result = subprocess.run(ROFS + [str(mnt), "--state", str(state), "--lower", str(lower),
                                    "--scratch", str(tmpfs / "no" / "such")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "does not exist, nor does its parent" in result.stderr
    assert not os.path.ismount(mnt)


def test_big_file_moves_across_classes_off_the_event_loop(site):
    """A big scratch file renamed over a persistent one is copied by a worker thread:
    while its copy is in the state's work dir, the mount answers other requests.  Then
    the file is whole in the persistent layer, and survives a remount."""
    lower, mnt, state = site
    policy = mnt.parent / "policy"
    write_text(policy, "default scratch\npersistent %s/big-kept\n" % mnt)
    work = state / ".rofs" / "work" / str(mnt).lstrip("/")
    data = os.urandom(1 << 20) * 256  # 256 MiB
    with RofsProcess(str(mnt), str(state), str(lower), ("--policy", str(policy))):
        with open(mnt / "big-new", "wb") as f:
            f.write(data)
        # (looked up before: the kernel itself holds lookups in the directories of a
        # rename until it returns)
        os.stat(mnt / "d")
        mover = threading.Thread(target=os.rename, args=(mnt / "big-new", mnt / "big-kept"))
        mover.start()
        try:
            while mover.is_alive() and not os.listdir(work):
                time.sleep(0.001)
            copying = bool(os.listdir(work))
            answered = sorted(os.listdir(mnt / "d"))  # served during the copy
            still_copying = mover.is_alive() and bool(os.listdir(work))
        finally:
            mover.join()
        assert copying and still_copying, "the move held up the mount"
        assert answered == ["file", "sub"]
        assert not (mnt / "big-new").exists()
        assert os.listdir(work) == []
    with RofsProcess(str(mnt), str(state), str(lower), ("--policy", str(policy))):
        with open(mnt / "big-kept", "rb") as f:
            assert f.read() == data


def test_a_move_across_classes_that_cannot_remove_its_source_still_succeeds(site):
    """Past its commit point (the copy renamed over the destination) a rename does not
    fail: the kernel would be told "failed" for a change that is on disk.  The source
    name that cannot be removed stays (a copy), and the daemon says so."""
    lower, mnt, state = site
    m = str(mnt)
    policy = mnt.parent / "policy"
    write_text(policy, "scratch %s/var\n" % m)
    proc = RofsProcess(m, str(state), str(lower), ("--policy", str(policy)))
    sealed = None
    with proc:
        write_text(mnt / "var" / "cache" / "nshadow", "new shadow\n")
        (found,) = [d for d, _, names in os.walk(state) if "nshadow" in names]
        sealed = found
        subprocess.run(["chattr", "+i", sealed], check=True)
        try:
            os.rename(mnt / "var" / "cache" / "nshadow", mnt / "shadow")
            assert read_text(mnt / "shadow") == "new shadow\n"
            assert read_text(mnt / "var" / "cache" / "nshadow") == "new shadow\n"
        finally:
            subprocess.run(["chattr", "-i", sealed], check=True)
    assert "the change itself is done" in proc.output(), proc.output()
    with RofsProcess(m, str(state), str(lower), ("--policy", str(policy))):
        assert read_text(mnt / "shadow") == "new shadow\n"
