"""Who writes where: a log of every change made through the mount (rolo, built in).

Each change (and each change the read-only class refused) becomes one JSON line:

    {"t": 1795000000.123, "host": "web1", "mount": "/etc", "pid": 4242, "uid": 0,
     "comm": "passwd", "exe": "/usr/bin/passwd", "cmd": ["passwd", "alice"],
     "op": "rename", "path": "/etc/nshadow", "path2": "/etc/shadow",
     "result": "ok", "class": "persistent", "rule": "/etc/shadow"}

`result` is "ok" or the errno name (EROFS for a denied write); `class` is the path's
policy class and `rule` the path of the policy rule that decided it (null: the default).
`write` carries no caller in FUSE: it is attributed to the process that opened the file,
and logged once per open file (at its first write), not once per write call.

Cost on the request path: the caller's /proc entries are read once per process (cached
by pid and checked against the process start time, so a reused pid is noticed), and an
event is one tuple appended to a list.  A background thread turns the list into JSON
lines every second, appends them to STATE/.rofs/log/<mount>.jsonl and rotates the file
by size (`.1` is the newest old one).  If the log cannot be written (full disk), events
are dropped and counted; requests never fail because of the log.

What a user controls costs bounded memory, disk and time (docs/reliability.md): a
command line is kept to its first MAX_CMDLINE bytes; the process cache is an LRU bounded
in bytes; events waiting for the writer are bounded (beyond, new ones are dropped and
counted); the writer encodes BATCH events at a time and writes CHUNK bytes at a time,
rotating between chunks, so no file grows far beyond max_bytes; and it leaves a reserve
of the state filesystem free for the changes themselves.
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

from rofs._sys import write_all
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
# 2: every name (paths, comm, exe, cmd, script, host) in the escaped form of rofs.store.quoting;
# lines without "v" hold names decoded with surrogateescape (rofs.commands.report reads both).
LOG_VERSION = 2


class ProcessCache:
    """pid -> (comm, exe, cmdline, script), for processes making changes: an LRU bounded
    in bytes (what a process shows is its own to choose; a command line is cut at
    MAX_CMDLINE, and many processes still make many entries)."""

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
        info = _read_process(pid)
        comm, exe, cmd, script = info
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
        # Events lost, counted by the writer (no space, an error) and by the request
        # loop (the queue full), each in a counter only it writes; `dropped` sums them.
        self._dropped_writer = 0
        self._dropped_queue = 0
        self._queue_warned = False
        self.written = 0
        # Appended by the request loop, drained by the writer thread (deque operations
        # are atomic, so neither side takes a lock).  Each side counts the cost of what
        # it queued or took in a counter only it writes.
        self._pending: collections.deque[tuple] = collections.deque()
        self._queued_cost = 0
        self._drained_cost = 0
        self._short_of_space = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rofs-writelog", daemon=True)
        self._thread.start()

    def absolute(self, path: tuple[bytes, ...]) -> str:
        """The escaped absolute path of a path below the mount."""
        return quote_path(path, self._mount)

    def record(self, op: str, pid: int, uid: int, path: tuple[bytes, ...] | None,
               path2: tuple[bytes, ...] | None, result: str, cls: str,
               rule: tuple[bytes, ...] | None = None, new: bool = False) -> None:
        cost = 1 + len(path or ()) + len(path2 or ())
        if self._queued_cost - self._drained_cost + cost > MAX_PENDING_COST:
            self._dropped_queue += 1
            self._wake.set()
            return
        self._queued_cost += cost
        self._pending.append((time.time(), pid, uid, self.processes.info(pid), op,
                              path, path2, result, cls, rule, new, cost))

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write out what is pending, BATCH events at a time (the request loop gets the
        interpreter between batches)."""
        with self._lock:
            pending = self._pending
            while pending:
                events = []
                while pending and len(events) < BATCH:
                    events.append(pending.popleft())
                self._drained_cost += sum(e[-1] for e in events)
                self._write(self._encode(events))
            if self._dropped_queue and not self._queue_warned:
                self._queue_warned = True
                log.warning("write log: changes come faster than the log is written; "
                            "dropping (and counting) events until it catches up")

    @property
    def dropped(self) -> int:
        return self._dropped_writer + self._dropped_queue

    def _encode(self, events: list[tuple]) -> list[bytes]:
        lines = []
        who: dict[int, str] = {}  # the JSON of each process's fields, once per batch
        for t, pid, uid, process, op, path, path2, result, cls, rule, new, _ in events:
            fields = who.get(id(process))
            if fields is None:
                comm, exe, cmd, script = process
                fields = who[id(process)] = json.dumps({
                    "comm": quote(comm), "exe": quote(exe), "cmd": [quote(a) for a in cmd],
                    "script": quote(script) if script is not None else None},
                    separators=(",", ":"))[1:-1]
            event = {"v": LOG_VERSION, "t": round(t, 6), "host": self.host,
                     "mount": self._mount, "pid": pid, "uid": uid,
                     "op": op, "path": self.absolute(path) if path is not None else None,
                     "result": result, "class": cls,
                     "rule": self.absolute(rule) if rule is not None else None}
            if path2 is not None:
                event["path2"] = self.absolute(path2)
            if new:
                event["new"] = True
            text = json.dumps(event, separators=(",", ":"))
            lines.append((text[:-1] + "," + fields + "}\n").encode())
        return lines

    def _write(self, lines: list[bytes]) -> None:
        """Append lines in chunks: rotated between chunks so that no file grows much
        beyond max_bytes, and never into the state filesystem's reserve."""
        i = 0
        while i < len(lines):
            chunk, n = [], 0
            while i < len(lines) and (not chunk or n + len(lines[i]) <= CHUNK):
                chunk.append(lines[i])
                n += len(lines[i])
                i += 1
            try:
                if not self._room_for(n):
                    self._dropped_writer += len(chunk) + len(lines) - i
                    return
                self._append(b"".join(chunk))
            except OSError as e:
                if not self.dropped:
                    log.warning("write log %s: %s; dropping events until it works again",
                                self.path, e.strerror)
                self._dropped_writer += len(chunk) + len(lines) - i
                return
            self.written += len(chunk)

    def _room_for(self, n: int) -> bool:
        """Whether writing n bytes leaves the state filesystem its reserve (one warning
        when it stops, a note when it goes on again)."""
        st = os.statvfs(os.path.dirname(self.path))
        reserve = min(RESERVE_MAX, max(RESERVE_MIN, int(st.f_blocks * st.f_frsize *
                                                        RESERVE_FRACTION)))
        room = st.f_bavail * st.f_frsize - n >= reserve
        if not room and not self._short_of_space:
            log.warning("write log: less than %d MiB left on the state filesystem; "
                        "dropping (and counting) events, so that the space stays for the "
                        "changes themselves", reserve >> 20)
        elif room and self._short_of_space:
            log.info("write log: space again, writing events (%d dropped)", self.dropped)
        self._short_of_space = not room
        return room

    def _append(self, data: bytes) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = "%s.%d" % (self.path, i)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (self.path, i + 1))
        os.replace(self.path, self.path + ".1")

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        if self.dropped:
            log.warning("write log: %d events could not be written", self.dropped)


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
