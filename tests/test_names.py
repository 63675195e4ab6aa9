"""Names are data, never syntax: every output of every tool shows one name as one field
on one line, in the escaped form of rofs.store.quoting, and the policy parser reads it back.

A local user controls the names of the files they create under the mount; a name that
holds a newline (or NEL, LINE SEPARATOR, which str.splitlines also splits on) must never
become a line of a policy root adopts, of a diff, of a report or of the daemon's log.
"""

import json
import os

import pytest
from helpers import RofsProcess, rofs_out

from rofs.store.policy import Class, load
from rofs.store.quoting import quote, unquote

pytestmark = pytest.mark.fuse

# Every byte but NUL and "/", each in a name of its own, and names forging syntax.
NAMES = [b"n" + bytes([b]) + b"x" for b in range(1, 256) if b != ord("/")] + [
    bytes(b for b in range(1, 256) if b != ord("/")),
    b"x\ndefault persistent", b"y\nrwtab home", b"z\xc2\x85persistent shadow",
    b"w\xe2\x80\xa8D shadow", b"\xff", b"caf\xc3\xa9", b" lead", b"#hash", b"back\\x41"]


def lines_of(text):
    """Lines as a program reading rofs's output would split them (on \\n only), with a
    check that no other line break hides in one."""
    lines = text.split("\n")
    assert lines[-1] == ""
    for line in lines:
        assert line.splitlines() in ([line], []), repr(line)
    return lines[:-1]


def test_every_byte_in_names_through_every_tool(tmp_path):
    lower, mnt, state = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    lower.mkdir()
    mnt.mkdir()
    (lower / "existing").write_text("lower\n")
    m = os.fsencode(str(mnt))
    # A rule naming a path with a newline: the daemon's warning about it is one line.
    policy = tmp_path / "policy"
    policy.write_text("persistent %s/no\\x0asuch\n" % mnt)
    with RofsProcess(str(mnt), str(state), str(lower), ("--policy", str(policy))) as proc:
        for name in NAMES:
            with open(m + b"/" + name, "wb") as f:
                f.write(b"data\n")
        os.unlink(mnt / "existing")
        status = rofs_out("status", mnt, errors="strict")
        assert len(lines_of(status)) >= 5
    out = proc.output()
    warnings = [line for line in out.splitlines() if "matches nothing" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "persistent %s/no\\x0asuch matches nothing in the lower layer or the state (a typo?)"
        % mnt), out
    shown = {quote(m + b"/" + name) for name in NAMES}
    assert len(shown) == len(NAMES)

    # rofs diff: one line per change, each name back as it was.
    diff = rofs_out("diff", state, errors="strict")
    lines = lines_of(diff)
    assert {line for line in lines if line.startswith("A ")} == {"A " + s for s in shown}
    assert lines.count("D %s/existing" % mnt) == 1 and len(lines) == len(NAMES) + 1
    assert {unquote(line[2:]) for line in lines if line.startswith("A ")} == \
        {m + b"/" + n for n in NAMES}
    assert {r["path"] for r in json.loads(rofs_out("diff", "--json", state, errors="strict"))} == \
        shown | {"%s/existing" % mnt}

    # rofs report: each path once, on a line of its own.
    report = rofs_out("report", state, errors="strict")
    lines = lines_of(report)
    for s in shown:
        assert sum(1 for line in lines if line.startswith("    %s  " % s)) == 1, s
    assert not any(line.startswith(("default", "rwtab", "persistent", "D ")) for line in lines)
    data = json.loads(rofs_out("report", "--json", state, errors="strict"))
    (program,) = data["programs"]
    assert set(program["paths"]) == shown | {"%s/existing" % mnt}

    # rofs report --suggest: the policy parser reads back exactly the names, and nothing
    # a name says becomes a rule or a default.
    suggestion = rofs_out("report", "--suggest", state, errors="strict")
    lines_of(suggestion)
    pol = tmp_path / "suggested"
    pol.write_text(suggestion)
    parsed = load(str(mnt), str(lower), policy_file=str(pol))
    assert parsed.default is Class.SCRATCH
    assert set(parsed.rules) == {(n,) for n in NAMES} | {(b"existing",)}
    assert all(r.cls is Class.PERSISTENT for r in parsed.rules.values())

    # rofs check: damage under a name with a newline is one line of its own.
    upper = os.fsencode(str(state)) + m
    os.mknod(upper + b"/ghost\nD x", 0o020000, os.makedev(0, 0))  # a whiteout over nothing
    check = rofs_out("check", state, code=1, errors="strict")
    (line,) = lines_of(check)
    assert line.startswith(quote(upper + b"/ghost\nD x") + ": whiteout over nothing")

    # rofs revert (offline): one line per path.
    name = b"x\ndefault persistent"
    reverted = rofs_out("revert", "--state", state, m + b"/" + name, errors="strict")
    assert lines_of(reverted) == ["reverted " + quote(m + b"/" + name)]


def test_a_mountpoint_with_a_newline_in_status_and_attic(tmp_path):
    lower, state = tmp_path / "lower", tmp_path / "state"
    lower.mkdir()
    (lower / "passwd").write_text("root\n")
    mnt = tmp_path / "m\nt"
    mnt.mkdir()
    with RofsProcess(str(mnt), str(state), str(lower)):
        (mnt / "passwd").write_text("changed\n")
        status = rofs_out("status", errors="strict")
        assert lines_of(status)[0].startswith(quote(str(mnt)) + ": live")
    policy = tmp_path / "p"
    policy.write_text("scratch %s/passwd\n" % quote(str(mnt)))
    with RofsProcess(str(mnt), str(state), str(lower), ("--policy", str(policy))):
        assert (mnt / "passwd").read_text() == "root\n"
    listing = rofs_out("attic", state, errors="strict")
    assert lines_of(listing)[2] == "  %s/passwd" % quote(str(mnt))
