"""The command line: daemon life cycle and every bad input (exit 2, nothing mounted,
nothing written)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROFS, RofsProcess, is_rofs_mounted, run_rofs, unmount

pytestmark = pytest.mark.fuse


def tree(path):
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return sorted(out)


def assert_refused(result, layers, needle):
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rofs: error: ") and needle in lines[0], lines
    assert not is_rofs_mounted(layers["mnt"])


def daemon_pids(needle):
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"rofs" in cmd and needle.encode() in cmd:
            pids.append(int(pid))
    return pids


def wait_gone(needle, timeout=15):
    deadline = time.monotonic() + timeout
    while daemon_pids(needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not daemon_pids(needle)


def test_help_and_version():
    result = run_rofs("--help", code=None)
    assert result.returncode == 0
    assert "--state" in result.stdout and "created (mode 0700)" in result.stdout
    result = run_rofs("--version", code=None)
    assert result.returncode == 0 and result.stdout.startswith("rofs ")


def test_background_mount_is_live_on_return_and_unmount_ends_daemon(layers):
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                      code=None)
    try:
        assert result.returncode == 0, result.stderr
        assert is_rofs_mounted(layers["mnt"])
        with open(os.path.join(layers["mnt"], "passwd")) as f:
            assert f.read().startswith("root:")
        assert daemon_pids(layers["mnt"])
        subprocess.run(["umount", layers["mnt"]], check=True)
        assert wait_gone(layers["mnt"]), "daemon did not exit after umount"
    finally:
        unmount(layers["mnt"])
        for pid in daemon_pids(layers["mnt"]):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(layers, sig):
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"]).start()
    try:
        with open(os.path.join(layers["mnt"], "new"), "w") as f:
            f.write("kept")
        proc.proc.send_signal(sig)
        assert proc.proc.wait(timeout=15) == 0, proc.output()
        assert not is_rofs_mounted(layers["mnt"])
    finally:
        proc.stop()
    upper = os.path.join(layers["state"], layers["mnt"].lstrip("/"), "new")
    with open(upper) as f:
        assert f.read() == "kept"


def test_mount_over_itself(tmp_path):
    """The lower is what the mountpoint holds before the mount (rofs /etc --state S)."""
    target = tmp_path / "etc"
    target.mkdir()
    (target / "hostname").write_text("box\n")
    state = str(tmp_path / "state")
    with RofsProcess(str(target), state):
        assert (target / "hostname").read_text() == "box\n"
        (target / "hostname").write_text("changed\n")
        (target / "added").write_text("x")
        assert (target / "hostname").read_text() == "changed\n"
    assert (target / "hostname").read_text() == "box\n"
    assert not (target / "added").exists()
    assert (tmp_path / "state" / str(target).lstrip("/") / "added").read_text() == "x"


def test_missing_mountpoint(layers):
    result = run_rofs(os.path.join(layers["mnt"], "nope"), "--state", layers["state"], code=None)
    assert_refused(result, layers, "does not exist")
    assert not os.path.exists(layers["state"])


def test_missing_lower(layers):
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", "/nonexistent/x",
                      code=None)
    assert_refused(result, layers, "does not exist")
    assert not os.path.exists(layers["state"])


def test_several_lower_layers(layers):
    """lowerdir=A:B, as the kernel's overlay stacks them: rofs has one lower layer."""
    lowers = "%s:%s" % (layers["lower"], layers["mnt"])
    result = run_rofs("rofs", layers["mnt"], "-o", "state=%s,lowerdir=%s" % (layers["state"],
                                                                       lowers), code=None)
    assert_refused(result, layers, "names several lower layers")
    assert not os.path.exists(layers["state"])


def test_missing_state_parent(layers):
    state = os.path.join(str(layers["tmp"]), "no", "such", "state")
    result = run_rofs(layers["mnt"], "--state", state, "--lower", layers["lower"], code=None)
    assert_refused(result, layers, "nor does its parent")
    assert not os.path.exists(os.path.join(str(layers["tmp"]), "no"))


def test_state_is_a_file(layers):
    with open(layers["state"], "w"):
        pass
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                      code=None)
    assert_refused(result, layers, "not a directory")


def test_state_inside_lower_and_lower_inside_state(layers):
    before = tree(layers["lower"])
    state = os.path.join(layers["lower"], "state")
    result = run_rofs(layers["mnt"], "--state", state, "--lower", layers["lower"], code=None)
    assert_refused(result, layers, "inside the lower")
    assert tree(layers["lower"]) == before
    os.makedirs(layers["state"])
    inner = os.path.join(layers["state"], "lower")
    os.makedirs(inner)
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", inner, code=None)
    assert_refused(result, layers, "inside the state dir")
    assert tree(layers["state"]) == [inner]


def test_already_mounted(mounted):
    result = run_rofs(mounted["mnt"], "--state", mounted["state"] + "2", "--lower",
                  mounted["lower"], code=None)
    assert_refused(result, mounted | {"mnt": "/nonexistent"}, "already mounted")
    assert not os.path.exists(mounted["state"] + "2")


def test_state_in_use_by_another_mount(mounted):
    """Two daemons must never share an upper dir, even from different mount namespaces."""
    script = "umount -l %s && exec %s" % (
        mounted["mnt"], " ".join(ROFS + [mounted["mnt"], "--state", mounted["state"],
                                         "--lower", mounted["lower"], "-f"]))
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "in use by another rofs mount" in result.stderr
    assert is_rofs_mounted(mounted["mnt"])


def test_state_on_read_only_filesystem(layers, tmp_path):
    """A state dir that cannot take whiteouts (here: a read-only bind of a prepared one)
    is refused at the probe; a fresh one on a read-only fs is refused before that."""
    with RofsProcess(layers["mnt"], layers["state"], layers["lower"]):
        pass  # lays out a valid state dir
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", layers["state"], str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        before = tree(layers["state"])
        result = run_rofs(layers["mnt"], "--state", str(ro), "--lower", layers["lower"], code=None)
        assert_refused(result, layers, "cannot hold whiteouts")
        assert tree(layers["state"]) == before
        result = run_rofs(layers["mnt"], "--state", str(ro / "fresh"), "--lower",
                      layers["lower"], code=None)
        assert_refused(result, layers, "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_newer_state_format_refused(layers):
    os.makedirs(os.path.join(layers["state"], ".rofs"))
    with open(os.path.join(layers["state"], ".rofs", "format"), "w") as f:
        f.write("rofs-state 99\n")
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                      code=None)
    assert_refused(result, layers, "newer")
    assert sorted(os.listdir(layers["state"])) == [".rofs"]


def test_bad_fuse_option_fails_without_mount(layers):
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                  "-o", "no_such_option_xyz", code=None)
    assert result.returncode != 0
    assert "rofs: error:" in result.stderr
    assert not is_rofs_mounted(layers["mnt"])
    assert not daemon_pids(layers["mnt"])


def test_usage_errors_exit_2():
    assert run_rofs(code=None).returncode == 2
    assert run_rofs("/tmp", code=None).returncode == 2  # --state is required


def test_console_script_installed():
    script = os.path.join(os.path.dirname(sys.executable), "rofs")
    assert os.access(script, os.X_OK), "pip install should provide the rofs command"
    assert subprocess.run([script, "--version"], capture_output=True).returncode == 0


def test_debug_logs_every_request(layers):
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"], args=("--debug",))
    with proc:
        os.stat(os.path.join(layers["mnt"], "passwd"))
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(layers["mnt"], "nothing-here"))
        with open(os.path.join(layers["mnt"], "passwd"), "a") as f:
            f.write("x")
    out = proc.output()
    assert "lookup(1, b'passwd'" in out and "open(" in out and "write(" in out, out


def test_background_start_is_quiet(layers):
    result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                      code=None)
    try:
        assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    finally:
        unmount(layers["mnt"])
        assert wait_gone(layers["mnt"])


def test_killed_daemon_leaves_a_dead_mount_that_is_explained(layers):
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"]).start()
    try:
        with open(os.path.join(layers["mnt"], "written"), "w") as f:
            f.write("before the kill")
        proc.proc.kill()
        proc.proc.wait()
        result = run_rofs(layers["mnt"], "--state", layers["state"], "--lower", layers["lower"],
                          code=None)
        assert result.returncode == 2
        assert "dead FUSE mount" in result.stderr and "umount -l" in result.stderr
    finally:
        proc.stop()  # unmounts the dead mount, reaps, closes the log
    with RofsProcess(layers["mnt"], layers["state"], layers["lower"]):
        with open(os.path.join(layers["mnt"], "written")) as f:
            assert f.read() == "before the kill"


def test_man_page_agrees_with_help():
    """docs/rofs.1 is generated from the parsers (python -m rofs.manpage): regenerate it
    when the options change, and every option of --help is in it."""
    from rofs import cli, manpage
    from rofs.commands import mount
    page = os.path.join(os.path.dirname(__file__), "..", "docs", "rofs.1")
    with open(page) as f:
        assert f.read() == manpage.render(), "docs/rofs.1 is stale: python -m rofs.manpage"
    text = manpage.render().replace("\\-", "-")
    for parser in [mount.build_parser()] + [c.build_parser() for c in cli.COMMANDS.values()]:
        assert parser.prog.split()[-1] in text
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, option


def test_pip_install_gives_the_command_and_the_unit(tmp_path):
    """`pip install .` (the wheel it builds) brings the `rofs` command and the systemd
    unit as package data, not only the checkout's editable install."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), root],
                   check=True, capture_output=True)
    (wheel,) = os.listdir(tmp_path / "wheel")
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(site),
                          str(tmp_path / "wheel" / wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    version = subprocess.run([str(site / "bin" / "rofs"), "--version"], env=env,
                             capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout.startswith("rofs "), version.stderr
    probe = ("import rofs, importlib.resources as r; print(rofs.__file__); "
             "print(r.files('rofs.systemd').joinpath('rofs@.service').read_text())")
    shown = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout
    assert shown.startswith(str(site / "rofs" / "__init__.py"))
    assert "Type=notify" in shown and "ExecStart=/usr/local/bin/rofs" in shown


def test_a_bad_pattern_is_one_line_and_exit_code_2(tmp_path):
    """--ignore and --ignore-file, which diff and report share, refuse a relative
    pattern or a missing file with one line, before reading anything."""
    for args, said in ((("diff", "--ignore", "relative"), "rofs diff: error: 'relative' is "
                        "not an absolute path or pattern"),
                       (("report", "--ignore-file", "/nonexistent"), "rofs report: error: "
                        "cannot read /nonexistent: No such file or directory")):
        result = run_rofs(*args, tmp_path, code=2)
        assert result.stderr == said + "\n" and result.stdout == ""
