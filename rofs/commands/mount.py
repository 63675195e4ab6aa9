"""`rofs MOUNTPOINT --state STATEDIR`: mount.  Arguments (the command line's, or
mount(8)'s `-o` options through mount.fuse3) into the daemon's Config; a user's mistake
is one line and exit code 2, with nothing mounted and nothing left behind."""

from __future__ import annotations

import argparse
import os
import sys

from rofs import __version__
from rofs._sys import mount_table
from rofs.commands.common import EXIT_USAGE
from rofs.daemon import handover
from rofs.daemon.serve import Config, MountError, resume, run
from rofs.store import policy
from rofs.store.policy import CLASS_NAMES, ON_IMAGE_CHANGE, PolicyError
from rofs.store.quoting import quote
from rofs.store.registry import dead_mount, unmount_command
from rofs.store.state import StateError

DESCRIPTION = """\
Mount a copy-on-write overlay over MOUNTPOINT.  What MOUNTPOINT holds right now
becomes the read-only lower layer (or --lower DIR); every create, write, rename,
link, delete and metadata change lands in the state directory, under
STATEDIR/<MOUNTPOINT without its leading slash>/ in the kernel overlayfs format.
The lower layer is never modified."""


EPILOG = """\
STATEDIR is created (mode 0700) if it does not exist but its parent does.
The command returns once the mount is live; errors before that are printed here
with a non-zero exit code (2 for bad arguments or an unusable state dir).
Unmount with `umount MOUNTPOINT` (a user other than root: `fusermount3 -u
MOUNTPOINT`); SIGTERM, SIGINT and SIGHUP unmount cleanly too.  The daemon is
a keeper (the process started, which holds the mount) and its server (the one
answering requests): a server that dies is replaced, and callers see a pause.

As mount(8)'s helper (mount -t fuse.rofs, or an fstab line):
  rofs SOURCE MOUNTPOINT -o state=STATEDIR[,lowerdir=DIR,policy=FILE,...]
  rofs SOURCE MOUNTPOINT -o lowerdir=DIR,upperdir=DIR,workdir=DIR[,...]
(SOURCE is only a name; mount.fuse3 passes it first).

A user other than root can mount over a directory they can write to, with a
state dir of their own: the mount is theirs alone and the markers are
user.overlay.* (see docs/unprivileged.md).

Other commands (each with --help): `rofs report` (who wrote where, from the
write logs), `rofs diff` (what changed), `rofs revert` (drop a change),
`rofs check` (find and repair damage in a state dir), `rofs status` (the live
mounts and their health), `rofs restart` (a new daemon for a live mount: an
upgrade), `rofs attic` (saved changes set aside), `rofs reconcile` (a state with
a new image).
A MOUNTPOINT named like a command must be written as ./report.

example:  rofs /etc --state /var/lib/stateless/state"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rofs", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="directory to mount over (also the lower layer unless --lower)")
    # mount(8)'s helper mount.fuse3 runs `rofs SOURCE MOUNTPOINT -o OPTIONS`.
    parser.add_argument("helper_target", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--state", metavar="STATEDIR",
                        help="state directory that receives all changes (required; "
                        "or -o state=STATEDIR)")
    parser.add_argument("--lower", metavar="DIR",
                        help="use DIR as the read-only lower layer instead of MOUNTPOINT")
    policy = parser.add_argument_group(
        "per-path policy (docs/policy.md)",
        "Classes: persistent (kept in STATEDIR), scratch (wiped at the next\n"
        "mount), read-only (changes fail with EROFS).")
    policy.add_argument("--policy", metavar="FILE",
                        help="rofs policy file: `CLASS PATH`, `default CLASS`, rwtab lines, "
                        "`rwtab [ETCDIR]`")
    policy.add_argument("--rwtab", metavar="ETCDIR", nargs="?", const="",
                        help="also read rwtab, rwtab.d/* (scratch) and statetab, "
                        "statetab.d/* (persistent) from ETCDIR (default: the lower "
                        "layer when mounting over /etc, else /etc)")
    policy.add_argument("--scratch", metavar="DIR",
                        help="where changes to scratch paths live until the next mount "
                        "(default: STATEDIR/.rofs/scratch; a tmpfs keeps them off the "
                        "disk; created if only its last component is missing)")
    policy.add_argument("--default", metavar="CLASS", choices=CLASS_NAMES,
                        help="class of every path no rule names: persistent (the "
                        "default), scratch or read-only")
    parser.add_argument("--on-image-change", metavar="WHAT", choices=list(ON_IMAGE_CHANGE),
                        help="when the lower layer changed since the last mount (an image "
                        "update): reconcile (the default: stale copies follow the image, "
                        "passwd & co. and text files are merged, conflicts are kept and "
                        "reported), warn, or keep (serve the state as it is); also "
                        "`on-image-change WHAT` in the policy file (docs/image-updates.md)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not keep the write log (who changed what, in "
                        "STATEDIR/.rofs/log/; see `rofs report`)")
    parser.add_argument("--no-open", action="store_true",
                        help="let the kernel open files without asking rofs (FUSE "
                        "no_open): opening a file costs no request, so cached reads run "
                        "at nearly native speed; but a write to a read-only path fails "
                        "at write(2), not open(2) (docs/performance.md)")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr")
    parser.add_argument("--debug", action="store_true", help="log every request (slow)")
    parser.add_argument("-o", dest="options", metavar="OPT[,OPT...]", action="append",
                        default=[], help="mount options: rofs's own as in fstab (state=DIR, "
                        "or upperdir=DIR,workdir=DIR like the kernel's overlay; lowerdir=DIR, "
                        "policy=FILE, rwtab[=DIR], default=CLASS, scratch=DIR, "
                        "on_image_change=WHAT, nolog, noopen, "
                        "userxattr: user.overlay.* markers in a new state dir, the default "
                        "when not root; redirect_dir=on|follow|nofollow|off as the kernel's: "
                        "all but on make renaming a directory with lower content EXDEV; "
                        "index, xino, metacopy, nfs_export, uuid, volatile, verity: "
                        "accepted, no effect), "
                        "mount(8)'s (defaults, auto, noauto, nofail, _netdev, x-*: "
                        "ignored), the rest passed to FUSE (e.g. noatime)")
    parser.add_argument("--version", action="version", version="rofs " + __version__)
    return parser


class UsageError(Exception):
    pass


def _mountinfo_top(path: str) -> str | None:
    """Filesystem type of the topmost mount at `path`, if `path` is a mount point."""
    fstype = None
    for target, kind in mount_table():
        if target == path:
            fstype = kind
    return fstype


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# -o options that stand for rofs's own arguments (as in an fstab line), and mount(8)'s
# own options, which are not FUSE's business.
OPTION_ARGS = {"state": "state", "lowerdir": "lower", "policy": "policy", "rwtab": "rwtab",
               "default": "default", "scratch": "scratch", "upperdir": "upperdir",
               "workdir": "workdir", "on_image_change": "on_image_change"}


MOUNT_ONLY = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
              "rw"}


# The kernel overlay's options that change nothing for rofs, so that a command line
# written for `mount -t overlay` works with `-t fuse.rofs`: rofs always indexes copied-up
# hard links, keeps inode numbers and copies up whole files, and syncs what it must.
OVERLAY_NOOPS = {"index", "xino", "metacopy", "nfs_export", "uuid", "volatile", "verity"}


def _without_implicit(options: list[str]) -> list[str]:
    """The options of a mount(8) run without the `dev` and `suid` that mount.fuse3 always
    appends (mount(8)'s defaults, unless `nodev`/`nosuid` were given), so that
    `mount -t fuse.rofs` mounts nosuid,nodev like `rofs` itself; a `dev` or `suid` the
    admin wrote stays (mount.fuse3 then appends a second one)."""
    options = list(options)
    for implicit in ("suid", "dev"):
        if options and options[-1] == implicit:
            options.pop()
    return options


def apply_mount_options(args: argparse.Namespace) -> list[str]:
    """Move rofs's own -o options into args; returns the options left for FUSE."""
    options = [o for group in args.options for o in group.split(",") if o]
    if args.helper_target is not None:  # rofs SOURCE MOUNTPOINT: the source is a name
        args.mountpoint = args.helper_target
        options = _without_implicit(options)
    fuse = []
    for option in options:
        key, _, value = option.partition("=")
        if key in OPTION_ARGS:
            if key != "rwtab" and not value:
                raise UsageError("-o %s needs a value (%s=...)" % (key, key))
            setattr(args, OPTION_ARGS[key], value)
        elif key == "nolog":
            args.no_log = True
        elif key == "noopen":
            args.no_open = True
        elif key == "userxattr":
            args.userxattr = True
        elif key == "redirect_dir":
            # As the kernel: only "on" creates redirects; "follow", "nofollow" and "off"
            # make renaming a directory with lower content EXDEV.  rofs always follows.
            if value not in ("on", "follow", "nofollow", "off"):
                raise UsageError("-o redirect_dir=%s: expected on, follow, nofollow or off"
                                 % value)
            args.redirects = value == "on"
        elif key in OVERLAY_NOOPS:
            continue
        elif key in MOUNT_ONLY or key.startswith(("x-", "comment=")):
            continue
        else:
            fuse.append(option)
    return fuse


def validate(args: argparse.Namespace):

    args.upperdir = args.workdir = args.userxattr = args.redirects = None
    options = apply_mount_options(args)
    overlay = None
    if args.upperdir or args.workdir:
        if not (args.upperdir and args.workdir):
            raise UsageError("-o upperdir= and -o workdir= go together")
        if args.state:
            raise UsageError("give either a state dir or upperdir=/workdir=, not both")
        overlay = tuple(os.path.realpath(p) for p in (args.upperdir, args.workdir))
        for path in overlay:
            if not os.path.isdir(path):
                raise UsageError("%s does not exist or is not a directory" % path)
        if _inside(overlay[0], overlay[1]) or _inside(overlay[1], overlay[0]):
            raise UsageError("upperdir %s and workdir %s are nested" % overlay)
        args.state = overlay[1]  # rofs's own files go to WORKDIR/.rofs
    if args.userxattr and args.redirects:
        raise UsageError("-o userxattr and redirect_dir=on conflict (as for the kernel: "
                         "user.overlay.redirect is never followed)")
    if not args.state:
        raise UsageError("the state dir is required: --state STATEDIR (or -o state=STATEDIR, "
                         "or -o upperdir=DIR,workdir=DIR)")
    if args.default is not None and args.default not in CLASS_NAMES:
        raise UsageError("unknown class %r (expected %s)" % (args.default,
                                                            ", ".join(CLASS_NAMES)))
    mountpoint = os.path.abspath(args.mountpoint)
    if dead_mount(mountpoint):
        raise UsageError("%s is a dead FUSE mount (its daemon was killed): run `%s`, "
                         "then mount again; the state dir keeps everything that was "
                         "written" % (quote(mountpoint), unmount_command(mountpoint)))
    if not os.path.isdir(mountpoint):
        raise UsageError("mountpoint %s does not exist or is not a directory" % mountpoint)
    mountpoint = os.path.realpath(mountpoint)
    if mountpoint == "/":
        raise UsageError("mounting over / is not supported")
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise UsageError("mountpoint %s: a user other than root can mount only over a "
                         "directory they can write to (fusermount3's rule)" % mountpoint)
    lower = os.path.realpath(args.lower) if args.lower else mountpoint
    if not os.path.isdir(lower):
        if ":" in args.lower and all(os.path.isdir(p) for p in args.lower.split(":") if p):
            raise UsageError("lowerdir=%s names several lower layers; rofs has one (stack "
                             "them with the kernel's overlay first)" % args.lower)
        raise UsageError("lower directory %s does not exist or is not a directory" % lower)
    state = os.path.abspath(args.state)
    if os.path.lexists(state):
        if not os.path.isdir(state):
            raise UsageError("state dir %s is not a directory" % state)
    elif not os.path.isdir(os.path.dirname(state)):
        raise UsageError("state dir %s does not exist, nor does its parent" % state)
    state = os.path.realpath(state)
    if _inside(state, lower):
        raise UsageError("state dir %s is inside the lower directory %s" % (state, lower))
    if _inside(lower, state):
        raise UsageError("lower directory %s is inside the state dir %s" % (lower, state))
    if _inside(state, mountpoint):
        raise UsageError("state dir %s is inside the mountpoint %s" % (state, mountpoint))
    if _inside(mountpoint, state):
        raise UsageError("mountpoint %s is inside the state dir %s" % (mountpoint, state))
    if overlay is not None:
        for other, what in ((lower, "the lower directory"), (mountpoint, "the mountpoint")):
            if _inside(overlay[0], other) or _inside(other, overlay[0]):
                raise UsageError("upperdir %s and %s %s are nested" % (overlay[0], what,
                                                                        other))
    if _mountinfo_top(mountpoint) == "fuse.rofs":
        raise UsageError("%s is already mounted by rofs" % mountpoint)
    scratch = None
    if args.scratch is not None:
        scratch = os.path.realpath(args.scratch)
        if os.path.lexists(scratch) and not os.path.isdir(scratch):
            raise UsageError("scratch dir %s is not a directory" % scratch)
        if not os.path.isdir(os.path.dirname(scratch)):
            # Made (mode 0700) at the mount when only the last component is missing, as
            # /run/rofs-scratch is after every boot.
            raise UsageError("scratch dir %s does not exist, nor does its parent" % scratch)
        for other, what in ((lower, "the lower directory"), (mountpoint, "the mountpoint")):
            if _inside(scratch, other) or _inside(other, scratch):
                raise UsageError("scratch dir %s and %s %s are nested" % (scratch, what,
                                                                          other))
    if args.on_image_change is not None and args.on_image_change not in ON_IMAGE_CHANGE:
        raise UsageError("-o on_image_change=%s: expected %s" % (
            args.on_image_change, ", ".join(ON_IMAGE_CHANGE)))
    rules = policy.load(mountpoint, lower, policy_file=args.policy, rwtab=args.rwtab,
                        default=args.default)
    on_image_change = args.on_image_change or rules.on_image_change or "reconcile"
    return Config(mountpoint=mountpoint, lower=lower, state=state,
                  foreground=args.foreground, debug=args.debug, fuse_options=options,
                  policy=rules, write_log=not args.no_log, scratch=scratch,
                  overlay=overlay, userxattr=args.userxattr, redirects=args.redirects,
                  no_open=args.no_open, on_image_change=on_image_change)


def _use_c_allocator(argv: list[str]) -> None:
    """Re-execute the command with PYTHONMALLOC=malloc before it becomes a daemon.

    Python's own small-object allocator keeps a 1 MiB arena as long as one object in it
    lives, so after the kernel forgets most of the nodes of a big walk the daemon's memory
    would stay at its peak; glibc's malloc (with malloc_trim after big forgets) gives it
    back.  benchmarks/run.py measured no difference in speed.
    """
    if "PYTHONMALLOC" in os.environ:
        return
    env = dict(os.environ, PYTHONMALLOC="malloc")
    for command in _commands(argv):
        try:
            os.execve(command[0], command, env)
        except OSError:
            pass  # the next way; none: keep going with the default allocator


def _commands(argv: list[str]) -> list[list[str]]:
    """Ways to start this rofs command again with `argv`, best first."""
    commands = []
    script = sys.argv[0]
    if os.path.basename(script) == "rofs" and os.access(script, os.X_OK):
        # The `rofs` command again, as it was started: the process stays `rofs` in ps,
        # top and pgrep (the kernel names a script's process after the script) and its
        # command line reads `python .../rofs /etc --state ...`.
        commands.append([os.path.abspath(script), *argv])
    # Not `python -m rofs`: that puts the current directory first on sys.path, and a
    # directory named rofs there (a checkout in ~, /etc/rofs/ for policies) would be
    # imported instead of this package.  The new process imports this very package.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bootstrap = ("import sys; sys.path[0] = %r; from rofs.cli import entry; "
                 "sys.exit(entry())" % here)
    commands.append([sys.executable, "-c", bootstrap, *argv])
    return commands


def main(argv: list[str], *, reexec: bool = False) -> int:
    """Mount and serve (in the background unless -f); `reexec`: as the `rofs` command,
    with the allocator the daemon wants (see _use_c_allocator)."""
    try:
        sock = handover.resumed()
    except ValueError as e:
        print("rofs: error: %s" % e, file=sys.stderr)
        return 1
    if sock is not None:  # a keeper handing its mount over to this code
        return resume(sock)
    args = build_parser().parse_args(argv)
    try:
        config = validate(args)
        if reexec:
            _use_c_allocator(argv)
        config.command = _commands(argv)[0]
        return run(config)
    except (UsageError, StateError, PolicyError) as e:
        print("rofs: error: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    except MountError as e:
        print("rofs: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
