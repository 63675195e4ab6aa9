"""--no-open (-o noopen): the kernel opens files and directories without asking rofs
(FUSE no_open, no_opendir), so an open+read+close of a cached file costs no request.
What an open did moves to the first write: the copy-up, the read-only class's EROFS,
the immutable and append-only checks, the write log's record."""

import errno
import json
import os
import subprocess

import pytest
from conftest import serve
from helpers import RofsProcess, manifest, read_lower, readb, rofs_out

from rofs.commands.report import load_events
from rofs.overlay.base import NODE_HANDLES

pytestmark = pytest.mark.fuse


@pytest.fixture
def no_open(layers):
    """rofs --no-open --debug (every request logged) over conftest's lower."""
    before = manifest(layers["lower"])
    yield from serve(layers, ("--no-open", "--debug"))
    assert manifest(layers["lower"]) == before, "the lower layer was modified"


def requests(proc, name):
    return proc.output().count("rofs.fuse.session: %s(" % name)


def upper(m, *names):
    return os.path.join(m["state"], m["mnt"].lstrip("/"), *names)


def test_cached_reads_cost_no_request(no_open):
    m, proc = no_open, no_open["proc"]
    path = os.path.join(m["mnt"], "passwd")
    expected = read_lower(os.path.join(m["lower"], "passwd"))
    assert readb(path) == expected
    reads = requests(proc, "read")
    for _ in range(200):
        assert readb(path) == expected
    # One OPEN ever (answered ENOSYS: the kernel stops asking), no RELEASE, and the
    # pages stay cached: no more reads.
    assert requests(proc, "open") == 1 and requests(proc, "release") == 0
    assert requests(proc, "read") == reads
    assert not os.path.exists(upper(m, "passwd"))


def test_the_first_write_copies_up_and_truncation_comes_as_setattr(no_open):
    m = no_open
    path = os.path.join(m["mnt"], "passwd")
    lower = read_lower(os.path.join(m["lower"], "passwd"))
    with open(path, "r+b") as f:  # opened for writing: nothing copied yet
        assert not os.path.exists(upper(m, "passwd"))
        f.seek(0, os.SEEK_END)
        f.write(b"appended\n")
        f.flush()
        assert readb(upper(m, "passwd")) == lower + b"appended\n"
    assert readb(path) == lower + b"appended\n"
    with open(os.path.join(m["mnt"], "group"), "wb") as f:  # O_TRUNC: a SETATTR
        assert readb(upper(m, "group")) == b""
        f.write(b"new group\n")
    assert readb(os.path.join(m["mnt"], "group")) == b"new group\n"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 4)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert readb(path) == lower[:4] == readb(upper(m, "passwd"))


def test_a_reader_sees_a_copy_up_made_by_a_writer(no_open):
    m = no_open
    path = os.path.join(m["mnt"], "passwd")
    with open(path, "rb") as reader:
        old = reader.read()
        with open(path, "ab") as writer:
            writer.write(b"more\n")
        reader.seek(0)
        assert reader.read() == old + b"more\n"


def test_an_unlinked_open_file_keeps_its_data(no_open):
    m = no_open
    path = os.path.join(m["mnt"], "scratchpad")
    with open(path, "w+b") as f:
        f.write(b"kept")
        os.unlink(path)
        f.write(b" and more")
        f.flush()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(0)
        assert f.read() == b"kept and more"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert not os.path.exists(path)


def test_a_lower_file_unlinked_while_open_takes_writes(no_open):
    """The first write comes after the unlink: the copy-up has no name to go to (found
    by the differential test)."""
    m = no_open
    path = os.path.join(m["mnt"], "shadow")
    lower = read_lower(os.path.join(m["lower"], "shadow"))
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        os.write(fd, b"X")
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size) == (0, len(lower))
        assert os.pread(fd, 4096, 0) == b"X" + lower[1:]
    finally:
        os.close(fd)
    assert not os.path.exists(path)
    assert not os.path.exists(upper(m, "shadow")) or \
        os.stat(upper(m, "shadow")).st_size == 0  # a whiteout, no copy


def test_read_only_paths_refuse_the_first_write(layers):
    policy = os.path.join(str(layers["tmp"]), "policy")
    with open(policy, "w") as f:
        f.write("read-only %s/passwd\n" % layers["mnt"])
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"],
                       args=("--no-open", "--policy", policy))
    with proc:
        path = os.path.join(layers["mnt"], "passwd")
        fd = os.open(path, os.O_WRONLY)  # the kernel opens it: no question asked
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"x")
            assert e.value.errno == errno.EROFS
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            os.open(path, os.O_WRONLY | os.O_TRUNC)  # the truncation is a SETATTR
        assert e.value.errno == errno.EROFS
        assert readb(path) == read_lower(os.path.join(layers["lower"], "passwd"))
        with open(os.path.join(layers["mnt"], "group"), "ab") as f:  # others: as ever
            f.write(b"x\n")
    assert proc.stop() == 0 and not proc.internal_errors(), proc.output()


def test_immutable_and_append_only_hold_at_the_first_write(layers):
    lower = layers["lower"]
    for name, flag in (("frozen", "+i"), ("log", "+a")):
        with open(os.path.join(lower, name), "w") as f:
            f.write("old\n")
        if subprocess.run(["chattr", flag, os.path.join(lower, name)],
                          capture_output=True).returncode != 0:
            pytest.skip("no inode flags on the filesystem under the tests")
    try:
        with RofsProcess(layers["mnt"], layers["state"], lower, args=("--no-open",)):
            mnt = layers["mnt"]
            for name, flags in (("frozen", os.O_WRONLY), ("frozen", os.O_WRONLY | os.O_APPEND),
                                ("log", os.O_WRONLY)):
                fd = os.open(os.path.join(mnt, name), flags)
                try:
                    with pytest.raises(OSError) as e:
                        os.write(fd, b"x\n")
                    assert e.value.errno == errno.EPERM, (name, flags)
                finally:
                    os.close(fd)
            with open(os.path.join(mnt, "log"), "ab") as f:
                f.write(b"appended\n")
            assert readb(os.path.join(mnt, "log")) == b"old\nappended\n"
            assert readb(os.path.join(mnt, "frozen")) == b"old\n"
    finally:
        for name in ("frozen", "log"):
            subprocess.run(["chattr", "-i", "-a", os.path.join(lower, name)])


def test_the_write_log_names_each_writing_process_once(layers):
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"], args=("--no-open",))
    with proc:
        path = os.path.join(layers["mnt"], "passwd")
        for _ in range(2):
            subprocess.run(["sh", "-c", 'for i in 1 2 3; do echo x >> "$1"; done', "sh",
                            path], check=True)
    events, _, _ = load_events([layers["state"]])
    writes = [e for e in events if e["op"] == "write" and e["path"].endswith("/passwd")]
    # Two shells, each writing three times: one record per shell, each its own.
    assert len(writes) == 2, events
    assert len({e["pid"] for e in writes}) == 2
    assert all(e["comm"] == "sh" for e in writes), writes


def test_fallocate_seek_and_copy_file_range_by_node(no_open):
    """The calls that carry a file handle, with the kernel's handle 0: fallocate and
    copy_file_range into a lower file copy it up first; SEEK_DATA reads by node."""
    m = no_open
    src = os.open(os.path.join(m["mnt"], "passwd"), os.O_RDONLY)
    dst = os.open(os.path.join(m["mnt"], "d", "file"), os.O_WRONLY)
    try:
        assert os.lseek(src, 0, os.SEEK_DATA) == 0
        size = os.fstat(src).st_size
        assert os.copy_file_range(src, dst, size, 0, 0) == size
        os.posix_fallocate(dst, 0, 1 << 16)
    finally:
        os.close(src)
        os.close(dst)
    data = readb(upper(m, "d", "file"))
    assert len(data) == 1 << 16
    assert data[:size] == read_lower(os.path.join(m["lower"], "passwd"))
    assert m["proc"].output().count("copy_file_range(") == 1


def test_directories_are_listed_without_opendir_and_resume_across_changes(no_open):
    """--no-open covers directories too (FUSE no_opendir): no OPENDIR or RELEASEDIR,
    and a listing read in small pieces while names come and go returns no name twice
    and skips none that stayed (offsets are keyed hashes of the names, not positions in
    a snapshot, since there is no handle to hold one)."""
    m, proc = no_open, no_open["proc"]
    big = os.path.join(m["mnt"], "many")
    os.mkdir(big)
    names = ["f%04d" % i for i in range(600)]
    for name in names:
        open(os.path.join(big, name), "w").close()
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = []
        chunk = True
        while chunk:
            chunk = [n for _, n in _getdents(fd)]
            seen += chunk
            if len(seen) > 100 and "new" not in names:  # names come and go meanwhile
                open(os.path.join(big, "new"), "w").close()
                os.unlink(os.path.join(big, "f0000"))
                names.append("new")
    finally:
        os.close(fd)
    assert len(seen) == len(set(seen)), "a name was returned twice"
    stayed = set(names) - {"f0000", "new"}
    assert stayed <= set(seen), sorted(stayed - set(seen))[:5]
    assert seen[:2] == [".", ".."]
    assert sorted(os.listdir(big)) == sorted(set(names) - {"f0000"})
    assert requests(proc, "opendir") <= 1 and requests(proc, "releasedir") == 0
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # FSYNCDIR by node
    finally:
        os.close(fd)
    assert requests(proc, "fsyncdir") == 1


def _getdents(fd, size=1024):
    """One getdents64 call (a small buffer: a listing read in many pieces): (ino, name)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    number = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine)
    if number is None:
        pytest.skip("getdents64's number on this architecture is not known here")
    n = libc.syscall(number, fd, buf, size)
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    out, pos = [], 0
    raw = buf.raw[:n]
    while pos < n:
        ino = int.from_bytes(raw[pos:pos + 8], "little")
        reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0].decode()
        out.append((ino, name))
        pos += reclen
    return out


def test_copy_file_range_keeps_its_source_whatever_the_node_handles_do(layers):
    """With --no-open, copy_file_range read the source through the node's cached
    handle, then opened the destination for writing: for a copy within one file that
    closed the read-only handle the request had just taken (EBADF, and a traceback
    per call), as did pushing it out of the handle LRU.  The filesystem under the tests
    is the oracle: the copies succeed and give the same bytes."""
    lower, mnt = layers["lower"], layers["mnt"]
    data = os.urandom(1 << 16)
    for name in ("same", "src"):
        with open(os.path.join(lower, name), "wb") as f:
            f.write(data)
    others = os.path.join(lower, "others")
    os.mkdir(others)
    for i in range(300):  # more than the node handles rofs keeps
        with open(os.path.join(others, "%d" % i), "w") as f:
            f.write("%d\n" % i)

    def copies(root):
        fd = os.open(os.path.join(root, "same"), os.O_RDWR)
        try:
            os.pread(fd, 1, 0)  # the node's read-only handle, with --no-open
            done = [os.copy_file_range(fd, fd, 4096, 0, 1 << 16)]
        finally:
            os.close(fd)
        src = os.open(os.path.join(root, "src"), os.O_RDONLY)
        dst = os.open(os.path.join(root, "dst"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pread(src, 1, 0)
            for i in range(300):  # the source's handle goes out of the LRU
                readb(os.path.join(root, "others", "%d" % i))
            done.append(os.copy_file_range(src, dst, 1 << 16, 0, 0))
        finally:
            os.close(src)
            os.close(dst)
        return done, readb(os.path.join(root, "same")), readb(os.path.join(root, "dst"))

    native = layers["tmp"] / "native"
    subprocess.run(["cp", "-a", lower, str(native)], check=True)
    expected = copies(str(native))
    assert expected[0] == [4096, 1 << 16] and expected[2] == data
    with RofsProcess(mnt, layers["state"], lower, ("--no-open",)) as proc:
        assert copies(mnt) == expected
    assert not proc.internal_errors(), proc.output()


def test_a_listing_kept_up_to_date_name_by_name_stays_right(layers):
    """Listings by node are taken once and then given each new name (folded in past
    4,096 and a sixteenth, taken again when most of it came and went): through
    thousands of changes, listings made in between, fresh and resumed, show exactly the
    names there are."""
    first = {"low%04d" % i for i in range(5000)}
    os.mkdir(os.path.join(layers["lower"], "churn"))
    for name in first:
        with open(os.path.join(layers["lower"], "churn", name), "w"):
            pass
    with RofsProcess(layers["mnt"], layers["state"], layers["lower"], args=("--no-open",)):
        d = os.path.join(layers["mnt"], "churn")
        there = set(first)
        held = os.scandir(d)  # a listing resumed across all the changes below
        resumed = {next(held).name}
        made = set()
        for round_ in range(5):
            for i in range(900):
                name = "r%d-%d" % (round_, i)
                with open(os.path.join(d, name), "w"):
                    pass
                made.add(name)
                there.add(name)
                if i % 3:  # most of them go again
                    os.unlink(os.path.join(d, name))
                    there.discard(name)
            os.rename(os.path.join(d, "low%04d" % round_), os.path.join(d, "moved%d" % round_))
            there -= {"low%04d" % round_}
            there.add("moved%d" % round_)
            assert sorted(os.listdir(d)) == sorted(there), round_
        resumed_list = [next(held).name] + [e.name for e in held]
        held.close()
        # Every name there all along is listed once; names that came and went may or
        # may not be (as on any filesystem), but none twice.
        assert len(resumed_list) == len(set(resumed_list))
        resumed |= set(resumed_list)
        stayed = first - {"low%04d" % r for r in range(5)}
        assert stayed <= resumed <= first | made | {"moved%d" % r for r in range(5)}


def test_offsets_sorted_in_pieces_are_sorted():
    """A big directory's offsets are sorted in pieces (one sort of 200,000 held the
    interpreter lock, and with it the request loop, for tens of milliseconds): the
    same order as one sort, for every size around the pieces and at the edges of the
    offsets' range."""
    from rofs.overlay.listings import SORT_PIECE, _cookie, _sort_in_pieces
    for n in (0, 1, SORT_PIECE, SORT_PIECE + 1, 3 * SORT_PIECE + 7, 100_000):
        cookies = [_cookie(b"k" * 16, b"n%d" % i) for i in range(n)]
        assert _sort_in_pieces(cookies) == sorted(cookies), n
    edges = [3, 4, (1 << 61) + 2, (1 << 61) + 1, 1 << 60] * (SORT_PIECE // 2)
    assert _sort_in_pieces(edges) == sorted(edges)


def test_files_created_after_the_first_open_hold_no_descriptor_each(layers):
    """Once the kernel knows OPEN is not implemented it sends no RELEASE, not even for
    the file handle a CREATE gave it: each created file held a descriptor of rofs's
    until the unmount (a user creating files ran the daemon out of them)."""
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"], args=("--no-open",))
    with proc:
        with open(os.path.join(layers["mnt"], "passwd"), "rb") as f:  # OPEN: ENOSYS
            f.read()
        for i in range(NODE_HANDLES + 100):
            with open(os.path.join(layers["mnt"], "new%d" % i), "w") as f:
                f.write("%d\n" % i)
        with open(os.path.join(layers["mnt"], "new7")) as f:
            assert f.read() == "7\n"
        (status,) = json.loads(rofs_out("status", "--json", layers["mnt"]))
        assert status["file_fds"] <= NODE_HANDLES + 1, status
        events, _, _ = load_events([layers["state"]])
        assert [e["op"] for e in events if e["path"].endswith("/new7")] == ["create"]
