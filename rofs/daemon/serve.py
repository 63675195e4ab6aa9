"""Mount and serve: open the layers, mount (rofs.fuse), run the loop, unmount cleanly.

Sequence (so that `rofs /etc --state S` works on /etc itself): the lower directory and
the state dir are opened *before* the mount; afterwards rofs reaches them only through
those descriptors.

Without --foreground the process forks first; the parent waits until the child's mount
answers requests (FUSE_INIT), then exits 0, or prints the child's error and exits
non-zero.  SIGTERM/SIGINT/SIGHUP end the main loop; the daemon then unmounts (lazily
if busy) and exits 0.  An unmount from outside (umount, fusermount3 -u) ends it too.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from rofs import __version__, _sys, crash
from rofs import fuse as fuse_channel
from rofs.daemon import control, handover, scratch
from rofs.daemon.collector import Collector
from rofs.daemon.keeper import DONE, HANDOVER, SERVING, STOPPED, Keeper, sweep
from rofs.fuse import mount as fuse_mount
from rofs.ops import RofsOperations
from rofs.overlay import Overlay
from rofs.store import attic, origin, reconcile, registry, state
from rofs.store.journal import Journal
from rofs.store.layers import UpperLayer, lstat_below
from rofs.store.policy import BUILT_IN_SOURCE, Policy
from rofs.store.quoting import count, quote, quote_path
from rofs.store.writelog import WriteLog

log = logging.getLogger(__name__)

BASE_OPTIONS = ("fsname=rofs", "subtype=rofs", "default_permissions")


@dataclass
class Config:
    mountpoint: str
    lower: str
    state: str
    foreground: bool = False
    debug: bool = False
    fuse_options: list[str] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    write_log: bool = True
    scratch: str | None = None  # --scratch DIR (default: STATE/.rofs/scratch)
    # -o upperdir=U,workdir=W (kernel style) instead of a state dir; `state` is then W.
    overlay: tuple[str, str] | None = None
    # -o userxattr: user.overlay.* markers (as the kernel's option); None: as the state
    # dir says, and for a new one, user.overlay.* unless root mounts.
    userxattr: bool | None = None
    # -o redirect_dir=: False makes directory renames that need a redirect EXDEV (as the
    # kernel without redirect_dir=on); None: as the markers allow (trusted: redirects).
    redirects: bool | None = None
    # -o noopen: the kernel opens files without asking (FUSE no_open); see ops.py.
    no_open: bool = False
    # What to do when the lower changed since the last mount (policy.ON_IMAGE_CHANGE).
    on_image_change: str = "reconcile"
    # How to start the rofs command as installed now, with this mount's arguments (a
    # restart hands the mount over to it); None: no restart.
    command: list[str] | None = None


class MountError(Exception):
    """The mount itself failed (after the state dir was accepted)."""


def fuse_options(config: Config) -> list[str]:
    options = list(BASE_OPTIONS)
    if os.geteuid() == 0:
        # Everyone sees the mount, as with any filesystem root mounts.  A user's mount is
        # the user's alone unless they ask (-o allow_other, which fusermount3 allows only
        # with user_allow_other in /etc/fuse.conf).
        options.append("allow_other")
    return options + [o for o in config.fuse_options if o not in options]


class _JournalFormatter(logging.Formatter):
    """Lines for the journal: each with its syslog priority as a "<N>" prefix, which
    journald reads from a service's stderr (sd-daemon(3))."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % self.PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: systemd says so in $JOURNAL_STREAM."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def _setup_logging(config: Config, background: bool) -> None:
    level = logging.DEBUG if config.debug else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if background and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("rofs[%(process)d]: %(levelname)s "
                                               "%(name)s: %(message)s"))
    elif background:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        journal = _stderr_is_journal()  # under systemd: the journal gets priorities
        handler.setFormatter((_JournalFormatter if journal else logging.Formatter)(
            "rofs: %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def _serve(session: fuse_channel.Session) -> bool:
    """Run the loop until the mount goes or a signal asks to stop; True when SIGUSR1
    asked to hand over (rofs/daemon/handover.py)."""
    handing_over = False

    def on_signal(signum, frame) -> None:
        nonlocal handing_over
        if signum == signal.SIGUSR1:
            handing_over = True
        else:
            log.info("signal %d: unmounting", signum)
        session.stop()

    previous = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    old_wakeup = signal.set_wakeup_fd(session.wakeup_fd)
    try:
        session.run()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return handing_over


def run(config: Config) -> int:
    """Mount and serve until unmounted.  Raises StateError/MountError before the mount."""
    try:
        crash.check()
    except ValueError as e:
        raise MountError(str(e)) from None
    _sys.raise_open_file_limit()
    _sys.name_this_thread("rofs")  # the request loop's thread: the daemon's name
    prepared = state.prepare(config.state, config.mountpoint, config.lower, config.overlay,
                             config.userxattr)
    markers = prepared.markers
    if config.redirects is not None:
        if config.redirects and not markers.redirects:
            prepared.close()
            raise state.StateError("redirect_dir=on needs trusted.overlay.* markers: this "
                                   "state dir has user.overlay.* (the kernel does not "
                                   "follow user.overlay.redirect either)")
        markers.redirects = config.redirects
    fingerprint = origin.fingerprint(config.lower)
    before = (registry.mount_record(config.state, config.mountpoint) or {}).get(
        "lower_fingerprint")
    if fingerprint is not None and before is not None:
        prepared.image_changed = before != fingerprint
    try:
        upper = UpperLayer(prepared.upper_fd, prepared.work_fd, markers)
        upper.index_fd = prepared.index_fd
        prepared.moved = scratch.set_aside(
            config.policy, upper, attic.attic_dir(config.state, config.mountpoint),
            config.mountpoint)
    except OSError as e:
        prepared.close()
        raise MountError("cannot move the saved changes the policy makes scratch out of %s "
                         "(nothing was deleted): %s" % (prepared.upper_path, e)) from None
    if prepared.image_changed:
        if config.on_image_change == "reconcile":
            _setup_logging(config, background=False)  # what it did, on the terminal too
            prepared.reconciled = reconcile.at_mount(
                config.state, config.mountpoint, config.lower, config.overlay,
                prepared.lower_fd, prepared.work_fd, config.write_log)
        if prepared.reconciled is None:
            # Not reconciled (warn, keep, or it failed): the record keeps the image the
            # state was last reconciled with, so every mount until then says so, and
            # the next one that may reconcile does.
            fingerprint = before
    try:
        registry.record_mount(config.state, config.mountpoint, config.lower, config.overlay,
                           fingerprint)
    except OSError as e:
        prepared.close()
        raise MountError("cannot write to the state dir %s: %s" % (config.state, e)) from None
    try:
        if config.policy.has_scratch:
            state.prepare_scratch(prepared, config.state, config.mountpoint, config.scratch,
                                  markers)
    except OSError as e:
        prepared.close()
        raise MountError("cannot empty the scratch layer: %s" % e) from None
    except state.StateError:
        prepared.close()
        raise
    # What the mount set up (the state dir's files, the mount record, the attic, the
    # emptied scratch layer) is on disk before the first change is served.
    try:
        _sys.syncfs(prepared.upper_fd)
    except OSError as e:
        prepared.close()
        raise MountError("cannot sync the state dir %s: %s" % (config.state, e)) from None
    if config.foreground:
        _setup_logging(config, background=False)
        return _mount_and_serve(config, prepared, ready=None)

    read_end, write_end = os.pipe()
    pipe = os.fstat(write_end)
    pid = os.fork()
    if pid:
        os.close(write_end)
        prepared.close()  # the child holds its own copies (and the lock)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        if message == b"ok":
            return 0
        _, status = os.waitpid(pid, 0)
        text = message.decode(errors="replace").strip()
        if text:
            raise MountError(text)
        raise MountError("daemon exited before the mount was ready (status %d)"
                         % os.waitstatus_to_exitcode(status))

    # The daemon.
    os.close(read_end)
    os.setsid()

    def told() -> bool:
        """Whether the parent was told (a server of the keeper closed the pipe: the
        keeper shares its descriptors, not its variables)."""
        try:
            st = os.fstat(write_end)
        except OSError:
            return True
        return write_end < 0 or (st.st_dev, st.st_ino) != (pipe.st_dev, pipe.st_ino)

    def ready() -> None:
        nonlocal write_end
        if told():
            return
        os.write(write_end, b"ok")
        os.close(write_end)
        write_end = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _setup_logging(config, background=True)

    code = 1
    try:
        # Until the mount is live, problems go to the terminal; routine news does not.
        _setup_logging(config, background=False)
        if not config.debug:
            logging.getLogger().setLevel(logging.WARNING)
        code = _mount_and_serve(config, prepared, ready=ready)
    except BaseException as e:  # the parent prints it
        if not told():
            os.write(write_end, str(e).encode() or type(e).__name__.encode())
        else:
            log.exception("rofs daemon failed")
    finally:
        os._exit(code)


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about the service: READY=1 once the mount is live,
    STOPPING=1 when it goes.  A no-op outside systemd (no $NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e.strerror)
        return False
    return True


def _open_write_log(config: Config) -> WriteLog | None:
    if not config.write_log:
        return None
    path = state.log_path(config.state, config.mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError as e:
        log.warning("no write log: cannot create %s: %s", os.path.dirname(path), e.strerror)
        return None
    return WriteLog(path, config.mountpoint)


def _report_moved(config: Config, moved) -> None:
    """Say loudly that the policy moved saved changes aside, where, and how to get them
    back (WARNING: on the terminal, and in the journal)."""
    shown = [quote_path(p, quote(config.mountpoint)) for p in moved.paths]
    more = len(shown) - MOVED_SHOWN
    log.warning("policy: %s under paths this policy makes scratch moved to %s instead "
                "of being deleted: %s%s.  List them with `rofs attic %s`, put them back "
                "with `rofs attic --restore %s %s`",
                count(len(shown), "saved change"), quote(moved.set_dir),
                " ".join(shown[:MOVED_SHOWN]), " and %d more" % more if more > 0 else "",
                quote(config.state), os.path.basename(moved.set_dir), quote(config.state))


MOVED_SHOWN = 10  # paths named in the warning


def unmatched_rules(policy: Policy, prepared: state.Prepared) -> list[str]:
    """Notes about rules whose path exists neither in the lower layer nor in the state:
    most likely a typo, which would quietly leave the intended path in the default
    class."""
    notes = []
    for path, rule in sorted(policy.rules.items()):
        if rule.source.startswith(BUILT_IN_SOURCE):
            continue
        if path and lstat_below(prepared.lower_fd, path) is None and \
                lstat_below(prepared.upper_fd, path) is None:
            notes.append("%s: %s %s matches nothing in the lower layer or the state (a typo?)"
                         % (rule.source, rule.cls.value if rule.kind == "files" else rule.kind,
                            quote_path(path, quote(policy.mountpoint))))
    return notes


def _mount_and_serve(config: Config, prepared: state.Prepared, ready) -> int:
    """Mount, then be the mount's keeper (rofs/daemon/keeper.py): serve it from a
    server process, and from another whenever one dies, until one ends on purpose."""
    try:
        fd = fuse_mount.mount(config.mountpoint, fuse_options(config))
    except fuse_mount.MountError as e:
        prepared.close()
        hint = ""
        if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
            hint = (" (/dev/fuse is not open to uid %d; distributions make it mode 0666, "
                    "and fusermount3 does the mount)" % os.geteuid())
        raise MountError("cannot mount %s: %s%s" % (config.mountpoint, e, hint)) from None
    journal = Journal.create(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return _keep(config, prepared, ready, fd, journal, 0, None, _at_mount(prepared),
                 time.time())


def resume(sock) -> int:
    """Be the keeper of a mount another keeper hands over (rofs/daemon/handover.py):
    `sock` is the way to it."""
    _sys.raise_open_file_limit()
    _sys.name_this_thread("rofs")
    time.localtime()  # (the time zone read now: not from a mount no one serves)
    data = handover.receive(sock)
    config, prepared, journal = handover.rebuild(data, Config)
    _setup_logging(config, background=not config.foreground)

    def ready() -> None:  # once its server serves
        try:
            sock.sendall(handover.SERVING)
        except OSError:
            pass
        sock.close()

    # Its own: all it holds but the files the kernel holds handles of (and objects kept).
    keep = frozenset(int(n) for n in os.listdir("/proc/self/fd")
                     if not journal.kept(int(n))[0])
    journal.set_replaced(data["serial"], "restart")
    return _keep(config, prepared, ready, data["fuse_fd"], journal, data["serial"], keep,
                 data["at_mount"], data["started"])


def _keep(config: Config, prepared: state.Prepared, ready, fd: int, journal: Journal,
          serial: int, keep: frozenset[int] | None, at_mount: dict, started: float) -> int:
    """Be the mount's keeper (rofs/daemon/keeper.py): serve it from a server process,
    from another whenever one dies, and hand it to a keeper of the code installed now
    when asked, until a server ends on purpose."""
    keeper = Keeper(journal)
    keeper_pid = os.getpid()

    def serve(serial: int, survivors: dict[int, tuple[int, int]] | None) -> int:
        crash.in_server(keeper_pid, successor=serial > 0)
        _sys.name_this_thread("rofs")
        return _serve_mount(config, prepared, ready if keeper.servers == 1 else None, fd,
                            journal, serial, survivors, keeper_pid, keeper.refuse,
                            at_mount, started)

    def restart(server: int, serial: int) -> str:
        if not config.command:
            return SERVING
        successor = handover.Successor(config.command)
        if not successor.wait_for(handover.READY, handover.STARTUP_TIMEOUT):
            successor.fail()
            journal.restart_failed()
            return SERVING
        os.kill(server, signal.SIGUSR1)  # hand over
        os.waitpid(server, 0)
        sweep(journal, keeper.keep | {successor.sock.fileno()})
        try:
            successor.hand(config, prepared, fd, journal, journal.header()[3] + 1,
                           at_mount, started)
            if successor.wait_for(handover.SERVING, handover.STARTUP_TIMEOUT):
                log.info("handed %s over to a new rofs (pid %d)", quote(config.mountpoint),
                         successor.pid)
                return DONE
        except OSError as e:
            log.error("cannot hand %s over: %s", quote(config.mountpoint), e)
        successor.fail()
        journal.restart_failed()
        return STOPPED

    code = keeper.run(serve, serial, keep, restart)
    if code:
        # No server left: the mount goes, as with any filesystem daemon that died
        # (the lower shows again, instead of ENOTCONN on every path).
        try:
            fuse_mount.unmount(config.mountpoint, fd)
        except fuse_mount.MountError as e:
            log.warning("%s", e)
        if not journal.header()[0]:
            raise MountError("the server of %s exited before the mount was ready (its "
                             "error is in the log)" % quote(config.mountpoint))
    return code


def _at_mount(prepared: state.Prepared) -> dict:
    """What `rofs status` tells of the mount's start, for every server of it."""
    return {"image_changed": prepared.image_changed,
            "reconciled": {"counts": prepared.reconciled.counts(),
                           "attic": os.path.basename(prepared.reconciled.attic)
                           if prepared.reconciled.attic else None}
            if prepared.reconciled is not None else None,
            "moved_at_mount": {"count": len(prepared.moved.paths),
                               "set": prepared.moved.set_dir} if prepared.moved else None}


def _serve_mount(config: Config, prepared: state.Prepared, ready, fd: int,
                 journal: Journal, serial: int,
                 survivors: dict[int, tuple[int, int]] | None, keeper_pid: int,
                 refuse: frozenset[int], at_mount: dict, started: float) -> int:
    """One server of the mount: the first (serial 0), or one taking over from a server
    that died or handed over, with the descriptors it left (`survivors`); `ready` is
    called once it serves (when someone waits for that).  Returns 0 once the mount
    ended on purpose, HANDOVER when asked to hand over (SIGUSR1); an uncaught error
    ends the process with no clean-up, for the keeper's next server to take over."""
    markers = prepared.markers
    journal.attach()
    overlay = Overlay(prepared.lower_fd, prepared.upper_fd, prepared.work_fd, markers,
                      index_fd=prepared.index_fd, loop=fuse_channel.LOOP)
    overlay.attach_journal(journal, serial, survivors)
    overlay.base_writer = origin.BaseWriter(prepared.bases_fd)
    scratch_layer = None
    if prepared.scratch_upper_fd >= 0:
        scratch_layer = UpperLayer(prepared.scratch_upper_fd, prepared.scratch_work_fd,
                                   markers, tag="S")
        scratch_layer.index_fd = prepared.scratch_index_fd
    overlay.set_policy(config.policy, scratch_layer)
    if not serial:
        _report_at_mount(config, prepared, scratch.lay_out(config.policy, overlay))
    writelog = _open_write_log(config)

    def live() -> None:
        # FUSE_INIT arrived: the mount answers requests.
        journal.set_negotiated(session.negotiated)
        if ready is not None:
            ready()
        sd_notify("READY=1\nMAINPID=%d\nSTATUS=serving %s" % (keeper_pid,
                                                              config.mountpoint))

    ops = RofsOperations(overlay, on_ready=live if not serial else None,
                         writelog=writelog, policy=config.policy, no_open=config.no_open)
    crash.install_failures()  # (tests only)
    fault = os.environ.get("ROFS_FAULT_NAME")
    session = fuse_channel.Session(fd, ops, want=ops.want,
                                   fault_name=os.fsencode(fault) if fault else None,
                                   resumed=journal.header()[:3] if serial else None,
                                   note=journal.note, refuse=refuse)
    if serial:
        error = session.resend()
        if error:
            log.warning("this kernel cannot send again the requests the server that died "
                        "had read (%s): they wait for ever", os.strerror(error))
        log.warning("took over %s (the server before: %s; %d open files and %d node "
                    "ids to find again)", quote(config.mountpoint), journal.header()[4],
                    len(survivors or ()), len(overlay._resumable))
        # (A keeper that took over by a restart is the service's main process now.)
        sd_notify("MAINPID=%d\nSTATUS=serving %s" % (keeper_pid, config.mountpoint))
        if ready is not None:
            ready()
    else:
        log.info("mounted %s (lower %s, upper %s)", quote(config.mountpoint),
                 quote(config.lower), quote(prepared.upper_path))
    published = registry.publish_live(config.mountpoint, config.state, prepared.lower_fd,
                                      keeper_pid)

    def describe() -> dict:
        """This mount, for `rofs status`."""
        counts: dict[str, int] = {}
        for rule in config.policy.rules.values():
            if not rule.source.startswith(BUILT_IN_SOURCE):
                counts[rule.cls.value] = counts.get(rule.cls.value, 0) + 1
        _, _, _, replaced, reason = journal.header()
        return {"mountpoint": config.mountpoint, "state": config.state,
                "lower": config.lower, "upper": prepared.upper_path,
                "scratch": prepared.scratch_path or None,
                "markers": markers.prefix.decode() + "*", "started": started,
                "keeper": keeper_pid, "replaced": replaced, "version": __version__,
                "restarts_failed": journal.restarts_failed(),
                "last_replaced": reason or None,
                "default_class": config.policy.default.value, "rules": counts,
                "internal_errors": session.internal_errors,
                "collector": collector.stats(),
                "log": writelog.path if writelog is not None else None,
                "log_written": writelog.written if writelog is not None else 0,
                "log_dropped": writelog.dropped if writelog is not None else 0,
                "bases_dropped": overlay.base_writer.dropped,
                "on_image_change": config.on_image_change,
                "attic": attic.summary(config.state, config.mountpoint), **at_mount}

    server = None
    if published is not None:
        control_path = registry.runtime_path(config.mountpoint, ".sock")
        try:
            server = control.Server(control_path, overlay, session, describe)
        except OSError as e:
            log.warning("no control socket %s (rofs revert will not work on this mount): "
                        "%s", control_path, e.strerror)
    collector = Collector()
    collector.install()
    try:
        handing_over = _serve(session)
    except BaseException:
        log.exception("the request loop failed: another server takes over")
        os._exit(70)  # nothing cleaned up: the next server resumes from here
    collector.uninstall()
    if handing_over:
        # What is queued for the disk gets there; the mount, its descriptors and the
        # requests read and not answered stay for the next server.
        if server is not None:
            server.close()
        session.close()
        if writelog is not None:
            writelog.close()
        overlay.base_writer.close()
        log.info("server %d hands %s over", os.getpid(), quote(config.mountpoint))
        return HANDOVER
    sd_notify("STOPPING=1")
    if server is not None:
        server.close()
    if published is not None:
        try:
            os.unlink(published)
        except OSError:
            pass
    try:
        fuse_mount.unmount(config.mountpoint, fd)
    except fuse_mount.MountError as e:
        log.warning("%s", e)
    os.close(fd)
    session.close()
    if writelog is not None:
        writelog.close()
    overlay.base_writer.close()
    overlay.close()
    prepared.close()
    log.info("unmounted %s", quote(config.mountpoint))
    if session.internal_errors:
        log.warning("%d requests failed with internal errors", session.internal_errors)
    return 0


def _report_at_mount(config: Config, prepared: state.Prepared, notes: list[str]) -> None:
    """What the first server says once about the mount it starts."""
    if prepared.scratch_upper_fd >= 0:
        log.info("scratch changes go to %s until the next mount", quote(prepared.scratch_path))
    if prepared.moved is not None:
        _report_moved(config, prepared.moved)
    if prepared.image_changed and config.on_image_change == "warn":
        log.warning("the lower layer changed since the last mount of this state (an image "
                    "update): copies of files it changed may be stale or in conflict; "
                    "`rofs diff %s` tells them apart (docs/image-updates.md)",
                    quote(config.state))
    for note in config.policy.notes + unmatched_rules(config.policy, prepared) + notes:
        log.warning("policy: %s", note)
