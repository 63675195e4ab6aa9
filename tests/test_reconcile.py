"""Reconcile a host's state with a new image: the acceptance scenario with
shadow-utils on a copy of /etc (v1 -> host changes -> v2), --dry-run, a kill in the
middle, three hosts in one report, and the kernel's overlayfs on the result.

Every /etc the tools see is a copy, bound over /etc only inside a private mount
namespace (in_etc); the machine's own /etc is never touched."""

import json
import os
import shutil
import subprocess

import pytest
from helpers import ROFS, RofsProcess, manifest, read_text, rofs_out, write_text

from rofs.store import merge
from rofs.store.layers import Markers

pytestmark = [pytest.mark.fuse, pytest.mark.root]

ORIGIN = Markers.TRUSTED + b"rofs.origin"
TEN = "".join("line %d\n" % i for i in range(1, 11))


def sh(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, "%s: %s%s" % (cmd, out.stdout, out.stderr)
    return out.stdout


def in_etc(etc, script, hostname=None):
    """Run a shell script with `etc` bound over /etc in a private mount namespace (and
    /home, /var/log, /var/mail private tmpfs mounts: useradd writes there)."""
    setup = 'mount --bind "$0" /etc; for d in /var/log /var/mail /var/spool/mail /home; ' \
            'do if [ -d $d ]; then mount -t tmpfs tmpfs $d; fi; done; '
    if hostname:
        setup += "hostname %s; " % hostname
    return sh(["unshare", "-m", "-u", "--propagation", "private", "sh", "-ec",
               setup + script, etc])


def problems(tool, *files):
    """What pwck -r / grpck -r say of these files (one line each)."""
    out = subprocess.run([tool, "-r", *files], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()}


@pytest.fixture
def v1(tmp_path):
    """Image v1: a copy of this machine's /etc, plus files for the scenario."""
    etc = str(tmp_path / "image" / "etc")
    os.mkdir(os.path.dirname(etc))
    sh(["cp", "-a", "/etc", etc])
    for name in ("app.conf", "both.conf", "chm.conf", "gone.conf", "untouched.conf",
                 "redone.conf", "touched.conf", "legacy.conf"):
        write_text(os.path.join(etc, name), TEN)
    os.makedirs(os.path.join(etc, "appdir"), exist_ok=True)
    write_text(os.path.join(etc, "appdir", "a.conf"), "a\n")
    return etc


def host(etc, state, mnt, name="host", edits=True):
    """What a host does on image v1, through rofs."""
    with RofsProcess(mnt, state, etc):
        in_etc(mnt, "useradd -M %suser; groupadd %sgrp; echo %suser:Secret-%s | chpasswd"
               % (name, name, name, name))
        if edits:
            sh(["sed", "-i", "s/^line 2$/line 2 edited here/", os.path.join(mnt, "app.conf")])
            sh(["sed", "-i", "s/^line 5$/line 5 here/", os.path.join(mnt, "both.conf")])
            os.chmod(os.path.join(mnt, "chm.conf"), 0o600)
            os.utime(os.path.join(mnt, "touched.conf"))  # a copy-up, nothing changed
            os.unlink(os.path.join(mnt, "gone.conf"))
            os.unlink(os.path.join(mnt, "redone.conf"))
            shutil.rmtree(os.path.join(mnt, "appdir"))
            os.mkdir(os.path.join(mnt, "appdir"))
            write_text(os.path.join(mnt, "appdir", "mine.conf"), "mine\n")
        shadow = in_etc(mnt, "getent shadow %suser" % name).split(":")[1]
        before = problems("pwck", os.path.join(mnt, "passwd"), os.path.join(mnt, "shadow")) \
            | problems("grpck", os.path.join(mnt, "group"), os.path.join(mnt, "gshadow"))
    return shadow, before


def to_v2(etc):
    """Image v2: a system user and group, another line of app.conf, both.conf's line 5
    otherwise, chm.conf's and untouched.conf's content, a file in appdir."""
    in_etc(etc, "useradd -r -M imgsvc; groupadd -r imggrp")
    write_text(os.path.join(etc, "app.conf"), TEN.replace("line 8\n", "line 8 from v2\n"))
    write_text(os.path.join(etc, "both.conf"), TEN.replace("line 5\n", "line 5 from v2\n"))
    write_text(os.path.join(etc, "chm.conf"), "chm v2\n")
    write_text(os.path.join(etc, "untouched.conf"), "untouched v2\n")
    write_text(os.path.join(etc, "appdir", "new.conf"), "new in v2\n")
    write_text(os.path.join(etc, "redone.conf"), "redone in v2\n")  # deleted on the host
    write_text(os.path.join(etc, "touched.conf"), "touched v2\n")  # only touched on the host
    os.unlink(os.path.join(etc, "legacy.conf"))


def without_atimes(m):
    return {k: v[:6] + v[7:] for k, v in m.items()}


def test_acceptance_v1_host_v2(v1, tmp_path):
    state, mnt = str(tmp_path / "state"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    shadow, host_problems = host(v1, state, mnt)
    to_v2(v1)
    v2_problems = problems("pwck", os.path.join(v1, "passwd"), os.path.join(v1, "shadow")) \
        | problems("grpck", os.path.join(v1, "group"), os.path.join(v1, "gshadow"))

    image = manifest(v1)  # never modified, not even its atimes

    bases = os.path.join(state, ".rofs", "bases", os.path.realpath(mnt).lstrip("/"))
    write_text(os.path.join(bases, "0" * 64), "a base nothing refers to\n")

    # --dry-run says what it would do and changes nothing.
    before = without_atimes(manifest(state))
    planned = rofs_out("reconcile", "--dry-run", state, code=(1,))
    assert without_atimes(manifest(state)) == before
    assert "conflict  %s/both.conf" % os.path.realpath(mnt) in planned
    assert "would reconcile" in planned

    with RofsProcess(mnt, state, v1) as daemon:  # the default: reconcile
        users = in_etc(mnt, "getent passwd imgsvc hostuser; getent group imggrp hostgrp; "
                       "getent shadow hostuser")
        assert "imgsvc:" in users and "hostuser:" in users
        assert "imggrp:" in users and "hostgrp:" in users
        assert ("hostuser:%s:" % shadow) in users  # the host's password
        app = read_text(os.path.join(mnt, "app.conf"))
        assert "line 2 edited here\n" in app and "line 8 from v2\n" in app
        assert read_text(os.path.join(mnt, "chm.conf")) == "chm v2\n"
        assert os.stat(os.path.join(mnt, "chm.conf")).st_mode & 0o777 == 0o600
        assert read_text(os.path.join(mnt, "untouched.conf")) == "untouched v2\n"
        assert read_text(os.path.join(mnt, "touched.conf")) == "touched v2\n"
        assert not os.path.exists(os.path.join(mnt, "gone.conf"))
        assert read_text(os.path.join(mnt, "both.conf")).count("line 5 here\n") == 1
        assert "line 5 from v2\n" in read_text(os.path.join(mnt, "both.conf.rofs-new"))
        assert sorted(os.listdir(os.path.join(mnt, "appdir"))) == ["mine.conf"]
        merged = problems("pwck", os.path.join(mnt, "passwd"), os.path.join(mnt, "shadow")) \
            | problems("grpck", os.path.join(mnt, "group"), os.path.join(mnt, "gshadow"))
        assert merged <= v2_problems | host_problems, merged - v2_problems - host_problems
        (status,) = json.loads(rofs_out("status", "--json", mnt))
        assert status["reconciled"]["counts"]["conflict"] == 1, planned
    assert manifest(v1) == image
    # The base store keeps what the origins of the upper layer and the attic refer to.
    referenced = set()
    for top in (os.path.join(state, os.path.realpath(mnt).lstrip("/")),
                os.path.join(state, ".rofs", "attic")):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                try:
                    value = os.getxattr(os.path.join(dirpath, name), ORIGIN,
                                        follow_symlinks=False)
                except OSError:
                    continue
                referenced.add(value.split()[7].decode())
    assert "0" * 64 not in os.listdir(bases)
    assert set(os.listdir(bases)) <= referenced and len(os.listdir(bases)) > 5
    out = daemon.output()
    assert "conflict  %s/both.conf" % os.path.realpath(mnt) in out
    assert "hidden    %s/appdir" % os.path.realpath(mnt) in out and "new.conf" in out
    assert "hidden    %s/redone.conf  (deleted here; the image changed it" \
        % os.path.realpath(mnt) in out
    assert "/gone.conf" not in out  # deleted here, left alone by the image

    # Logged, and in the report; what it replaced is in the attic.
    report = rofs_out("report", state)
    assert "Image updates reconciled" in report
    assert "conflict  %s/both.conf" % os.path.realpath(mnt) in report
    assert "merged    %s/passwd" % os.path.realpath(mnt) in report
    attic = rofs_out("attic", state)
    assert "reconcile with a new image" in attic and "/passwd" in attic

    # The next mount has nothing left to do; --unhide shows the image's new file.
    with RofsProcess(mnt, state, v1) as daemon:
        pass
    assert "reconciled" not in daemon.output()
    unhidden = rofs_out("reconcile", "--unhide", state)
    assert "unhidden  %s/appdir" % os.path.realpath(mnt) in unhidden
    assert "unhidden  %s/redone.conf" % os.path.realpath(mnt) in unhidden
    with RofsProcess(mnt, state, v1):
        assert sorted(os.listdir(os.path.join(mnt, "appdir"))) == ["mine.conf", "new.conf"]
        assert read_text(os.path.join(mnt, "redone.conf")) == "redone in v2\n"
        assert not os.path.exists(os.path.join(mnt, "gone.conf"))
    assert rofs_out("reconcile", "--unhide", state).startswith("reconciled")  # nothing left


def test_kill_during_reconcile_leaves_old_or_new_and_a_rerun_finishes(v1, tmp_path):
    state, mnt = str(tmp_path / "state"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    host(v1, state, mnt)
    upper = os.path.join(state, os.path.realpath(mnt).lstrip("/"))
    old = {n: read_text(os.path.join(upper, n)) for n in os.listdir(upper)
           if os.path.isfile(os.path.join(upper, n))}
    to_v2(v1)
    reference = str(tmp_path / "reference")
    sh(["cp", "-a", state, reference])
    rofs_out("reconcile", reference, code=(1,))
    ref_upper = os.path.join(reference, os.path.realpath(mnt).lstrip("/"))
    new = {n: read_text(os.path.join(ref_upper, n)) for n in os.listdir(ref_upper)
           if os.path.isfile(os.path.join(ref_upper, n))}
    # Killed between two files, then between linking a version aside and replacing it
    # (the version then has a second name, in the attic: no hard link for all that).
    for at in ("reconcile:replaced:3", "reconcile:linked:2", "reconcile:replaced:1"):
        daemon = RofsProcess(mnt, state, v1, env={"ROFS_CRASH_AT": at})
        try:
            with pytest.raises(RuntimeError, match="before mounting"):
                daemon.start()
        finally:
            daemon.log.close()
        for name in set(old) | set(new):
            path = os.path.join(upper, name)
            now = read_text(path) if os.path.exists(path) else None
            assert now in (old.get(name), new.get(name)), name
    assert rofs_out("check", state) == ""
    with RofsProcess(mnt, state, v1):  # the mount reconciles what is left
        pass
    assert {n: read_text(os.path.join(upper, n)) for n in os.listdir(upper)
            if os.path.isfile(os.path.join(upper, n))} == new


def test_three_hosts_one_image_update_one_report(v1, tmp_path):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    states = []
    for i, name in enumerate(("web1", "web2", "db1")):
        state = str(tmp_path / ("state-" + name))
        host(v1, state, mnt, name=name, edits=i != 1)
        states.append(state)
    # db1 also edits both.conf's line 5 the way v2 will (no conflict there), and
    # legacy.conf, which v2 removes.
    with RofsProcess(mnt, states[2], v1):
        write_text(os.path.join(mnt, "both.conf"), TEN.replace("line 5\n", "line 5 from v2\n"))
        write_text(os.path.join(mnt, "legacy.conf"), "kept on db1\n")
    to_v2(v1)
    for name, state in zip(("web1", "web2", "db1"), states, strict=True):
        in_etc(v1, " ".join(ROFS + ["reconcile", state]) + " || test $? = 1", hostname=name)
    report = rofs_out("report", *states)
    section = report[report.index("Image updates reconciled"):]
    mine = os.path.realpath(mnt)
    for name in ("web1", "web2", "db1"):
        assert "  %s %s: " % (name, mine) in section
    data = json.loads(rofs_out("report", "--json", *states))
    by_host = {r["host"]: r["paths"] for r in data["reconciled"]}
    assert by_host["web1"][mine + "/both.conf"]["action"] == "conflict"
    assert mine + "/both.conf" not in by_host["web2"]  # never touched it
    assert by_host["db1"][mine + "/both.conf"]["action"] == "merged"  # the same edit
    assert by_host["web2"][mine + "/passwd"]["action"] == "merged"
    assert by_host["db1"][mine + "/app.conf"]["action"] == "merged"
    for name in ("web1", "db1"):  # what each took, kept and left in conflict
        assert by_host[name][mine + "/touched.conf"]["action"] == "took"
    assert by_host["db1"][mine + "/legacy.conf"]["action"] == "kept"
    assert "kept      %s/legacy.conf  (changed here; the image removed it)" % mine in section
    assert "took      %s/touched.conf" % mine in section


def test_kernel_overlay_mounts_the_reconciled_state(v1, tmp_path, kernel_overlay):
    state, mnt = str(tmp_path / "state"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    host(v1, state, mnt)
    to_v2(v1)
    rofs_out("reconcile", state, code=(1,))
    with RofsProcess(mnt, state, v1):
        seen = {n: read_text(os.path.join(mnt, n)) for n in sorted(os.listdir(mnt))
                if os.path.isfile(os.path.join(mnt, n)) and n.endswith(
                    (".conf", ".rofs-new", "passwd", "group", "shadow", "gshadow"))}
    target = str(tmp_path / "kernel")
    os.mkdir(target)
    work = str(tmp_path / "kwork")
    os.mkdir(work)
    upper = os.path.join(state, os.path.realpath(mnt).lstrip("/"))
    kernel_overlay(v1, upper, work, target)
    assert {n: read_text(os.path.join(target, n)) for n in seen} == seen
    assert not os.path.exists(os.path.join(target, "gone.conf"))


def test_merge_accounts_per_entry():
    base = b"root:x:0:0::/root:/bin/sh\nold:x:5:5::/:/bin/false\n"
    here = b"root:x:0:0::/root:/bin/bash\nold:x:5:5::/:/bin/false\nbob:x:1000:1000::/:/bin/sh\n"
    new = (b"root:x:0:0:the root:/root:/bin/sh\nsvc:x:999:999::/:/bin/false\n"
           b"eve:x:1000:1000::/:/bin/sh\n")
    left: set[bytes] = set()
    merged, conflicts = merge.merge_accounts(b"passwd", base, here, new, left)
    assert merged == (b"root:x:0:0:the root:/root:/bin/bash\nsvc:x:999:999::/:/bin/false\n"
                      b"bob:x:1000:1000::/:/bin/sh\n")  # old: removed by the image
    assert left == {b"eve"} and "id 1000" in conflicts[0]
    shadow, _ = merge.merge_accounts(b"shadow", b"", b"bob:h:1::::::\n",
                                         b"svc:!:1::::::\neve:!:1::::::\n", left)
    assert shadow == b"svc:!:1::::::\nbob:h:1::::::\n"  # eve left out with its passwd line
    ranges, conflicts = merge.merge_ranges(b"", b"bob:100000:65536\n",
                                               b"eve:100000:65536\nsvc:200000:65536\n")
    assert ranges == b"bob:100000:65536\nsvc:200000:65536\n" and "overlaps" in conflicts[0]
    assert merge.merge_text(b"a\nb\nc\nd\n", b"A\nb\nc\nd\n", b"a\nb\nc\nD\n") == \
        b"A\nb\nc\nD\n"
    assert merge.merge_text(b"a\nb\n", b"A\nb\n", b"X\nb\n") is None


def edited_twice(tmp_path, name, text, here, image):
    """A lower file `name`, edited on the host (sed expression `here`) and then in the
    image (`image`: text to replace, replacement); returns (state, mnt, lower)."""
    lower, state, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    os.makedirs(os.path.dirname(os.path.join(lower, name)), exist_ok=True)
    os.mkdir(mnt)
    write_text(os.path.join(lower, name), text)
    with RofsProcess(mnt, state, lower):
        sh(["sed", "-i", here, os.path.join(mnt, name)])
    write_text(os.path.join(lower, name), text.replace(*image))
    return state, mnt, lower


def test_without_merge3_a_text_merge_is_a_conflict_that_says_so(tmp_path):
    state, mnt, lower = edited_twice(tmp_path, "app.conf", TEN, "s/^line 2$/line 2 here/",
                                     ("line 8\n", "line 8 v2\n"))
    fake = tmp_path / "no-merge3"
    fake.mkdir()
    (fake / "merge3.py").write_text("raise ImportError('no merge3 here')\n")
    out = subprocess.run(ROFS + ["reconcile", state], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(fake)})
    assert out.returncode == 1, out.stderr
    assert "conflict  %s/app.conf  (no text merge: merge3 is not installed" \
        % os.path.realpath(mnt) in out.stdout
    with RofsProcess(mnt, state, lower):
        assert "line 2 here\n" in read_text(os.path.join(mnt, "app.conf"))
        assert "line 8 v2\n" in read_text(os.path.join(mnt, "app.conf.rofs-new"))


def test_a_file_only_named_like_an_account_file_is_merged_as_text(tmp_path):
    state, mnt, lower = edited_twice(tmp_path, "app/group", TEN, "s/^line 2$/line 2 here/",
                                     ("line 8\n", "line 8 v2\n"))
    assert "merged    %s/app/group" % os.path.realpath(mnt) in rofs_out("reconcile", state)
    with RofsProcess(mnt, state, lower):
        text = read_text(os.path.join(mnt, "app", "group"))
    assert "line 2 here\n" in text and "line 8 v2\n" in text
