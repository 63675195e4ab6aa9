"""Image updates under a live state, the first part: origins recorded at
copy-up, the lower's fingerprint at each mount, and `rofs diff` telling a change made
here from a stale copy and from a conflict (docs/image-updates.md)."""

import errno
import json
import os
import subprocess

import pytest
from helpers import ROFS, RofsProcess, rofs_out, write_text

from rofs.store import origin
from rofs.store.layers import Markers

pytestmark = pytest.mark.fuse

ORIGIN = Markers.TRUSTED + b"rofs.origin"


@pytest.fixture
def image(tmp_path):
    lower, state, mnt = (str(tmp_path / n) for n in ("lower", "state", "mnt"))
    os.makedirs(os.path.join(lower, "conf.d"))
    os.makedirs(mnt)
    for name in ("here", "meta", "both", "stale", "untouched", "untouched-2"):
        write_text(os.path.join(lower, name), "v1 %s\n" % name)
    os.setxattr(os.path.join(lower, "here"), "user.note", b"v1")
    os.symlink("here", os.path.join(lower, "link"))
    return {"lower": lower, "state": state, "mnt": mnt}


def upper_of(s, name):
    return os.path.join(s["state"], os.path.realpath(s["mnt"]).lstrip("/"), name)


def host_changes(s):
    """What a host does on image v1."""
    m = s["mnt"]
    with RofsProcess(m, s["state"], s["lower"]):
        with open(os.path.join(m, "here"), "a") as f:
            f.write("edited here\n")
        os.chmod(os.path.join(m, "meta"), 0o600)
        with open(os.path.join(m, "both"), "a") as f:
            f.write("edited here\n")
        os.chown(os.path.join(m, "stale"), 0, 0)  # a copy-up that changes nothing
        os.chmod(os.path.join(m, "conf.d"), 0o750)
        os.lchown(os.path.join(m, "link"), 0, 0)
        os.rename(os.path.join(m, "untouched-2"), os.path.join(m, "moved"))


def test_origin_recorded_at_copy_up_and_hidden(image):
    host_changes(image)
    for name in ("here", "meta", "both", "stale", "link", "conf.d"):
        recorded = origin.parse(os.getxattr(upper_of(image, name), ORIGIN,
                                            follow_symlinks=False))
        lower = os.path.join(image["lower"], name)
        assert recorded.same_object(origin.describe(os.fsencode(lower),
                                                    Markers().is_private)), name
        assert recorded.path == origin.path_digest((name.encode(),))
    st = os.stat(os.path.join(image["lower"], "here"))
    here = origin.parse(os.getxattr(upper_of(image, "here"), ORIGIN))
    assert (here.kind, here.size, here.mode, here.mtime_ns) == (b"f", st.st_size, 0o644,
                                                                 st.st_mtime_ns)
    assert origin.parse(recorded.encode()) == recorded
    with RofsProcess(image["mnt"], image["state"], image["lower"]):
        path = os.path.join(image["mnt"], "here")
        assert not any(n.startswith("trusted.overlay") for n in os.listxattr(path))
        with pytest.raises(OSError) as refused:
            os.getxattr(path, ORIGIN)
        assert refused.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)
        with pytest.raises(OSError):
            os.setxattr(path, ORIGIN, b"1 f 0 644 0 0 0 - - -")


def image_v2(s):
    """The image update: it changes what the host changed (both, meta), what the host
    only copied up (stale), and nothing else."""
    for name in ("meta", "both", "stale", "moved"):
        write_text(os.path.join(s["lower"], name), "v2 %s\n" % name)


def test_diff_tells_here_stale_metadata_and_conflict_apart(image):
    host_changes(image)
    before = {c["path"].rsplit("/", 1)[-1]: c for c in json.loads(
        rofs_out("diff", "--json", image["state"]))}
    assert before["here"]["image"] == "here" and before["meta"]["image"] == "here"
    image_v2(image)
    changes = {c["path"].rsplit("/", 1)[-1]: c for c in json.loads(
        rofs_out("diff", "--json", image["state"]))}
    assert changes["here"]["image"] == "here"  # the image left it alone
    assert changes["meta"]["image"] == "metadata"  # the host only chmodded it
    assert changes["both"]["image"] == "conflict"
    assert changes["stale"]["image"] == "stale"  # equal to v1: v2 should show through
    assert changes["conf.d"]["image"] == "here"
    assert "untouched" not in changes
    assert changes["moved"]["image"] == "here"  # renamed here: a change made here
    text = rofs_out("diff", image["state"])
    assert "both  (content, mtime)  [image changed: conflict]" in text
    assert "[image changed: stale]" in text and "[image changed: metadata]" in text


def test_a_copy_made_before_origins_is_unknown(image):
    host_changes(image)
    os.removexattr(upper_of(image, "both"), ORIGIN)
    image_v2(image)
    changes = {c["path"].rsplit("/", 1)[-1]: c for c in json.loads(
        rofs_out("diff", "--json", image["state"]))}
    assert changes["both"]["image"] == "unknown"  # never guessed


def test_mount_notices_an_image_update(image, tmp_path):
    warn = ("--on-image-change", "warn")
    host_changes(image)
    with RofsProcess(image["mnt"], image["state"], image["lower"], args=warn) as daemon:
        (status,) = json.loads(rofs_out("status", "--json", image["mnt"]))
        assert status["image_changed"] is False
    assert "lower layer changed" not in daemon.output()
    image_v2(image)
    # warn (on the command line, then as fstab has it): every mount says so, until the
    # state is reconciled
    for args in (warn, ("-o", "on_image_change=warn")):
        with RofsProcess(image["mnt"], image["state"], image["lower"], args=args) as daemon:
            (status,) = json.loads(rofs_out("status", "--json", image["mnt"]))
            assert status["image_changed"] is True and status["reconciled"] is None
            assert "changed and not reconciled (on-image-change warn)" in rofs_out(
                "status", image["mnt"])
        assert "the lower layer changed since the last mount" in daemon.output()
    policy = tmp_path / "policy"
    policy.write_text("on-image-change keep\n")  # keep: as it is, and quiet
    with RofsProcess(image["mnt"], image["state"], image["lower"],
                     args=("--policy", str(policy))) as daemon:
        assert json.loads(rofs_out("status", "--json", image["mnt"]))[0]["image_changed"]
    assert "lower layer changed" not in daemon.output()
    assert "reconcile" not in daemon.output()
    with RofsProcess(image["mnt"], image["state"], image["lower"]) as daemon:  # the default
        (status,) = json.loads(rofs_out("status", "--json", image["mnt"]))
        assert status["reconciled"]["counts"] == {"took": 1, "merged": 1, "conflict": 1}
        text = rofs_out("status", image["mnt"])
        assert "reconciled at this mount: 1 conflict, 1 merged, 1 took" in text
        assert "left conflicts or hidden entries" in text
    assert "reconciled %s: 1 took, 1 merged, 1 conflict" % os.path.realpath(image["mnt"]) \
        in daemon.output()
    with RofsProcess(image["mnt"], image["state"], image["lower"], args=warn) as daemon:
        assert not json.loads(rofs_out("status", "--json", image["mnt"]))[0]["image_changed"]


def test_on_image_change_typos_are_refused(image, tmp_path):
    policy = tmp_path / "policy"
    policy.write_text("on-image-change sometimes\n")
    for args in (["--on-image-change", "sometimes"], ["-o", "on_image_change=merge"],
                 ["--policy", str(policy)]):
        out = subprocess.run(ROFS + [image["mnt"], "--state", image["state"], "--lower",
                                     image["lower"], *args], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and ("sometimes" in out.stderr or "merge" in out.stderr)
        assert not os.path.exists(image["state"])


@pytest.mark.parametrize("markers", [(), ("-o", "userxattr")])
def test_renaming_over_a_lower_file_carries_its_origin(image, markers):
    """sed -i's way (a new file renamed over one the image has) is an edit in place to
    an image update; a symlink renamed so is left alone (a user.* xattr cannot be set
    on it, and that must not fail the rename)."""
    m = image["mnt"]
    with RofsProcess(m, image["state"], image["lower"], args=markers):
        write_text(os.path.join(m, "new"), "v1 here\nedited\n")
        os.rename(os.path.join(m, "new"), os.path.join(m, "here"))
        os.symlink("here", os.path.join(m, "sym"))
        os.rename(os.path.join(m, "sym"), os.path.join(m, "both"))
        assert os.readlink(os.path.join(m, "both")) == "here"
    prefix = b"user.overlay." if markers else Markers.TRUSTED
    recorded = origin.parse(os.getxattr(upper_of(image, "here"), prefix + b"rofs.origin"))
    assert recorded.path == origin.path_digest((b"here",))
    assert recorded.same_object(origin.describe(
        os.fsencode(os.path.join(image["lower"], "here")), Markers(prefix).is_private))


def test_base_writer_keeps_texts_off_the_request_path_and_bounded(tmp_path):
    """Unit test of origin.BaseWriter: texts are written by its thread (or at close),
    binary data never, and past MAX_PENDING queued bytes texts are dropped and counted."""
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    writer = origin.BaseWriter(fd)
    try:
        writer.MAX_PENDING = 10
        writer.add(origin.digest(b"abc\n"), b"abc\n")
        writer.add(origin.digest(b"\0bin"), b"\0bin")
        writer.add(origin.digest(b"too long\n"), b"too long\n")
        assert writer.dropped == 1
    finally:
        writer.close()
        os.close(fd)
    assert os.listdir(tmp_path) == [origin.digest(b"abc\n").decode()]
    assert origin.base(str(tmp_path), origin.digest(b"abc\n")) == b"abc\n"
    with open(tmp_path / origin.digest(b"abc\n").decode(), "wb") as f:
        f.write(b"torn")
    assert origin.base(str(tmp_path), origin.digest(b"abc\n")) is None
