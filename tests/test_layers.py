"""Walking a layer: trees deeper than any open-file limit, walked with a bounded number
of descriptors (rofs.store.layers.Descent), by the daemon and by the state tools alike."""

import errno
import os
import subprocess
import sys

import pytest

from rofs.store import layers

DEPTH = 300


def deep_tree(root, depth=DEPTH):
    path = str(root)
    os.makedirs(path, exist_ok=True)
    for i in range(depth):
        with open(os.path.join(path, "f%d" % i), "w") as f:
            f.write("x")
        path = os.path.join(path, "d")
        os.mkdir(path)
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def few_levels(monkeypatch):
    monkeypatch.setattr(layers, "OPEN_LEVELS", 4)


def test_walk_sorted_visits_a_deep_tree_with_bounded_descriptors(tmp_path, few_levels):
    deep_tree(tmp_path)
    before = open_fds()
    top = layers.open_listable(None, os.fsencode(tmp_path))
    seen, most = [], [0]

    def visit(dir_fd, name, rel, context):
        most[0] = max(most[0], open_fds() - before)
        assert os.path.samestat(os.fstat(dir_fd), os.stat(os.path.join(tmp_path, *map(
            os.fsdecode, rel[:-1]))))
        seen.append(b"/".join(rel))
        return None if name == b"d" else layers.SKIP

    try:
        layers.walk_sorted(top, (), None, visit)
    finally:
        os.close(top)
    expected = []
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        rel = os.path.relpath(dirpath, tmp_path)
        for name in dirnames + filenames:
            expected.append(os.fsencode(os.path.normpath(os.path.join(rel, name))))
    assert sorted(seen) == sorted(expected) and len(seen) == 2 * DEPTH
    # the window, the top and /proc's listing itself
    assert most[0] <= layers.OPEN_LEVELS + 2
    assert open_fds() == before


def test_remove_tree_removes_a_deep_tree_with_bounded_descriptors(tmp_path, few_levels):
    deep_tree(tmp_path / "top")
    before = open_fds()
    root = layers.open_listable(None, os.fsencode(tmp_path))
    try:
        layers.remove_tree(root, b"top")
    finally:
        os.close(root)
    assert os.listdir(tmp_path) == [] and open_fds() == before


def test_a_directory_moved_during_the_walk_is_estale_not_another_tree(tmp_path, few_levels):
    """A level whose descriptor was closed is reopened by name: if the name now leads to
    another directory, the walk stops rather than walk (or remove) the wrong tree."""
    deep_tree(tmp_path / "top", 20)
    top = layers.open_listable(None, os.fsencode(tmp_path / "top"))
    moved = []

    def visit(dir_fd, name, rel, context):
        if len(rel) == 15 and not moved:
            os.rename(tmp_path / "top" / "d", tmp_path / "elsewhere")
            deep_tree(tmp_path / "top" / "d", 20)
            moved.append(rel)
        return None if name == b"d" else layers.SKIP

    try:
        with pytest.raises(OSError) as caught:
            layers.walk_sorted(top, (), None, visit)
    finally:
        os.close(top)
    assert caught.value.errno == errno.ESTALE and moved


def test_commands_raise_their_soft_open_file_limit():
    """A login shell's stock soft limit (1,024) is raised to the hard one."""
    code = ("import resource; from rofs._sys import raise_open_file_limit; "
            "raise_open_file_limit(); print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run(["prlimit", "--nofile=64:4096", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["4096", "4096"]
