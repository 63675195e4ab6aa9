"""Every system call of a change fails in turn (rofs/crash.py, ROFS_FAIL_AT): the caller
gets an error or the change, and the view is the old one or the new one, whole; what
the live mount showed is what a new mount shows (memory and disk agreed, no stale
kernel entry); `rofs check` finds nothing but a work file whose removal was the call
that failed, and nothing after --repair.

For each change below and each call rofs/crash.py can fail (open, fsync, setxattr,
renameat2, ...), the test fails its 1st, 2nd, ... call during the change, on a fresh
target each time, until the change makes no more such calls.  open fails with EMFILE,
fsync and reads with EIO, listxattr with EPERM, everything else with ENOSPC.
"""

import errno
import hashlib
import os
import signal
import subprocess
import time

import pytest
from crashload import state
from helpers import ROFS, RofsProcess, manifest

pytestmark = pytest.mark.fuse

CODES = {"open": "EMFILE", "fsync": "EIO", "fdatasync": "EIO", "stat": "EIO", "fstat": "EIO",
         "getxattr": "EIO", "listxattr": "EPERM", "readlink": "EIO", "scandir": "EIO",
         "lseek": "EIO"}
TARGETS = 120  # lower files per change: more than the calls any of them makes


def write(path, data, mode="w"):
    """One open and one write(2) (a buffered file would write again when collected)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


class Between(Exception):
    """The second call of a two-call change failed: the first one's effect stands."""


def truncate_and_write(path):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # fails: the file must be untouched
    try:
        os.write(fd, b"new")
    except OSError as e:  # the open emptied the file: that stands
        raise Between(e) from e
    finally:
        os.close(fd)


def names(s, kind, i):
    return [os.path.join(s, "%s%d%s" % (kind, i, x)) for x in ("-a", "-b", "-c")]


def linked(mnt, kind, i):
    """Content of three hard-linked names, and whether they are still one inode."""
    paths = names(mnt, kind, i)
    sts = [os.stat(p) for p in paths]
    return tuple(state(p) for p in paths), len({st.st_ino for st in sts}) == 1


def with_xattr(path):
    """Content and the user.note xattr: a copy-up copies every xattr or fails."""
    def look(mnt, i):
        full = os.path.join(mnt, path % i)
        try:
            note = os.getxattr(full, "user.note")
        except OSError:
            note = None
        return state(full), note
    return look


def owner_mode(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode


def listing(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return None


def one(path):
    return lambda mnt, i: state(os.path.join(mnt, path % i))


def digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def lower_of(kind, i):
    return "lower %s%d\n" % (kind, i)


def linked_of(kind, i):
    return "linked %s%d\n" % (kind, i)


# Each change: prepare(mnt, i) (not failed), change(mnt, i) (failed), look(mnt, i), and
# what look must give before and after the change; and (REMOUNTED) what a new mount
# shows for what the live one showed, where the scratch layer's emptying changes it.
CHANGES = {
    "copy-up": (None, lambda m, i: write(os.path.join(m, "cu%d" % i), "+", "a"),
                with_xattr("cu%d"), lambda i: (digest(lower_of("cu", i)), b"kept"),
                lambda i: (digest(lower_of("cu", i) + "+"), b"kept")),
    "o-trunc": (None, lambda m, i: truncate_and_write(os.path.join(m, "tr%d" % i)), one("tr%d"),
                lambda i: digest(lower_of("tr", i)), lambda i: digest("new")),
    "whiteout": (None, lambda m, i: os.unlink(os.path.join(m, "wl%d" % i)), one("wl%d"),
                 lambda i: digest(lower_of("wl", i)), lambda i: None),
    "whiteout-over-copy": (lambda m, i: write(os.path.join(m, "wu%d" % i), "+", "a"),
                           lambda m, i: os.unlink(os.path.join(m, "wu%d" % i)), one("wu%d"),
                           lambda i: digest(lower_of("wu", i) + "+"), lambda i: None),
    "rename-across": (
        lambda m, i: write(os.path.join(m, "scratch", "n%d" % i), "new %d\n" % i),
        lambda m, i: os.rename(os.path.join(m, "scratch", "n%d" % i),
                               os.path.join(m, "cc%d" % i)),
        lambda m, i: (state(os.path.join(m, "cc%d" % i)),
                      state(os.path.join(m, "scratch", "n%d" % i))),
        lambda i: (digest(lower_of("cc", i)), digest("new %d\n" % i)),
        lambda i: (digest("new %d\n" % i), None)),
    # sed -i's way: a new file renamed over a lower one (which gives it that file's
    # origin, for image updates: bookkeeping that must not fail the rename).
    "rename-over-lower": (
        lambda m, i: write(os.path.join(m, "rl%d.new" % i), "new %d\n" % i),
        lambda m, i: os.rename(os.path.join(m, "rl%d.new" % i), os.path.join(m, "rl%d" % i)),
        lambda m, i: (state(os.path.join(m, "rl%d" % i)),
                      state(os.path.join(m, "rl%d.new" % i))),
        lambda i: (digest(lower_of("rl", i)), digest("new %d\n" % i)),
        lambda i: (digest("new %d\n" % i), None)),
    "hard-link-copy-up": (
        lambda m, i: [os.stat(p) for p in names(m, "hl", i)],
        lambda m, i: write(names(m, "hl", i)[0], "+", "a"),
        lambda m, i: linked(m, "hl", i),
        lambda i: ((digest(linked_of("hl", i)),) * 3, True),
        lambda i: ((digest(linked_of("hl", i) + "+"),) * 3, True)),
    # chown of a setuid file: the kernel sends the new owner and the mode without the
    # setuid bit in one SETATTR; both or neither.
    "chown-setuid": (None, lambda m, i: os.chown(os.path.join(m, "su%d" % i), 1, 1),
                     lambda m, i: owner_mode(os.path.join(m, "su%d" % i)),
                     lambda i: (0, 0, 0o104755), lambda i: (1, 1, 0o100755)),
    # rmdir of a directory emptied of a persistent and a scratch entry: the scratch
    # layer's mirror holds the second whiteout, and must not go before the removal
    # (which can fail) is done.
    "rmdir-with-mirror": (
        lambda m, i: [os.unlink(os.path.join(m, "pd%d" % i, n)) for n in ("keep", "tmp")],
        lambda m, i: os.rmdir(os.path.join(m, "pd%d" % i)),
        lambda m, i: listing(os.path.join(m, "pd%d" % i)),
        lambda i: [], lambda i: None),
    # A name of a copied-up hard link met for the first time: linked to the copy.  If
    # that fails, the lookup fails (the next one tries again): it must never show the
    # lower file's old content under its own inode number.
    "index-materialize": (
        lambda m, i: write(names(m, "hm", i)[0], "+", "a"),
        lambda m, i: os.stat(names(m, "hm", i)[1]),
        lambda m, i: linked(m, "hm", i),
        lambda i: ((digest(linked_of("hm", i) + "+"),) * 3, True),
        lambda i: ((digest(linked_of("hm", i) + "+"),) * 3, True)),
}


REMOUNTED = {
    # A source left in the scratch layer is gone.
    "rename-across": lambda live: (live[0], None),
    # The scratch deletion is gone: the directory, if it stayed, shows that entry again.
    "rmdir-with-mirror": lambda live: ["tmp"] if live == [] else live,
}


def build(lower):
    os.makedirs(lower)
    for i in range(TARGETS):
        for kind in ("cu", "tr", "wl", "wu", "cc", "rl"):
            write(os.path.join(lower, "%s%d" % (kind, i)), lower_of(kind, i))
        os.setxattr(os.path.join(lower, "cu%d" % i), "user.note", b"kept")
        write(os.path.join(lower, "su%d" % i), "setuid\n")
        os.chmod(os.path.join(lower, "su%d" % i), 0o4755)
        os.makedirs(os.path.join(lower, "pd%d" % i))
        for name in ("keep", "tmp"):
            write(os.path.join(lower, "pd%d" % i, name), "lower\n")
        for kind in ("hl", "hm"):
            a, b, c = names(lower, kind, i)
            write(a, linked_of(kind, i))
            os.link(a, b)
            os.link(a, c)


def arm(daemon, spec_file, call, n, code=None):
    """Have the daemon fail the n-th call of `call` from now on (n = 0: none)."""
    with open(spec_file, "w") as f:
        f.write("%s %d %s\n" % (call, n, code or CODES.get(call, "ENOSPC")))
    before = daemon.output().count("armed:")
    os.kill(daemon.server(), signal.SIGUSR2)  # the server (the keeper does not serve)
    deadline = time.monotonic() + 10
    while daemon.output().count("armed:") == before:
        assert time.monotonic() < deadline, "the daemon did not arm"
        time.sleep(0.005)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_call_failing(tmp_path, change):
    from rofs.crash import FAILABLE
    prepare, act, look, old_of, new_of = CHANGES[change]
    lower, st, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    build(lower)
    os.makedirs(mnt)
    before = manifest(lower)
    policy, spec = str(tmp_path / "policy"), str(tmp_path / "fail-at")
    real = os.path.realpath(mnt)
    write(policy, "scratch %s/scratch\n" % real + "".join(
        "scratch %s/pd%d/tmp\n" % (real, i) for i in range(TARGETS)))
    args = ("--policy", policy)
    seen = {}  # target -> what the live mount showed after the change
    what = {}  # target -> the call failed, and how
    fired = {}  # call -> how many of its calls were failed
    i = 0
    with RofsProcess(mnt, st, lower, args, env={"ROFS_FAIL_AT": spec}) as daemon:
        os.mkdir(os.path.join(mnt, "scratch"))
        for call in FAILABLE:
            n = 1
            while True:
                assert i < TARGETS, "more calls than targets: raise TARGETS"
                if prepare is not None:
                    prepare(mnt, i)
                old, new = old_of(i), new_of(i)
                injected = daemon.output().count("injected:")
                arm(daemon, spec, call, n)
                try:
                    act(mnt, i)
                    failed = None
                except OSError as e:
                    failed = e
                except Between:  # (o-trunc: the write after the open failed)
                    failed = None
                    new = digest("")
                arm(daemon, spec, "open", 0)  # disarmed: a 0th call never comes
                hit = daemon.output().count("injected:") > injected
                seen[i] = now = look(mnt, i)
                what[i] = (call, n, failed, now)
                i += 1
                if not hit:
                    assert failed is None and now == new, (call, n, failed, now, new)
                    break
                fired[call] = n
                # The caller got the error and the view is unchanged, or the change
                # is whole: done, or failing only its fsync after the commit (EIO).
                if failed is None and change == "rename-across" and now == (new[0], old[1]):
                    pass  # the source could not be removed after the commit: it stays,
                    # a copy in the scratch layer that the next mount empties (logged)
                elif failed is None:
                    assert now == new, (change, call, n, now, new)
                else:
                    assert now == old or (failed.errno == errno.EIO and now == new), (
                        change, call, n, i - 1, failed, now, old, new)
                n += 1
        for j, expected in seen.items():
            assert look(mnt, j) == expected, (change, j)
    assert not daemon.internal_errors(), daemon.internal_errors()
    found = subprocess.run(ROFS + ["check", st], capture_output=True, text=True, timeout=60)
    if found.returncode:
        # Only a work file whose removal was the call that failed (logged; the next
        # mount removes it too).
        assert all("left over by an interrupted operation" in line
                   for line in found.stdout.splitlines()), found.stdout
        subprocess.run(ROFS + ["check", "--repair", st], capture_output=True, timeout=60)
        found = subprocess.run(ROFS + ["check", st], capture_output=True, timeout=60)
        assert found.returncode == 0, found.stdout
    with RofsProcess(mnt, st, lower, args):
        for j, expected in seen.items():
            expected = REMOUNTED.get(change, lambda x: x)(expected)
            assert look(mnt, j) == expected, (change, what[j], "after a remount")
    assert manifest(lower) == before
    assert fired, "no call was ever failed: the injection does not work"


def test_unreadable_marker_is_an_error(tmp_path):
    """An opaque directory whose marker cannot be read (EPERM, ENOTSUP) is an error
    (EIO), never a directory that shows the lower content it hides."""
    lower, st, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    count = 12
    for i in range(count):
        os.makedirs(os.path.join(lower, "op%d" % i))
        write(os.path.join(lower, "op%d" % i, "hidden"), "lower\n")
    os.makedirs(mnt)
    spec = str(tmp_path / "fail-at")
    with RofsProcess(mnt, st, lower):
        for i in range(count):  # replaced by an empty directory: opaque
            os.unlink(os.path.join(mnt, "op%d" % i, "hidden"))
            os.rmdir(os.path.join(mnt, "op%d" % i))
            os.mkdir(os.path.join(mnt, "op%d" % i))
    errors = 0
    with RofsProcess(mnt, st, lower, env={"ROFS_FAIL_AT": spec}) as daemon:
        for i in range(count):  # each directory looked up for the first time
            arm(daemon, spec, "getxattr", i // 2 + 1, ("EPERM", "ENOTSUP")[i % 2])
            try:
                listed = os.listdir(os.path.join(mnt, "op%d" % i))
            except OSError as e:
                assert e.errno == errno.EIO, e
                errors += 1
            else:
                assert listed == [], "an opaque directory shows what it hides"
        arm(daemon, spec, "open", 0)
        for i in range(count):
            assert os.listdir(os.path.join(mnt, "op%d" % i)) == []
    assert errors, "no marker read was failed"
    assert "cannot read trusted.overlay.opaque" in daemon.output()


def test_internal_errno_is_logged(tmp_path):
    """EBADF or ELOOP from rofs's own calls is a bug: logged as an internal error."""
    lower, st, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    os.makedirs(lower)
    os.makedirs(mnt)
    write(os.path.join(lower, "file"), "data\n")
    spec = str(tmp_path / "fail-at")
    with RofsProcess(mnt, st, lower, env={"ROFS_FAIL_AT": spec}) as daemon:
        arm(daemon, spec, "open", 1, "EBADF")
        with pytest.raises(OSError) as failed:
            write(os.path.join(mnt, "file"), "x", "a")
        assert failed.value.errno == errno.EBADF
    assert any("internal error" in line for line in daemon.output().splitlines())
