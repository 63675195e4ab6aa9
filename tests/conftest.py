import os
import shutil
import stat
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import RofsProcess, fuse_missing  # noqa: E402

# In CI a missing prerequisite must fail the run, not quietly skip the mount tests.
REQUIRE_FUSE = os.environ.get("ROFS_REQUIRE_FUSE") == "1"

# Live mounts of the tests publish their records and control sockets here, not in the
# machine's /run/rofs (a test that kills a daemon would leave them there): one
# directory for the run, which the parallel workers (pytest -n) inherit.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["ROFS_RUN_DIR"] = tempfile.mkdtemp(prefix="rofs-test-run-")
RUN_DIR = os.environ["ROFS_RUN_DIR"]


def pytest_sessionfinish(session, exitstatus):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    reason = fuse_missing()
    if reason is None:
        return
    for item in items:
        if "fuse" in item.keywords:
            if REQUIRE_FUSE:
                item.add_marker(pytest.mark.xfail(reason="ROFS_REQUIRE_FUSE: " + reason,
                                                  run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


def build_lower(root: str) -> None:
    """A small /etc-like lower tree with the odd cases the tests poke at."""
    os.makedirs(os.path.join(root, "d", "sub", "deep"))
    os.makedirs(os.path.join(root, "empty"))
    os.makedirs(os.path.join(root, "ssh"))
    with open(os.path.join(root, "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\n")
    with open(os.path.join(root, "shadow"), "w") as f:
        f.write("root:*:19000:0:99999:7:::\n")
    os.chmod(os.path.join(root, "shadow"), 0o600)
    with open(os.path.join(root, "d", "file"), "w") as f:
        f.write("in d\n")
    with open(os.path.join(root, "d", "sub", "deep", "leaf"), "w") as f:
        f.write("leaf\n")
    with open(os.path.join(root, "ssh", "sshd_config"), "w") as f:
        f.write("Port 22\n")
    os.chmod(os.path.join(root, "ssh"), 0o700)
    os.symlink("passwd", os.path.join(root, "link"))
    os.symlink("/", os.path.join(root, "rootlink"))
    os.link(os.path.join(root, "passwd"), os.path.join(root, "passwd-hardlink"))
    with open(os.path.join(root, b"caf\xe9".decode("utf-8", "surrogateescape")), "w") as f:
        f.write("latin-1 name\n")
    os.mkfifo(os.path.join(root, "fifo"))
    os.setxattr(os.path.join(root, "passwd"), "user.note", b"lower")
    os.setxattr(os.path.join(root, "d"), "trusted.mark", b"dir")
    big = os.path.join(root, "big")
    with open(big, "wb") as f:
        f.write(os.urandom(3 << 20))
    os.chmod(os.path.join(root, "d", "sub"), 0o751)
    os.chown(os.path.join(root, "d", "file"), 1234, 2345)
    os.utime(os.path.join(root, "d", "file"), ns=(1_000_000_000, 2_000_000_000))
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)


@pytest.fixture
def layers(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    build_lower(str(lower))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return {"lower": str(lower), "state": str(tmp_path / "state"), "mnt": str(mnt),
            "tmp": tmp_path}


@pytest.fixture
def site(layers):
    """The same layers as Paths: (lower, mountpoint, state dir), nothing mounted."""
    from pathlib import Path
    return Path(layers["lower"]), Path(layers["mnt"]), Path(layers["state"])


@pytest.fixture
def mounted(layers):
    """rofs mounted at layers['mnt'] over layers['lower']; checks the daemon stayed sane."""
    yield from serve(layers)


def serve(layers, args: tuple[str, ...] = ()):
    """For a fixture: yield the layers with `proc`, a rofs serving them with `args`;
    afterwards, check that it exited cleanly with no internal error."""
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"], args)
    proc.start()
    try:
        yield {**layers, "proc": proc}
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert not proc.internal_errors(), proc.output()


@pytest.fixture
def remount(layers):
    """Call to unmount (if mounted) and mount again with the same state."""
    procs = []

    def again():
        for proc in procs:
            proc.stop()
        proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"])
        procs.append(proc)
        return proc.start()

    yield again
    for proc in procs:
        proc.stop()


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path):
    yield
    from helpers import is_rofs_mounted, unmount
    for dirpath, dirnames, _ in os.walk(tmp_path, topdown=True):
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            if is_rofs_mounted(path):
                unmount(path)
                dirnames.remove(name)


@pytest.fixture
def kernel_overlay():
    """mount -t overlay, always unmounted afterwards."""
    mounts = []

    def mount(lower, upper, work, target, extra="redirect_dir=on"):
        import subprocess
        opts = "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, work)
        if extra:
            opts += "," + extra
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, target], check=True)
        mounts.append(target)
        return target

    yield mount
    import subprocess
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", target])


def have(cmd):
    return shutil.which(cmd) is not None
