"""The shipped systemd unit, run the way systemd runs it: ExecStart with the unit's
environment and a $NOTIFY_SOCKET, READY=1 only once the mount is live, ExecStop
unmounts and the daemon exits cleanly."""

import os
import shlex
import signal
import socket
import subprocess
from importlib import resources

import pytest
from helpers import is_rofs_mounted, mounted_fstype, unmount

pytestmark = pytest.mark.fuse


def unit_lines():
    text = resources.files("rofs.systemd").joinpath("rofs@.service").read_text()
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(command, path, env):
    """systemd's expansion for these lines: %f, ${VAR} as one word, $VAR split."""
    words = []
    for word in shlex.split(command.replace("%f", path)):
        if word.startswith("${") and word.endswith("}"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words += env[word[1:]].split()
        else:
            words.append(word)
    return words


def receive(sock):
    sock.settimeout(30)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def test_unit_start_notifies_only_once_live_and_stop_unmounts(tmp_path):
    unit = unit_lines()
    assert unit["Type"] == ["notify"]
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    (lower / "hostname").write_text("rofs-unit\n")
    mnt.mkdir()
    env = {"ROFS_STATE": str(tmp_path / "state"), "ROFS_OPTIONS": "--lower %s" % lower}
    start = expand(unit["ExecStart"][0], str(mnt), env)
    stop = expand(unit["ExecStop"][0], str(mnt), env)
    assert os.path.exists(start[0]), "%s: run setup.sh" % start[0]
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    output = open(tmp_path / "output", "wb")
    # systemd connects stderr to the journal and says so in $JOURNAL_STREAM
    st = os.fstat(output.fileno())
    proc = subprocess.Popen(start, env={**os.environ, "NOTIFY_SOCKET": str(notify),
                                        "JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)},
                            stdout=output, stderr=subprocess.STDOUT)
    try:
        message = receive(sock)
        # The moment systemd hears READY=1, the mount answers.
        assert mounted_fstype(str(mnt)) == "fuse.rofs"
        assert (mnt / "hostname").read_text() == "rofs-unit\n"
        assert message["READY"] == "1" and int(message["MAINPID"]) == proc.pid
        assert message["STATUS"] == "serving %s" % mnt
        # The server, which says READY=1, is the main process's child (NotifyAccess=all);
        # killed, it is replaced, and systemd hears nothing.
        assert unit["NotifyAccess"] == ["all"]
        with open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)) as f:
            (server,) = f.read().split()
        os.kill(int(server), signal.SIGKILL)
        assert (mnt / "hostname").read_text() == "rofs-unit\n"
        assert proc.poll() is None
        # ExecReload: a new main process (MAINPID=) takes the mount over, the old exits 0.
        subprocess.run(expand(unit["ExecReload"][0], str(mnt), env), check=True,
                       timeout=120)
        while True:
            message = receive(sock)
            if int(message.get("MAINPID", proc.pid)) != proc.pid:
                break
        assert proc.wait(timeout=30) == 0
        assert (mnt / "hostname").read_text() == "rofs-unit\n"
        subprocess.run(stop, check=True)
        assert receive(sock)["STOPPING"] == "1"
        assert not is_rofs_mounted(str(mnt))
    finally:
        if proc.poll() is None:
            unmount(str(mnt))
            proc.kill()
        proc.wait()
        sock.close()
        output.close()
    logged = (tmp_path / "output").read_text()
    assert "Traceback" not in logged
    # journald reads each line's priority from its "<N>" prefix
    assert "<6>rofs: INFO rofs.daemon.serve: mounted %s" % mnt in logged
    assert all(line.startswith("<") for line in logged.splitlines()), logged


def test_setup_installs_the_unit():
    """setup.sh (which test.sh runs first) puts the shipped unit where systemd looks for
    locally installed units, next to /usr/local/bin/rofs, which its ExecStart runs, and
    the man page the unit's Documentation= names."""
    installed = "/usr/local/lib/systemd/system/rofs@.service"
    with open(installed) as f:
        unit = f.read()
    assert unit == resources.files("rofs.systemd").joinpath("rofs@.service").read_text()
    assert os.path.realpath("/usr/local/bin/rofs").endswith("/.venv/bin/rofs")
    assert "man:rofs(1)" in unit
    with open("/usr/local/share/man/man1/rofs.1") as f, open(os.path.join(
            os.path.dirname(__file__), "..", "docs", "rofs.1")) as page:
        assert f.read() == page.read()
