"""Who writes where: a log of every change made through the mount (rolo, built in).

Each change (and each change the read-only class refused) becomes one JSON line:

    {"v": 3, "t": 1795000000.123, "host": "web1", "mount": "/etc", "pid": 4242,
     "uid": 0, "comm": "passwd", "proc": "4242-81734", "op": "rename",
     "path": "/etc/nshadow", "path2": "/etc/shadow", "result": "ok",
     "class": "persistent", "rule": "/etc/shadow"}

and each process that made one, once per file before its first event there, a record
with its executable, command line and script: {"v": 3, "proc": "4242-81734", ...}.
`result` is "ok" or the errno name (EROFS for a denied write); `class` is the path's
policy class and `rule` the path of the policy rule that decided it (null: the default).
`write` carries no caller in FUSE: it is attributed to the process that opened the file,
and logged once per open file (at its first write), not once per write call.

Cost on the request path: the caller's /proc entries are read once per process (cached
by pid and checked against the process start time, so a reused pid is noticed), and an
event is one tuple appended to a list.  A background thread turns the list into JSON
lines every second and appends them to STATE/.rofs/log/<mount>.jsonl (root's events)
or <mount>.uid-N.jsonl (every other uid's), rotating each by size (`.1` is the newest
old one).  If the log cannot be written (full disk), events are dropped and counted;
requests never fail because of the log.

No user can erase another's events, and what a user controls costs bounded memory,
disk and time (docs/reliability.md): each uid other than root has files of its own,
kept within a size, and the system users' and the users' files within a total, by
removing the oldest file of whichever uid holds the most; events waiting for the
writer are bounded per uid and per account (root, system users, users), beyond which
that uid's new ones are dropped; every event cut (dropped, or in a file rotated out) is
counted per uid in <mount>.cuts.json, which `rofs report` shows.  A command line is
kept to its first MAX_CMDLINE bytes and written once per process and file; the process
cache is an LRU bounded in bytes; the writer encodes BATCH events at a time and writes
CHUNK bytes at a time, rotating between chunks, so no file grows far beyond its size;
and it leaves a reserve of the state filesystem free for the changes themselves (twice
that for other uids' events, so root's go on after theirs stop).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import socket
import sys
import threading
import time

from rofs import crash
from rofs._sys import name_this_thread, write_all
from rofs.store.quoting import quote, quote_path

log = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # rotate above this size
KEEP = 4  # rotated files kept: NAME.1 .. NAME.4
FLUSH_SECONDS = 1.0
MAX_CACHE_BYTES = 8 << 20  # what the process cache may hold
# Events waiting for the writer: beyond this (events plus the path components they hold)
# new ones are dropped and counted, so a process making changes faster than the log is
# written costs no more memory than this.
MAX_PENDING_COST = 1 << 20
BATCH = 2000  # events encoded at a time
CHUNK = 256 << 10  # bytes written at a time (rotation is checked between chunks)
# Free space the log leaves on the state filesystem, for the changes themselves: 5% of
# it, at least 1 MiB and at most 64 MiB.  Below that, events are dropped and counted.
RESERVE_FRACTION, RESERVE_MIN, RESERVE_MAX = 0.05, 1 << 20, 64 << 20
RECHECK_SECONDS = 1.0  # how long a pid's identity is trusted without looking again
# 3: a process's exe, cmd and script are in a record of their own ("proc"), once per file,
# which its events name; 2: every name (paths, comm, exe, cmd, script, host) in the escaped
# form of rofs.store.quoting; lines without "v" hold names decoded with surrogateescape
# (rofs.commands.report reads them all).
LOG_VERSION = 3


class ProcessCache:
    """pid -> (comm, exe, cmdline, script, key), for processes making changes, key being
    "PID-STARTTIME" (one process's for the whole boot): an LRU bounded in bytes (what a
    process shows is its own to choose; a command line is cut at MAX_CMDLINE, and many
    processes still make many entries)."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: collections.OrderedDict[int, tuple[float, bytes, tuple, int]] = \
            collections.OrderedDict()

    def info(self, pid: int) -> tuple:
        now = time.monotonic()
        entry = self._cache.get(pid)
        if entry is not None and now - entry[0] < RECHECK_SECONDS:
            self._cache.move_to_end(pid)
            return entry[2]
        start = _start_time(pid)
        if entry is not None and entry[1] == start:
            self._cache[pid] = (now, start, entry[2], entry[3])
            self._cache.move_to_end(pid)
            return entry[2]
        info = _read_process(pid) + ("%d-%s" % (pid, start.decode("ascii", "replace")),)
        comm, exe, cmd, script, _ = info
        cost = 256 + len(comm) + len(exe) + len(script or b"") + sum(len(a) + 8 for a in cmd)
        if entry is not None:
            self.bytes -= entry[3]
        self._cache[pid] = (now, start, info, cost)
        self._cache.move_to_end(pid)
        self.bytes += cost
        while self.bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self.bytes -= old[3]
        return info


def _start_time(pid: int) -> bytes:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return b""
    # comm may hold spaces and parentheses: the fields start after the last ")".
    fields = data[data.rfind(b")") + 2:].split()
    return fields[19] if len(fields) > 19 else b""


MAX_CMDLINE = 4096  # bytes of a command line kept (argv is the caller's to choose)

# Programs that run a script named on their command line: a change they make is the
# script's (the kernel passes a #! script's path as an argument to its interpreter).
# Per family: the options whose next argument is inline code (no script), and those
# whose next argument is something else.
_INTERPRETERS = [
    (re.compile(rb"((ba|da|k|mk|z|c|tc|fi|y)?sh|busybox)"), {b"-c"}, {b"-o", b"+o"}),
    (re.compile(rb"(perl|ruby)[0-9.]*"), {b"-e", b"-E"}, {b"-I", b"-r"}),
    (re.compile(rb"(python|pypy)[0-9.]*"), {b"-c", b"-m"}, {b"-W", b"-X"}),
    (re.compile(rb"node(js)?"), {b"-e", b"--eval", b"-p", b"--print"}, {b"-r", b"--require"}),
    (re.compile(rb"(php|lua|luajit|tclsh|wish|Rscript|guile)[0-9.]*"), {b"-e", b"-r", b"-c"},
     set()),
]


def script_of(exe: bytes, cmd: list[bytes]) -> bytes | None:
    """The script an interpreter runs, from its command line (None: not an interpreter,
    or inline code).  Relative paths stay relative (the caller resolves them)."""
    name = os.path.basename(exe)
    family = next((f for f in _INTERPRETERS if f[0].fullmatch(name)), None)
    if family is None:
        if re.fullmatch(rb"[gmn]?awk", name):  # awk -f SCRIPT; otherwise inline code
            return next((cmd[i + 1] for i, arg in enumerate(cmd[1:-1], 1) if arg == b"-f"),
                        None)
        return None
    _, inline, with_argument = family
    args = iter(cmd[1:])
    for arg in args:
        if arg in inline:
            return None
        if arg == b"--":
            return next(args, None)
        if arg in with_argument:
            next(args, None)
        elif not arg.startswith((b"-", b"+")):
            return arg
    return None


def _read_process(pid: int) -> tuple[bytes, bytes, list[bytes], bytes | None]:
    """(comm, exe, command line, script) of a process, as the system has them (bytes);
    the command line cut at MAX_CMDLINE bytes, with a last element saying so."""
    base = "/proc/%d/" % pid
    comm = exe = b""
    cmd: list[bytes] = []
    try:
        with open(base + "comm", "rb") as f:
            comm = f.read().rstrip(b"\n")
    except OSError:
        pass
    try:
        exe = os.readlink(base + "exe").encode("utf-8", "surrogateescape")
    except OSError:
        pass
    try:
        with open(base + "cmdline", "rb") as f:
            data = f.read(MAX_CMDLINE + 1)
        cmd = data[:MAX_CMDLINE].split(b"\0")
        if len(data) > MAX_CMDLINE:
            cmd.append(b"...(cut at %d bytes)" % MAX_CMDLINE)
        elif cmd and cmd[-1] == b"":
            cmd.pop()
    except OSError:
        pass
    script = script_of(exe, cmd)
    if script is not None and not script.startswith(b"/"):
        try:
            script = os.path.join(os.readlink(base + "cwd").encode("utf-8", "surrogateescape"),
                                  script)
        except OSError:
            pass
    return comm, exe, cmd, script


ROOT, SYSTEM, USERS = "root", "system", "users"
FIRST_USER_UID = 1000  # Debian's and Fedora's UID_MIN: below are system users


def account(uid: int) -> str:
    """Whose share of the log a uid's events take: root's own, the system users' or the
    users'."""
    return ROOT if uid == 0 else SYSTEM if uid < FIRST_USER_UID else USERS


# Events waiting for the writer, in cost units (an event plus its path components):
# root's have a pool of their own, system users and users one each, and one uid other
# than root may hold SHARE of its pool, so one user's burst never drops another's events.
SHARE = 1 / 64
# Each uid other than root writes a log file of its own (NAME.uid-N.jsonl), rotated at
# USER_MAX_BYTES with one old file kept; the system users' files and the users' files
# are each kept within ACCOUNT_MAX_BYTES and ACCOUNT_MAX_FILES, by removing the oldest
# file of the uid that holds the most.  So no uid can rotate another's events out.
USER_MAX_BYTES = 1 << 20
USER_KEEP = 1
ACCOUNT_MAX_BYTES = 32 << 20
ACCOUNT_MAX_FILES = 256
# Kinds of cut, counted per uid: dropped because the uid's share of the queue was full,
# for want of space, because the log could not be written, or rotated out (old files).
CUTS = ("queue", "space", "error", "rotated")
MAX_CUT_UIDS = 4096  # uids counted one by one; beyond, together under "other"
_USER_LOG = re.compile(r"\.uid-([0-9]+)\.jsonl(\.[0-9]+)?$")


class WriteLog:
    """Collects change events and writes them as JSON lines from a background thread."""

    def __init__(self, path: str, mountpoint: str, *, max_bytes: int = MAX_BYTES,
                 keep: int = KEEP) -> None:
        self.path = path
        self.mountpoint = mountpoint.rstrip("/") or "/"
        self.max_bytes = max_bytes
        self.keep = keep
        self.host = quote(socket.gethostname())
        self._mount = quote(self.mountpoint)
        self.processes = ProcessCache()
        self.written = 0
        # Appended by the request loop, drained by the writer thread; what each uid and
        # each pool holds is counted under _queue_lock.
        self._pending: collections.deque[tuple] = collections.deque()
        self._queue_lock = threading.Lock()
        self._pool_cost = {ROOT: 0, SYSTEM: 0, USERS: 0}
        self._uid_cost: dict[int, int] = {}
        self._queue_warned: set[str] = set()
        # Cuts per uid (CUTS), kept in NAME.cuts.json across mounts for `rofs report`.
        self.cuts_path = cuts_file(path)
        self._cuts: dict[str, collections.Counter] = _read_cuts(self.cuts_path)
        self._cuts_changed = False
        self._short_of_space: set[str] = set()
        # The writer's own: sizes of the other uids' log files, and which processes each
        # recently written file already describes (forgotten files describe again).
        self._sizes: dict[str, int] = self._user_logs()
        self._described: collections.OrderedDict[str, set] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rofs-writelog", daemon=True)
        self._thread.start()

    def absolute(self, path: tuple[bytes, ...]) -> str:
        """The escaped absolute path of a path below the mount."""
        return quote_path(path, self._mount)

    def file_of(self, uid: int) -> str:
        """The log file of a uid's events: root's is the mount's log itself."""
        if uid == 0:
            return self.path
        return "%s.uid-%d.jsonl" % (self.path[:-len(".jsonl")], uid)

    def record(self, op: str, pid: int, uid: int, path: tuple[bytes, ...] | None,
               path2: tuple[bytes, ...] | None, result: str, cls: str,
               rule: tuple[bytes, ...] | None = None, new: bool = False) -> None:
        cost = 1 + len(path or ()) + len(path2 or ())
        pool = account(uid)
        with self._queue_lock:
            in_pool = self._pool_cost[pool] + cost
            mine = self._uid_cost.get(uid, 0) + cost
            full = in_pool > MAX_PENDING_COST or (uid and mine > MAX_PENDING_COST * SHARE)
            if not full:
                self._pool_cost[pool] = in_pool
                self._uid_cost[uid] = mine
        if full:
            self._cut(uid, "queue")
            self._wake.set()
            return
        if mine > MAX_PENDING_COST * SHARE / 2:
            self._wake.set()  # the writer goes now rather than at its next second
        self._pending.append((time.time(), pid, uid, self.processes.info(pid), op,
                              path, path2, result, cls, rule, new, cost))

    def _cut(self, uid: int, kind: str, n: int = 1) -> None:
        key = str(uid)
        with self._queue_lock:
            if key not in self._cuts and len(self._cuts) >= MAX_CUT_UIDS:
                key = "other"
            self._cuts.setdefault(key, collections.Counter())[kind] += n
            self._cuts_changed = True

    def _run(self) -> None:
        name_this_thread()
        reported = 0.0
        while not self._stop:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a bug: the log goes on with the next batch
                if time.monotonic() - reported > 60:
                    reported = time.monotonic()
                    log.exception("write log: internal error; the events of a batch "
                                  "are lost")

    def flush(self) -> None:
        """Write out what is pending, BATCH events at a time (the request loop gets the
        interpreter between batches)."""
        with self._lock:
            pending = self._pending
            while pending:
                events = []
                while pending and len(events) < BATCH:
                    events.append(pending.popleft())
                with self._queue_lock:
                    for e in events:
                        uid, cost = e[2], e[-1]
                        self._pool_cost[account(uid)] -= cost
                        left = self._uid_cost[uid] - cost
                        if left:
                            self._uid_cost[uid] = left
                        else:
                            del self._uid_cost[uid]
                crash.pause("writelog:write")
                for uid, items in self._encode(events).items():
                    self._write(uid, items)
            self._warn_queue()
            if self._cuts_changed:
                self._save_cuts()

    @property
    def dropped(self) -> int:
        """Events lost (not counting those rotated out)."""
        with self._queue_lock:
            return sum(c[kind] for c in self._cuts.values() for kind in CUTS[:3])

    def _has_cut(self, kind: str) -> bool:
        with self._queue_lock:
            return any(c[kind] for c in self._cuts.values())

    def _warn_queue(self) -> None:
        """One warning per uid's account the first time its events are dropped."""
        with self._queue_lock:
            cut = {account(int(u)) if u.isdigit() else USERS
                   for u, c in self._cuts.items() if c["queue"]}
        for pool in sorted(cut - self._queue_warned):
            self._queue_warned.add(pool)
            log.warning("write log: changes of %s come faster than the log is written; "
                        "dropping (and counting, per uid) the events over their share "
                        "until it catches up", pool)

    def _encode(self, events: list[tuple]) -> dict[int, list[tuple[str, bytes, bytes]]]:
        """Per uid, its events: (process key, the process's record, the event's line)."""
        out: dict[int, list[tuple[str, bytes, bytes]]] = {}
        records: dict[tuple[int, str], bytes] = {}
        for t, pid, uid, process, op, path, path2, result, cls, rule, new, _ in events:
            comm, exe, cmd, script, key = process
            record = records.get((uid, key))
            if record is None:
                record = records[uid, key] = (json.dumps({
                    "v": LOG_VERSION, "proc": key, "t": round(t, 6), "host": self.host,
                    "mount": self._mount, "pid": pid, "uid": uid, "comm": quote(comm),
                    "exe": quote(exe), "cmd": [quote(a) for a in cmd],
                    "script": quote(script) if script is not None else None},
                    separators=(",", ":")) + "\n").encode()
            event = {"v": LOG_VERSION, "t": round(t, 6), "host": self.host,
                     "mount": self._mount, "pid": pid, "uid": uid, "comm": quote(comm),
                     "proc": key, "op": op,
                     "path": self.absolute(path) if path is not None else None,
                     "result": result, "class": cls,
                     "rule": self.absolute(rule) if rule is not None else None}
            if path2 is not None:
                event["path2"] = self.absolute(path2)
            if new:
                event["new"] = True
            out.setdefault(uid, []).append(
                (key, record, (json.dumps(event, separators=(",", ":")) + "\n").encode()))
        return out

    def _described_in(self, path: str) -> set:
        """The processes a file has records of (as far as this writer knows)."""
        described = self._described.get(path)
        if described is None:
            described = self._described[path] = set()
            while len(self._described) > 64:
                self._described.popitem(last=False)
        self._described.move_to_end(path)
        return described

    def _write(self, uid: int, items: list[tuple[str, bytes, bytes]]) -> None:
        """Append a uid's events to its file in chunks, each process's record before its
        first event in the file: rotated between chunks so that no file grows much beyond
        its size, and never into the state filesystem's reserve."""
        path = self.file_of(uid)
        max_bytes, keep = (self.max_bytes, self.keep) if uid == 0 else \
            (USER_MAX_BYTES, USER_KEEP)
        i = 0
        while i < len(items):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = 0
            except OSError:
                size = 0
            chunk, keys, end = _chunk(items, i, self._described_in(path))
            try:
                if size and size + len(chunk) > max_bytes:
                    self._rotate(uid, path, keep)
                    size = 0
                    chunk, keys, end = _chunk(items, i, self._described_in(path))
                if not self._room_for(len(chunk), account(uid)):
                    self._cut(uid, "space", len(items) - i)
                    return
                self._append(path, chunk)
            except OSError as e:
                if not self._has_cut("error"):
                    log.warning("write log %s: %s; dropping events until it works again",
                                path, e.strerror)
                self._cut(uid, "error", len(items) - i)
                return
            self._described_in(path).update(keys)
            if uid:
                self._sizes[path] = size + len(chunk)
                self._vacuum(account(uid))
            self.written += end - i
            i = end

    def _room_for(self, n: int, pool: str) -> bool:
        """Whether writing n bytes leaves the state filesystem its reserve (root's log may
        write into the second half of what other uids' logs leave; one warning when a
        log stops, a note when it goes on again)."""
        st = os.statvfs(os.path.dirname(self.path))
        reserve = min(RESERVE_MAX, max(RESERVE_MIN, int(st.f_blocks * st.f_frsize *
                                                        RESERVE_FRACTION)))
        if pool != ROOT:
            reserve *= 2
        room = st.f_bavail * st.f_frsize - n >= reserve
        if not room and pool not in self._short_of_space:
            self._short_of_space.add(pool)
            log.warning("write log: less than %d MiB left on the state filesystem; "
                        "dropping (and counting) %s events, so that the space stays for "
                        "the changes themselves", reserve >> 20,
                        "root's" if pool == ROOT else "other uids'")
        elif room and pool in self._short_of_space:
            self._short_of_space.discard(pool)
            log.info("write log: space again, writing %s events (%d dropped)",
                     "root's" if pool == ROOT else "other uids'", self.dropped)
        return room

    def _append(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def _rotate(self, uid: int, path: str, keep: int) -> None:
        self._drop_file("%s.%d" % (path, keep), uid)
        for i in range(keep - 1, 0, -1):
            older = "%s.%d" % (path, i)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (path, i + 1))
                if uid:
                    self._sizes["%s.%d" % (path, i + 1)] = self._sizes.pop(older, 0)
        os.replace(path, path + ".1")
        if uid:
            self._sizes[path + ".1"] = self._sizes.pop(path, 0)
        self._described.pop(path, None)

    def _drop_file(self, path: str, uid: int) -> None:
        """Remove an old log file, counting its events as rotated out."""
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        self._cut(uid, "rotated", sum(1 for line in lines if not line.startswith(
            b'{"v":%d,"proc"' % LOG_VERSION)))
        os.unlink(path)
        self._sizes.pop(path, None)
        self._described.pop(path, None)

    def _user_logs(self) -> dict[str, int]:
        """Sizes of the other uids' log files of this mount, as found."""
        sizes = {}
        directory, prefix = os.path.split(self.path[:-len(".jsonl")])
        try:
            names = os.listdir(directory)
        except OSError:
            return sizes
        for name in names:
            if name.startswith(prefix + ".uid-") and _USER_LOG.search(name):
                try:
                    sizes[os.path.join(directory, name)] = os.stat(
                        os.path.join(directory, name)).st_size
                except OSError:
                    pass
        return sizes

    def _vacuum(self, pool: str) -> None:
        """Keep the pool's files within ACCOUNT_MAX_BYTES and ACCOUNT_MAX_FILES: the uid
        holding most loses its oldest file first."""
        while True:
            per_uid: dict[int, list[str]] = {}
            total = 0
            for path, size in self._sizes.items():
                uid = int(_USER_LOG.search(path).group(1))
                if account(uid) == pool:
                    per_uid.setdefault(uid, []).append(path)
                    total += size
            files = sum(len(p) for p in per_uid.values())
            if total <= ACCOUNT_MAX_BYTES and files <= ACCOUNT_MAX_FILES:
                return
            uid = max(per_uid, key=lambda u: sum(self._sizes[p] for p in per_uid[u]))
            oldest = max(per_uid[uid], key=lambda p: (_USER_LOG.search(p).group(2) or ".0"))
            self._drop_file(oldest, uid)

    def _save_cuts(self) -> None:
        with self._queue_lock:
            cuts = {uid: dict(c) for uid, c in self._cuts.items()}
            self._cuts_changed = False
        data = json.dumps({"v": 1, "host": self.host, "mount": self._mount, "cuts": cuts},
                          separators=(",", ":")).encode()
        tmp = self.cuts_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.cuts_path)
        except OSError as e:
            log.warning("write log: cannot save %s: %s", self.cuts_path, e.strerror)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        if self.dropped:
            log.warning("write log: %d events could not be written", self.dropped)


def _chunk(items: list[tuple[str, bytes, bytes]], i: int, described: set
           ) -> tuple[bytes, set, int]:
    """The lines of items[i:] that fit in CHUNK bytes (at least one event), with the
    records of processes the file does not describe yet; also those processes and the
    index of the first item left out."""
    out, n, keys = [], 0, set()
    while i < len(items):
        key, record, line = items[i]
        add = [line] if key in described or key in keys else [record, line]
        size = sum(len(x) for x in add)
        if out and n + size > CHUNK:
            break
        out += add
        n += size
        keys.add(key)
        i += 1
    return b"".join(out), keys, i


def cuts_file(log_path: str) -> str:
    """Where the cuts of a mount's log (any of its files) are counted: NAME.cuts.json."""
    directory, name = os.path.split(log_path)
    base = _USER_LOG.sub("", name)
    base = base.split(".jsonl")[0]
    return os.path.join(directory, base + ".cuts.json")


def _read_cuts(path: str) -> dict[str, collections.Counter]:
    try:
        with open(path, "rb") as f:
            cuts = json.load(f)["cuts"]
        return {str(uid): collections.Counter({k: int(v) for k, v in c.items() if k in CUTS})
                for uid, c in cuts.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_cuts(log_files: list[str]) -> list[dict]:
    """The cuts counted for the mounts whose log files these are: one dict per mount
    (host, mount, cuts: {uid: {kind: n}}), each read once."""
    out = []
    for path in sorted({cuts_file(p) for p in log_files}):
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("cuts"), dict):
            out.append(data)
    return out


def log_files(path: str) -> list[str]:
    """The log files a report reads for `path`: a file itself, or every log (rotated
    ones first, oldest first) under a state dir's .rofs/log/ or in a directory."""
    if os.path.isfile(path):
        return [path]
    logdir = os.path.join(path, ".rofs", "log")
    if not os.path.isdir(logdir):
        logdir = path
    if not os.path.isdir(logdir):
        raise FileNotFoundError(path)
    out = []
    for dirpath, _, names in sorted(os.walk(logdir)):
        for name in names:
            if ".jsonl" in name:
                out.append(os.path.join(dirpath, name))

    def order(p: str):
        base, _, suffix = p.rpartition(".jsonl")
        rotated = int(suffix[1:]) if suffix[1:].isdigit() else 0
        return base, -rotated

    return sorted(out, key=order)


def append_events(path: str, mountpoint: str, op: str,
                  entries: list[tuple[str, str, str, str | None]]) -> None:
    """Append events of rofs's own tools (`rofs reconcile`, a mount's reconcile) to a
    write log, now: (escaped path, action, detail, escaped second path) each, as this
    process (comm "rofs").  OSError when the log cannot be written."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    mountpoint = mountpoint.rstrip("/") or "/"
    who = {"comm": "rofs", "exe": quote(os.path.realpath(sys.argv[0])) if sys.argv[0]
           else "rofs", "cmd": [quote(a) for a in sys.argv], "script": None}
    lines = []
    for shown, action, detail, path2 in entries:
        event = {"v": LOG_VERSION, "t": round(time.time(), 6),
                 "host": quote(socket.gethostname()), "mount": quote(mountpoint),
                 "pid": os.getpid(), "uid": os.getuid(), "op": op, "path": shown,
                 "result": "ok", "class": "persistent", "rule": None, "action": action,
                 "detail": detail}
        if path2 is not None:
            event["path2"] = path2
        event.update(who)
        lines.append(json.dumps(event, separators=(",", ":")) + "\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, "".join(lines).encode())
    finally:
        os.close(fd)
