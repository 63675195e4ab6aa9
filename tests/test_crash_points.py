"""A crash between two steps of a change, at a named site (rofs/crash.py,
ROFS_CRASH_AT=site[:n]): the daemon kills itself there, and the next mount must show the
change not at all or whole, with `rofs check` finding at most leftovers of interrupted
operations (which --repair removes).

Each test names its site, makes the change that reaches it, checks that the daemon died
there (SIGKILL), then remounts and checks the view.  test_every_site_is_tested holds the
list to rofs.crash.SITES.
"""

import os
import re
import signal

import pytest
from helpers import RofsProcess, manifest, read_text, run_rofs, write_text

pytestmark = pytest.mark.fuse


@pytest.fixture
def site(tmp_path):
    lower, state, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    os.makedirs(os.path.join(lower, "d"))
    os.makedirs(mnt)
    write_text(os.path.join(lower, "passwd"), "root:x:0:0::/root:/bin/sh\n")
    write_text(os.path.join(lower, "victim"), "lower victim\n")
    write_text(os.path.join(lower, "d", "inside"), "inside\n")
    write_text(os.path.join(lower, "hl-a"), "one inode\n")
    for name in ("hl-b", "hl-c"):
        os.link(os.path.join(lower, "hl-a"), os.path.join(lower, name))
    policy = str(tmp_path / "policy")
    write_text(policy, "scratch %s/scratch\n" % os.path.realpath(mnt))
    before = manifest(lower)
    yield {"lower": lower, "state": state, "mnt": mnt,
           "args": ("--policy", policy)}
    assert manifest(lower) == before, "the lower layer changed"


def crash_at(s, where, action, prepare=None):
    """Mount with ROFS_CRASH_AT=where, run `prepare` then `action` (which must reach the
    site and get an error from the dead mount), then clean up as an admin would."""
    daemon = RofsProcess(s["mnt"], s["state"], s["lower"], s["args"],
                         env={"ROFS_CRASH_AT": where})
    try:
        daemon.start()
        if prepare is not None:
            prepare(s["mnt"])
        with pytest.raises(OSError):
            action(s["mnt"])
        assert daemon.proc.wait(timeout=20) == -signal.SIGKILL, daemon.output()
    finally:
        daemon.stop()
    found = run_rofs("check", s["state"], code=None)
    if found.returncode:
        assert all("left over by an interrupted operation" in line
                   for line in found.stdout.splitlines()), found.stdout
        run_rofs("check", "--repair", s["state"])
    run_rofs("check", s["state"])


def remounted(s):
    return RofsProcess(s["mnt"], s["state"], s["lower"], s["args"])


def p(s, *names):
    return os.path.join(s["mnt"], *names)


def append(mnt, name, data="appended\n"):
    with open(os.path.join(mnt, name), "a") as f:
        f.write(data)


def test_copy_up_prepared(site):
    crash_at(site, "copy-up:prepared", lambda m: append(m, "passwd"))
    with remounted(site):
        assert read_text(p(site, "passwd")) == "root:x:0:0::/root:/bin/sh\n"


def same_inode(s, names, content):
    sts = [os.stat(p(s, n)) for n in names]
    assert len({st.st_ino for st in sts}) == 1, "a hard link was split"
    assert all(read_text(p(s, n)) == content for n in names)
    return sts[0]


LINKS = ("hl-a", "hl-b", "hl-c")


def look_up_links(mnt):
    for name in LINKS:
        os.stat(os.path.join(mnt, name))


def test_copy_up_placed_keeps_hard_links_one_inode(site):
    # All three names known (looked up) before the copy-up: the old code indexed
    # nothing then, and a crash before the other names were linked split them for good.
    crash_at(site, "copy-up:placed", lambda m: append(m, "hl-a"), prepare=look_up_links)
    with remounted(site):
        st = same_inode(site, LINKS, "one inode\n")
        assert st.st_nlink == 3
        append(site["mnt"], "hl-b", "more\n")
        same_inode(site, LINKS, "one inode\nmore\n")
    with remounted(site):
        assert same_inode(site, LINKS, "one inode\nmore\n").st_nlink == 3


def test_copy_up_linked(site):
    crash_at(site, "copy-up:linked", lambda m: append(m, "hl-a"), prepare=look_up_links)
    with remounted(site):
        st = same_inode(site, LINKS, "one inode\n")
        # The index still counts the name linked just before the crash (documented).
        assert st.st_nlink in (3, 4)


def test_materialize_linked(site):
    with remounted(site):  # hl-b and hl-c not known: the index serves them later
        append(site["mnt"], "hl-a")
    crash_at(site, "materialize:linked", lambda m: os.stat(os.path.join(m, "hl-b")))
    with remounted(site):
        st = same_inode(site, LINKS, "one inode\nappended\n")
        assert st.st_nlink in (3, 4)


def test_create_prepared(site):
    crash_at(site, "create:prepared", lambda m: write_text(os.path.join(m, "new"), "x"))
    with remounted(site):
        assert not os.path.exists(p(site, "new"))
        assert sorted(os.listdir(site["mnt"])) == ["d", "hl-a", "hl-b", "hl-c", "passwd",
                                                   "victim"]


def test_mkdir_over_whiteout_swapped(site):
    crash_at(site, "mkdir:swapped", lambda m: os.mkdir(os.path.join(m, "victim")),
             prepare=lambda m: os.unlink(os.path.join(m, "victim")))
    with remounted(site):
        assert os.path.isdir(p(site, "victim")) and os.listdir(p(site, "victim")) == []


def test_whiteout_prepared(site):
    crash_at(site, "whiteout:prepared", lambda m: os.unlink(os.path.join(m, "victim")),
             prepare=lambda m: append(m, "victim"))
    with remounted(site):
        assert read_text(p(site, "victim")) == "lower victim\nappended\n"


def test_rename_marked(site):
    crash_at(site, "rename:marked",
             lambda m: os.rename(os.path.join(m, "d"), os.path.join(m, "e")),
             prepare=lambda m: os.chmod(os.path.join(m, "d"), 0o750))
    with remounted(site):
        assert read_text(p(site, "d", "inside")) == "inside\n"
        assert not os.path.exists(p(site, "e"))
        site_rename = os.path.join(site["mnt"], "e")
        os.rename(p(site, "d"), site_rename)  # and the rename still works
        assert read_text(p(site, "e", "inside")) == "inside\n"


def test_rename_across_classes_placed(site):
    # passwd's cycle with its temporary in a scratch directory: the destination is in
    # place when the daemon dies; the scratch source goes with the next mount.
    def prepare(m):
        os.mkdir(os.path.join(m, "scratch"))
        write_text(os.path.join(m, "scratch", "npasswd"), "new passwd\n")

    crash_at(site, "rename:across-placed",
             lambda m: os.rename(os.path.join(m, "scratch", "npasswd"),
                                 os.path.join(m, "passwd")), prepare=prepare)
    with remounted(site):
        assert read_text(p(site, "passwd")) == "new passwd\n"
        assert not os.path.exists(p(site, "scratch", "npasswd"))


def test_rename_done(site):
    crash_at(site, "rename:done",
             lambda m: os.rename(os.path.join(m, "new"), os.path.join(m, "passwd")),
             prepare=lambda m: write_text(os.path.join(m, "new"), "new passwd\n"))
    with remounted(site):
        assert read_text(p(site, "passwd")) == "new passwd\n"
        assert not os.path.lexists(p(site, "new"))


def test_write_done(site):
    # Written, not answered: the page cache has it (only the daemon died).
    crash_at(site, "write:done", lambda m: append(m, "passwd"))
    with remounted(site):
        assert read_text(p(site, "passwd")) in (
            "root:x:0:0::/root:/bin/sh\n", "root:x:0:0::/root:/bin/sh\nappended\n")


def test_n_th_time(site):
    # site:n crashes the n-th time: the first create goes through.
    crash_at(site, "create:prepared:2", lambda m: write_text(os.path.join(m, "second"), "2"),
             prepare=lambda m: write_text(os.path.join(m, "first"), "1"))
    with remounted(site):
        assert read_text(p(site, "first")) == "1" and not os.path.exists(p(site, "second"))


@pytest.mark.parametrize("env, message", [
    ({"ROFS_CRASH_AT": "copy-up:nowhere"}, "no such crash point"),
    ({"ROFS_PAUSE_AT": "copy-up:nowhere", "ROFS_PAUSE_FILE": "/nonexistent"},
     "no such pause point")])
def test_unknown_site_is_refused(site, env, message):
    # A typo must not make a test pass by never crashing (or pausing).
    daemon = RofsProcess(site["mnt"], site["state"], site["lower"], env=env)
    try:
        with pytest.raises(RuntimeError, match=message):
            daemon.start()
    finally:
        daemon.stop()


def test_every_site_is_tested():
    from rofs import crash
    with open(__file__) as f:
        tested = set(re.findall(r'crash_at\(site, "([a-z:-]+?)(?::\d+)?"', f.read()))
    # reconcile's, with its scenario (a mount that reconciles, killed mid-way)
    with open(os.path.join(os.path.dirname(__file__), "test_reconcile.py")) as f:
        tested |= set(re.findall(r'"(reconcile:[a-z-]+)(?::\d+)?"', f.read()))
    assert tested == set(crash.SITES)


# The same crashes with a keeper (ROFS_CRASH_ONLY=server): only the server dies, the
# next one takes over the mount, the kernel sends the interrupted request again, and the
# caller sees it succeed, done once.  (site, prepare, action, check of the view.)
def _scratch_npasswd(m):
    os.mkdir(os.path.join(m, "scratch"))
    write_text(os.path.join(m, "scratch", "npasswd"), "new passwd\n")


TAKEN_OVER = {
    "copy-up:prepared": (None, lambda m: append(m, "passwd"),
                         lambda s: read_text(p(s, "passwd")) ==
                         "root:x:0:0::/root:/bin/sh\nappended\n"),
    "copy-up:placed": (look_up_links, lambda m: append(m, "hl-a"),
                       lambda s: same_inode(s, LINKS, "one inode\nappended\n")),
    # A rename the dead server made on disk, sent again: the file the kernel knows by
    # its node id (looked up by its old name) answers to the new one.
    "rename:done": (lambda m: write_text(os.path.join(m, "new"), "new passwd\n"),
                    lambda m: os.rename(os.path.join(m, "new"), os.path.join(m, "passwd")),
                    lambda s: read_text(p(s, "passwd")) == "new passwd\n" and
                    not os.path.lexists(p(s, "new"))),
    # An append the dead server made, sent again: made once.
    "write:done": (None, lambda m: append(m, "passwd"),
                   lambda s: read_text(p(s, "passwd")) ==
                   "root:x:0:0::/root:/bin/sh\nappended\n"),
    "create:prepared": (None, lambda m: write_text(os.path.join(m, "new"), "x"),
                        lambda s: read_text(p(s, "new")) == "x"),
    "mkdir:swapped": (lambda m: os.unlink(os.path.join(m, "victim")),
                      lambda m: os.mkdir(os.path.join(m, "victim")),
                      lambda s: os.listdir(p(s, "victim")) == []),
    "whiteout:prepared": (lambda m: append(m, "victim"),
                          lambda m: os.unlink(os.path.join(m, "victim")),
                          lambda s: not os.path.lexists(p(s, "victim"))),
    "rename:marked": (lambda m: os.chmod(os.path.join(m, "d"), 0o750),
                      lambda m: os.rename(os.path.join(m, "d"), os.path.join(m, "e")),
                      lambda s: read_text(p(s, "e", "inside")) == "inside\n" and
                      not os.path.lexists(p(s, "d"))),
    "rename:across-placed": (_scratch_npasswd,
                             lambda m: os.rename(os.path.join(m, "scratch", "npasswd"),
                                                 os.path.join(m, "passwd")),
                             lambda s: read_text(p(s, "passwd")) == "new passwd\n" and
                             not os.path.lexists(p(s, "scratch", "npasswd"))),
}


@pytest.mark.parametrize("where", sorted(TAKEN_OVER))
def test_a_server_dying_inside_a_change_is_replaced_and_the_change_made_once(site, where):
    prepare, action, check = TAKEN_OVER[where]
    daemon = RofsProcess(site["mnt"], site["state"], site["lower"], site["args"],
                         env={"ROFS_CRASH_AT": where, "ROFS_CRASH_ONLY": "server"})
    try:
        daemon.start()
        first = daemon.server()
        if prepare is not None:
            prepare(site["mnt"])
        action(site["mnt"])  # no error: the next server finished it
        assert daemon.server() != first, "the server did not die at %s" % where
        assert check(site), daemon.output()
        assert "took over" in daemon.output()
    finally:
        assert daemon.stop() == 0, daemon.output()
    with remounted(site):
        assert check(site)
    found = run_rofs("check", site["state"], code=None)
    if found.returncode:
        assert all("left over by an interrupted operation" in line
                   for line in found.stdout.splitlines()), found.stdout
