"""Per-path policy: persistent, scratch (wiped at the next mount), read-only.

Parsing and classification are tested on their own; everything else through real
mounts, across a remount.
"""

import errno
import json
import os
import re
import subprocess

import pytest
from helpers import ROFS, RofsProcess, is_rofs_mounted, read_text, write_text

from rofs.store.policy import BUILT_IN_SOURCE, Class, PolicyError, load

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "policy.md")


def doc_block(name):
    """The fenced block of docs/policy.md that follows a `<!-- name -->` comment."""
    text = read_text(DOCS)
    m = re.search(r"<!-- %s -->\s*```[a-z]*\n(.*?)```" % re.escape(name), text, re.S)
    assert m, "docs/policy.md has no block %s" % name
    return m.group(1)


# ------------------------------------------------------------------ parsing


def mine(policy):
    """The rules that came from the files, not the built-in ones."""
    return [r for r in policy.rules.values() if not r.source.startswith(BUILT_IN_SOURCE)]


def test_built_in_rule_for_fusermount3s_lock_only_over_etc(tmp_path):
    p = load("/etc", str(tmp_path))
    assert p.classify((b"mtab.fuselock",)) is Class.READ_ONLY and not mine(p)
    assert load("/srv", str(tmp_path)).rules == {}
    pol = tmp_path / "policy"
    write_text(pol, "persistent /etc/mtab.fuselock\n")
    p = load("/etc", str(tmp_path), policy_file=str(pol))
    assert p.classify((b"mtab.fuselock",)) is Class.PERSISTENT


def test_classes_follow_the_longest_rule(tmp_path):
    pol = tmp_path / "policy"
    write_text(pol, "# comment\n\ndefault scratch\npersistent /etc/ssh\n"
          "read-only /etc/ssh/moduli\nscratch /etc/ssh/keys/tmp\n")
    p = load("/etc", str(tmp_path), policy_file=str(pol))
    assert p.classify(()) is Class.SCRATCH
    assert p.classify((b"hosts",)) is Class.SCRATCH
    assert p.classify((b"ssh",)) is Class.PERSISTENT
    assert p.classify((b"ssh", b"sshd_config")) is Class.PERSISTENT
    assert p.classify((b"ssh", b"moduli")) is Class.READ_ONLY
    assert p.classify((b"ssh", b"moduli", b"x")) is Class.READ_ONLY
    assert p.classify((b"ssh", b"keys", b"tmp", b"a")) is Class.SCRATCH
    assert p.classify((b"sshx",)) is Class.SCRATCH  # a prefix of a name is not a parent


def test_fedora_files_every_line_type(tmp_path):
    etc = tmp_path / "etc"
    (etc / "rwtab.d").mkdir(parents=True)
    (etc / "statetab.d").mkdir()
    write_text(etc / "rwtab", "# rwtab\ndirs\t/etc/spool\nempty /etc/cache\n")
    write_text(etc / "rwtab.d" / "extra", "files /etc/adjtime\nfiles /var/lib/outside\n")
    write_text(etc / "statetab", "/etc/ssh\n# nothing\n")
    write_text(etc / "statetab.d" / "more", "/etc/machine-id\n")
    p = load("/etc", str(tmp_path), rwtab=str(etc))
    kinds = {r.path: (r.cls, r.kind) for r in mine(p)}
    assert kinds == {(b"spool",): (Class.SCRATCH, "dirs"),
                     (b"cache",): (Class.SCRATCH, "empty"),
                     (b"adjtime",): (Class.SCRATCH, "files"),
                     (b"ssh",): (Class.PERSISTENT, "files"),
                     (b"machine-id",): (Class.PERSISTENT, "files")}
    assert any("/var/lib/outside is outside the mount" in n for n in p.notes)


@pytest.mark.parametrize("text, message", [
    ("persistent etc/relative\n", "not an absolute path"),
    ("sometimes /etc/x\n", "unknown keyword 'sometimes'"),
    ("default maybe\n", "`default` takes one of"),
    ("read-only\n", "`read-only` needs a PATH"),
    ("empty\n", "`empty` needs a PATH"),
])
def test_malformed_policy_lines_name_file_and_line(tmp_path, text, message):
    pol = tmp_path / "policy"
    write_text(pol, "# first\n" + text)
    with pytest.raises(PolicyError) as e:
        load("/etc", str(tmp_path), policy_file=str(pol))
    assert "%s:2:" % pol in str(e.value) and message in str(e.value)


def test_comments_several_paths_and_escapes(tmp_path):
    """What the issue saw accepted as one path with spaces, which matched nothing."""
    pol = tmp_path / "policy"
    pol.write_bytes(b"default scratch   # forget the rest\n"
                    b"persistent /etc/shadow    # keep password changes\n"
                    b"persistent /etc/gshadow\t/etc/subuid /etc/my\\x20file\r\n"
                    b"read-only /etc/back\\\\slash /etc/caf\\xe9 /etc/caf\xc3\xa9/x#not-a-comment\n"
                    b"  # an indented comment\n")
    p = load("/etc", str(tmp_path), policy_file=str(pol))
    assert p.default is Class.SCRATCH
    assert {r.path: r.cls for r in mine(p)} == {
        (b"shadow",): Class.PERSISTENT, (b"gshadow",): Class.PERSISTENT,
        (b"subuid",): Class.PERSISTENT, (b"my file",): Class.PERSISTENT,
        (b"back\\slash",): Class.READ_ONLY, (b"caf\xe9",): Class.READ_ONLY,
        (b"caf\xc3\xa9", b"x#not-a-comment"): Class.READ_ONLY}
    assert p.rules[(b"subuid",)].source == "%s:3" % pol


@pytest.mark.parametrize("line, message", [
    (b"persistent /etc/a\\q", "a backslash starts an escape"),
    (b"persistent /etc/a\\x0", "a backslash starts an escape"),
    (b"persistent /etc/a\\x00b", "NUL"),
    (b"persistent /etc/a\xc2\x85b", "U+0085"),  # NEL: str.splitlines splits on it
    (b"persistent /etc/a\xe2\x80\xa8b", "U+2028"),  # LINE SEPARATOR
    (b"persistent /etc/a\x0bb", "U+000B"),
    (b"persistent /etc/\xff", "not valid UTF-8"),
    (b"default scratch persistent", "`default` takes one of"),
])
def test_names_are_never_syntax(tmp_path, line, message):
    """A character that is a line break to someone (or not printable) is an error in a
    policy line, not a new line: names are written in the escaped form."""
    pol = tmp_path / "policy"
    pol.write_bytes(b"# first\n" + line + b"\n")
    with pytest.raises(PolicyError) as e:
        load("/etc", str(tmp_path), policy_file=str(pol))
    assert "%s:2:" % pol in str(e.value) and message in str(e.value)


def test_fedora_files_take_one_path_per_line(tmp_path):
    write_text(tmp_path / "statetab", "/etc/shadow /etc/gshadow\n")
    with pytest.raises(PolicyError, match=r"statetab:1: one path per line.*\\x20"):
        load("/etc", str(tmp_path), rwtab=str(tmp_path))
    write_text(tmp_path / "statetab", "/etc/shadow   # comment\n/etc/my\\x20key\n")
    p = load("/etc", str(tmp_path), rwtab=str(tmp_path))
    assert {r.path for r in mine(p)} == {(b"shadow",), (b"my key",)}


def test_malformed_rwtab_line(tmp_path):
    write_text(tmp_path / "rwtab", "files /etc/a\nbind /etc/b\n")
    with pytest.raises(PolicyError, match=r"rwtab:2: expected `empty\|dirs\|files PATH`"):
        load("/etc", str(tmp_path), rwtab=str(tmp_path))


# --------------------------------------------------------- through mounts


def passwd_change(mnt, content):
    """What shadow-utils does: lock by link(), write the new file, rename it over."""
    mine = mnt / ("shadow.%d" % os.getpid())
    write_text(mine, "%d\n" % os.getpid())
    os.link(mine, mnt / "shadow.lock")
    os.unlink(mine)
    fd = os.open(mnt / "nshadow", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content.encode())
    os.fsync(fd)
    os.close(fd)
    os.rename(mnt / "nshadow", mnt / "shadow")
    os.unlink(mnt / "shadow.lock")


def test_persistent_shadow_with_scratch_default(site):
    """The issue's scenario: /etc/shadow persistent, everything else scratch."""
    lower, mnt, state = site
    pol = mnt.parent / "policy"
    write_text(pol, doc_block("policy-shadow").replace("/etc", str(mnt)))
    args = ("--policy", str(pol))
    with RofsProcess(str(mnt), str(state), str(lower), args):
        passwd_change(mnt, "root:$6$new:20000:0:99999:7:::\n")
        write_text(mnt / "passwd", "root:x:0:0:changed:/root:/bin/sh\n")  # scratch
        write_text(mnt / "new-file", "scratch\n")
        os.mkdir(mnt / "new-dir")
        os.unlink(mnt / "link")
        os.rename(mnt / "d", mnt / "d-moved")
        os.chmod(mnt / "ssh", 0o755)
        assert read_text(mnt / "shadow") == "root:$6$new:20000:0:99999:7:::\n"
        assert read_text(mnt / "passwd").endswith("changed:/root:/bin/sh\n")
        # Scratch changes never reach the state's upper layer: they are in the scratch
        # layer (here the default, STATE/.rofs/scratch).
        upper = os.path.join(state, str(mnt).lstrip("/"))
        assert os.listdir(upper) == ["shadow"]
        layer = os.path.join(state, ".rofs", "scratch", "upper", str(mnt).lstrip("/"))
        assert {"passwd", "new-file", "new-dir", "link", "d", "d-moved"} <= set(
            os.listdir(layer))
    with RofsProcess(str(mnt), str(state), str(lower), args) as rofs:
        assert read_text(mnt / "shadow") == "root:$6$new:20000:0:99999:7:::\n"
        assert os.stat(mnt / "shadow").st_mode & 0o777 == 0o600
        assert read_text(mnt / "passwd") == read_text(lower / "passwd")
        assert not (mnt / "new-file").exists() and not (mnt / "new-dir").exists()
        assert os.readlink(mnt / "link") == "passwd"
        assert read_text(mnt / "d" / "file") == "in d\n" and not (mnt / "d-moved").exists()
        assert os.stat(mnt / "ssh").st_mode & 0o777 == 0o700
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(lower))
        assert os.listdir(upper) == ["shadow"]
        assert os.listdir(layer) == []  # emptied at the mount
    assert "scratch changes go to %s until the next mount" % layer in rofs.output()


def test_rwtab_and_statetab_drive_the_classes(site):
    lower, mnt, state = site
    (lower / "cache" / "sub").mkdir(parents=True)
    write_text(lower / "cache" / "old", "old cache\n")
    (lower / "spool" / "mail" / "root").mkdir(parents=True)
    write_text(lower / "spool" / "mail" / "root" / "msg", "hello\n")
    os.chmod(lower / "spool" / "mail", 0o2775)
    write_text(lower / "adjtime", "0.0 0 0.0\n")
    m = str(mnt)
    write_text(lower / "rwtab", "empty %s/cache\ndirs %s/spool\nfiles %s/adjtime\n" % (m, m, m))
    (lower / "statetab.d").mkdir()
    write_text(lower / "statetab.d" / "ssh", "%s/ssh\n" % m)
    args = ("--rwtab", str(lower), "--default", "read-only")

    def check_start():
        assert os.listdir(mnt / "cache") == []
        assert os.listdir(mnt / "spool") == ["mail"]
        assert os.listdir(mnt / "spool" / "mail") == ["root"]
        assert os.listdir(mnt / "spool" / "mail" / "root") == []
        assert os.stat(mnt / "spool" / "mail").st_mode & 0o7777 == 0o2775
        assert read_text(mnt / "adjtime") == "0.0 0 0.0\n"

    with RofsProcess(m, str(state), str(lower), args) as rofs:
        check_start()
        write_text(mnt / "cache" / "new", "x")
        write_text(mnt / "spool" / "mail" / "root" / "msg2", "y")
        write_text(mnt / "adjtime", "1.5 0 0.0\n")
        write_text(mnt / "ssh" / "sshd_config", "Port 2222\n")
        for attempt in (lambda: write_text(mnt / "passwd", "x"),
                        lambda: write_text(mnt / "new-file", "x"),
                        lambda: os.mkdir(mnt / "new-dir"),
                        lambda: os.unlink(mnt / "link"),
                        lambda: os.chmod(mnt / "shadow", 0o644),
                        lambda: os.rename(mnt / "passwd", mnt / "cache" / "passwd"),
                        lambda: os.link(mnt / "passwd", mnt / "passwd2"),
                        lambda: os.setxattr(mnt / "passwd", "user.x", b"1")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        assert read_text(mnt / "passwd") == read_text(lower / "passwd")
    assert not rofs.internal_errors()
    # The refused writes are in the write log, and the report shows them as refused.
    report = subprocess.run(ROFS + ["report", "--json", str(state)], capture_output=True,
                            text=True, check=True)
    (program,) = json.loads(report.stdout)["programs"]
    # 6 changes: two creates, and truncate + first write of adjtime and sshd_config.
    assert program["refused"] == 8 and program["changes"] == 6
    paths = program["paths"]
    assert paths[m + "/passwd"]["refused"] == 3  # open(O_TRUNC), rename, setxattr
    assert paths[m + "/passwd"]["ops"] == {"truncate": 1, "rename": 1, "setxattr": 1}
    assert paths[m + "/new-dir"] == {**paths[m + "/new-dir"], "refused": 1,
                                     "ops": {"mkdir": 1}}
    text = subprocess.run(ROFS + ["report", str(state)], capture_output=True, text=True,
                          check=True).stdout
    assert "(8 refused)" in text and m + "/link  unlink  REFUSED x1" in text
    with RofsProcess(m, str(state), str(lower), args):
        check_start()
        assert read_text(mnt / "ssh" / "sshd_config") == "Port 2222\n"


def test_read_only_directory_cannot_be_moved_away(site):
    lower, mnt, state = site
    pol = mnt.parent / "policy"
    write_text(pol, "read-only %s/d/sub/deep\n" % mnt)
    with RofsProcess(str(mnt), str(state), str(lower), ("--policy", str(pol))):
        write_text(mnt / "d" / "ok", "writable\n")
        for src in ("d", "d/sub", "d/sub/deep"):
            with pytest.raises(OSError) as e:
                os.rename(mnt / src, mnt / "moved")
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            write_text(mnt / "d" / "sub" / "deep" / "leaf", "x")
        assert e.value.errno == errno.EROFS
        assert read_text(mnt / "d" / "ok") == "writable\n"


def test_bad_policy_refuses_the_mount_and_writes_nothing(site):
    lower, mnt, state = site
    pol = mnt.parent / "policy"
    write_text(pol, "persistent %s/shadow\nscratch\n" % mnt)
    result = subprocess.run(ROFS + [str(mnt), "--lower", str(lower), "--state", str(state),
                                    "--policy", str(pol)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "%s:2: `scratch` needs a PATH" % pol in result.stderr
    assert not state.exists() and not is_rofs_mounted(str(mnt))
