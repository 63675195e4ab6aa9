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
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import socket
import threading
import time

from rofs.names import quote, quote_path

log = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # rotate above this size
KEEP = 4  # rotated files kept: NAME.1 .. NAME.4
FLUSH_SECONDS = 1.0
RECHECK_SECONDS = 1.0  # how long a pid's identity is trusted without looking again
# 2: every name (paths, comm, exe, cmd, script, host) in the escaped form of rofs.names;
# lines without "v" hold names decoded with surrogateescape (rofs.report reads both).
LOG_VERSION = 2


class ProcessCache:
    """pid -> (comm, exe, cmdline), for processes making changes."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[float, bytes, tuple]] = {}

    def info(self, pid: int) -> tuple:
        now = time.monotonic()
        entry = self._cache.get(pid)
        if entry is not None and now - entry[0] < RECHECK_SECONDS:
            return entry[2]
        start = _start_time(pid)
        if entry is not None and entry[1] == start:
            self._cache[pid] = (now, start, entry[2])
            return entry[2]
        info = _read_process(pid)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[pid] = (now, start, info)
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
        self.dropped = 0
        self.written = 0
        # Appended by the request loop, drained by the writer thread (deque operations
        # are atomic, so neither side takes a lock).
        self._pending: collections.deque[tuple] = collections.deque()
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
        self._pending.append((time.time(), pid, uid, self.processes.info(pid), op,
                              path, path2, result, cls, rule, new))

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            events = []
            pending = self._pending
            while pending:
                events.append(pending.popleft())
            if not events:
                return
            lines = []
            for t, pid, uid, process, op, path, path2, result, cls, rule, new in events:
                comm, exe, cmd, script = process
                event = {"v": LOG_VERSION, "t": round(t, 6), "host": self.host,
                         "mount": self._mount, "pid": pid, "uid": uid, "comm": quote(comm),
                         "exe": quote(exe), "cmd": [quote(a) for a in cmd],
                         "script": quote(script) if script is not None else None,
                         "op": op, "path": self.absolute(path) if path is not None else None,
                         "result": result, "class": cls,
                         "rule": self.absolute(rule) if rule is not None else None}
                if path2 is not None:
                    event["path2"] = self.absolute(path2)
                if new:
                    event["new"] = True
                lines.append(json.dumps(event, separators=(",", ":")))
            data = ("\n".join(lines) + "\n").encode()
            try:
                self._append(data)
            except OSError as e:
                if not self.dropped:
                    log.warning("write log %s: %s; dropping events until it works again",
                                self.path, e.strerror)
                self.dropped += len(events)
                return
            self.written += len(events)

    def _append(self, data: bytes) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
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
