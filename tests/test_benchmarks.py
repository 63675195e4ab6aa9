"""benchmarks/run.py --quick works (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import is_rofs_mounted

pytestmark = pytest.mark.fuse

RUN = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")


def trace_settings():
    """The machine's global trace buffer size and instances (None without tracefs)."""
    try:
        with open("/sys/kernel/tracing/buffer_size_kb") as f:
            return f.read(), sorted(os.listdir("/sys/kernel/tracing/instances"))
    except OSError:
        return None


def test_quick_benchmark_runs_and_reports(tmp_path):
    before = trace_settings()
    result = subprocess.run(
        [sys.executable, RUN, "--quick", "--only", "native,kernel-overlayfs,rofs",
         "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trace_settings() == before  # counting requests left the machine as it was
    assert "rofs vs peers" in result.stdout
    with open(tmp_path / "results" / "quick.json") as f:
        data = json.load(f)
    assert data["filesystems"] == ["native", "kernel-overlayfs", "rofs"]
    names = {row["workload"] for row in data["workloads"]}
    assert {"walk_cold", "open_read_close", "passwd_cycle", "copyup_big",
            "readdir_10k_first", "two_processes"} <= names
    for row in data["workloads"]:
        rofs = row["results"]["rofs"]
        assert rofs["median_s"] > 0 and rofs["ratio_to_native"] > 0
    assert data["peak_rss_kib"]["rofs"] > 0
    memory = data["memory"]["rofs"]
    assert memory["entries"] >= 2000
    assert memory["after_walk_kib"] > 0 and memory["after_forget_kib"] > 0
    table = subprocess.run([sys.executable, os.path.join(os.path.dirname(RUN), "table.py"),
                            str(tmp_path / "results" / "quick.json")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| walk_cold |" in table.stdout and "after the kernel forgot" in table.stdout
    mnt = tmp_path / "work" / "mnt-rofs" / "mnt"
    assert not is_rofs_mounted(str(mnt))


@pytest.mark.parametrize("script", ["raw_fuse_floor.py"])
def test_floor_prototypes_serve_their_file(tmp_path, script):
    """The measurement prototypes of docs/performance.md still mount and answer."""
    from helpers import mounted_fstype
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path = os.path.join(os.path.dirname(RUN), script)
    proc = subprocess.Popen([sys.executable, path, str(mnt)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        import time
        deadline = time.monotonic() + 20
        while mounted_fstype(str(mnt)) is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "did not mount"
            time.sleep(0.02)
        with open(mnt / "passwd", "rb") as f:
            assert f.read().startswith(b"root:x:0:0:")
        assert not (mnt / "other").exists()
    finally:
        if mounted_fstype(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)])
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
