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


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of benchmarks/run.py --quick: (its output, its JSON, its results dir)."""
    tmp = tmp_path_factory.mktemp("bench")
    before = trace_settings()
    result = subprocess.run(
        [sys.executable, RUN, "--quick", "--only", "native,kernel-overlayfs,rofs",
         "--workdir", str(tmp / "work"), "--results", str(tmp / "results")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trace_settings() == before  # counting requests left the machine as it was
    assert not is_rofs_mounted(str(tmp / "work" / "mnt-rofs" / "mnt"))
    with open(tmp / "results" / "quick.json") as f:
        return result.stdout, json.load(f), tmp / "results"


COLD = {"walk_cold", "read_small_cold", "seq_read_cold"}


def test_quick_benchmark_runs_and_reports(quick):
    stdout, data, results = quick
    assert "rofs vs peers" in stdout
    assert data["filesystems"] == ["native", "kernel-overlayfs", "rofs"]
    names = {row["workload"] for row in data["workloads"]}
    assert {"open_read_close", "passwd_cycle", "copyup_big", "readdir_10k_first",
            "two_processes"} <= names
    # a workload that cannot be measured here is named with its reason, never faked
    assert names | set(data["not_run"]) >= COLD and not names & set(data["not_run"])
    for name, reason in data["not_run"].items():
        assert "drop_caches is read-only" in reason
        assert "not run: " in stdout and name in stdout
    for row in data["workloads"]:
        rofs = row["results"]["rofs"]
        assert rofs["median_s"] > 0 and rofs["ratio_to_native"] > 0
    assert data["peak_rss_kib"]["rofs"] > 0
    memory = data["memory"]["rofs"]
    assert memory["entries"] >= 2000 and memory["after_walk_kib"] > 0
    table = subprocess.run([sys.executable, os.path.join(os.path.dirname(RUN), "table.py"),
                            str(results / "quick.json")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| open_read_close |" in table.stdout and "after the kernel forgot" in table.stdout


def test_cold_workloads_run_on_dropped_caches(quick):
    _, data, _ = quick
    if data["not_run"]:
        pytest.skip("cold workloads: " + next(iter(data["not_run"].values())))
    names = {row["workload"] for row in data["workloads"]}
    assert COLD <= names
    assert data["memory"]["rofs"]["after_forget_kib"] > 0


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
