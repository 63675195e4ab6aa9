"""benchmarks/run.py --quick works (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import is_rofs_mounted

pytestmark = pytest.mark.fuse

RUN = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")


def test_quick_benchmark_runs_and_reports(tmp_path):
    result = subprocess.run(
        [sys.executable, RUN, "--quick", "--only", "native,kernel-overlayfs,rofs",
         "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
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
    mnt = tmp_path / "work" / "mnt-rofs" / "mnt"
    assert not is_rofs_mounted(str(mnt))
