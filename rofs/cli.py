"""Command line: arguments into a Config; user mistakes become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

from rofs import __version__
from rofs._sys import raise_open_file_limit
from rofs.names import quote
from rofs.policy import CLASS_NAMES, ON_IMAGE_CHANGE, PolicyError

EXIT_USAGE = 2

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
MOUNTPOINT`); SIGTERM, SIGINT and SIGHUP unmount cleanly too.

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
mounts and their health), `rofs attic` (saved changes set aside), `rofs
reconcile` (a state with a new image).
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


REPORT_DESCRIPTION = """\
Summarise write logs: per program, which paths it changed, how often, first and last
time, and the writes the read-only class refused.  LOG is a state dir (all its logs),
a log directory or a log file; logs of several hosts merge into one report."""

REPORT_EPILOG = """\
Paths under the exceptions list are left out (default: %s).

examples:
  rofs report /var/lib/stateless/state
  rofs report --suggest /var/lib/stateless/state > /etc/rofs/etc.policy
  rofs report --json host1.jsonl host2.jsonl"""


def build_report_parser() -> argparse.ArgumentParser:
    from rofs.report import DEFAULT_EXCEPTIONS
    parser = argparse.ArgumentParser(
        prog="rofs report", description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG % " ".join(DEFAULT_EXCEPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", metavar="LOG", nargs="*",
                        help="state dir, log directory or log file")
    _state_option(parser, "a state dir whose logs to read (the same as naming it as a LOG)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the report as JSON")
    out.add_argument("--suggest", action="store_true",
                     help="print the policy that keeps exactly what the logged workload "
                     "changed for good (a rofs policy file, with the statetab/rwtab "
                     "equivalents as comments)")
    parser.add_argument("--exceptions", metavar="FILE",
                        help="paths or patterns to leave out, one per line (replaces the "
                        "default list)")
    _ignore_options(parser)
    parser.add_argument("--summary", action="store_true",
                        help="only the summary: changes per program and per top directory")
    return parser


def _ignore_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ignore", metavar="PATTERN", action="append",
                        help="leave out paths matching PATTERN and everything below them "
                        "(a glob: * and ? within a name, ** across names, e.g. "
                        "'/etc/.git/**'; repeatable)")
    parser.add_argument("--ignore-file", metavar="FILE", action="append",
                        help="patterns to leave out, one per line, # comments (repeatable)")


def _para(text: str) -> str:
    return textwrap.fill(text, 80)


def _state_option(parser: argparse.ArgumentParser, text: str) -> None:
    """--state STATEDIR, which every command that reads a state dir takes (where it also
    takes the state dir as its first operand, as before, either way works)."""
    parser.add_argument("--state", metavar="STATEDIR", help=text)


def _state_operands(parser: argparse.ArgumentParser, metavar: str, more: str = "") -> None:
    """The operands of a command whose first operand is the state dir (unless --state
    names it), then what `more` says; split by take_state."""
    parser.add_argument("operands", metavar=metavar, nargs="*",
                        help="the state dir (unless --state names it)" + more)
    _state_option(parser, "the state dir")


def take_state(parser: argparse.ArgumentParser, args: argparse.Namespace,
               operands: list[str], most: int) -> list[str]:
    """args.state from --state or else the first operand; the other operands (at most
    `most` of them)."""
    if args.state is None:
        if not operands:
            parser.error("the state dir is required: STATEDIR or --state STATEDIR")
        args.state, operands = operands[0], operands[1:]
    if len(operands) > most:
        parser.error("unexpected argument%s: %s" % ("s" if len(operands) - most > 1 else "",
                                                   " ".join(operands[most:])))
    return operands


def _command_parser(name: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of `rofs NAME` (description wrapped, examples in the epilog as given)."""
    return argparse.ArgumentParser(
        prog="rofs " + name, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para(description), epilog=epilog)


def build_diff_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "diff", "What the state dir changed against the lower layer, mounted or not: "
        "A added, M modified (saying what: content, mode, owner, mtime, xattrs, target), "
        "D deleted, R replaced (another type, or an opaque directory hiding the lower "
        "one); a renamed directory is an A with \"renamed from\" and a D.",
        "examples:\n  rofs diff /var/lib/stateless/state\n"
        "  rofs diff --patch /var/lib/stateless/state /etc/ssh")
    _state_operands(parser, "STATEDIR [PATH]", ", and optionally only this path (and "
                    "below), as the mount shows it")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--patch", action="store_true",
                     help="also a unified diff of each changed text file")
    out.add_argument("--json", action="store_true", help="the changes as JSON")
    parser.add_argument("--lower", metavar="DIR",
                        help="compare with DIR instead of the lower directory the mount "
                        "recorded (a copy of a state dir, next to the image's directory)")
    _ignore_options(parser)
    parser.add_argument("--summary", action="store_true",
                        help="only counts per top directory and status")
    return parser


def build_revert_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "revert", "Drop the changes at each PATH (a whole tree for a directory), so the "
        "lower layer shows through again.  On a live mount the daemon does it and the "
        "kernel's caches follow; otherwise name the state dir with --state.",
        "examples:\n  rofs revert /etc/hosts /etc/ssh\n"
        "  rofs revert --state /var/lib/stateless/state /etc/hosts   (not mounted)")
    parser.add_argument("paths", metavar="PATH", nargs="+",
                        help="path as the mount shows it (e.g. /etc/hosts)")
    parser.add_argument("--state", metavar="STATEDIR",
                        help="the state dir (needed when the mount is not live)")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "check", "Find what a crash or a hand edit can leave in a state dir: leftover "
        "work files, markers on the wrong kind of object or with wrong values, whiteouts "
        "over nothing, redirects to nowhere.  Exit status 0: clean (or repaired), 1: "
        "problems found.",
        "example:\n  rofs check --repair /var/lib/stateless/state")
    _state_operands(parser, "STATEDIR")
    parser.add_argument("--repair", action="store_true",
                        help="fix what can be fixed safely (the mount must not be live)")
    parser.add_argument("--lower", metavar="DIR",
                        help="the lower directory is DIR, not the one the mount recorded "
                        "(a copied state dir; whiteouts are judged against it)")
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "status", "What each live rofs mount says of itself: its daemon, state dir, "
        "layers, policy, write log, and what it holds now (nodes, open files, copy-ups "
        "running, internal errors).  A mount whose daemon is gone shows as dead.  Exit "
        "status 0: every mount is live and has had no internal error; 1 otherwise (for "
        "monitoring).",
        "examples:\n  rofs status\n  rofs status --json /etc")
    parser.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="*",
                        help="only these mounts (default: every rofs mount)")
    parser.add_argument("--json", action="store_true", help="the status as JSON")
    return parser


def build_attic_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "attic", "Saved changes that rofs moved aside instead of deleting them: when a new "
        "policy makes scratch a path whose changes the state dir holds, the mount moves "
        "them to STATEDIR/.rofs/attic/ and says so.  Without an action, list the sets "
        "(ID, mount, when, why, paths).  --restore puts a set's entries (or only the "
        "PATHs named) back, through the daemon on a live mount; --drop deletes a set.",
        "examples:\n  rofs attic /var/lib/stateless/state\n"
        "  rofs attic --restore 20261128T050000Z /var/lib/stateless/state\n"
        "  rofs attic --restore 20261128T050000Z /var/lib/stateless/state /etc/passwd\n"
        "  rofs attic --drop 20261128T050000Z --state /var/lib/stateless/state")
    _state_operands(parser, "STATEDIR [PATH ...]", "; for --restore, only these paths of "
                    "the set, as the mount shows them")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--restore", metavar="ID",
                        help="put the entries of set ID back into the upper layer")
    action.add_argument("--drop", metavar="ID", help="delete set ID for good")
    return parser


def build_reconcile_parser() -> argparse.ArgumentParser:
    parser = _command_parser(
        "reconcile", "Reconcile the state dir with the lower layer after an image "
        "update (what a mount does itself, unless --on-image-change says otherwise): a "
        "copy unchanged since its copy-up goes, so the image's new version shows; a copy "
        "changed here only in its metadata gets the image's content with that metadata; "
        "passwd, group, shadow, gshadow, subuid and subgid are merged per entry and other "
        "text files line by line; what cannot be merged keeps this host's version and "
        "gets the image's beside it as NAME.rofs-new.  What it replaces goes to the "
        "attic (`rofs attic`), every action to the write log (`rofs report`).  The "
        "state must not be mounted, but for --dry-run.  Exit status 0: no conflict, 1: "
        "conflicts or hidden entries to look at.",
        "examples:\n  rofs reconcile --dry-run /var/lib/stateless/state\n"
        "  rofs reconcile /var/lib/stateless/state\n"
        "  rofs reconcile --lower /mnt/image-v2/etc /srv/hosts/web1/state")
    _state_operands(parser, "STATEDIR [PATH]", ", and optionally only this path (and "
                    "below), as the mount shows it")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what it would do, change nothing (also while mounted)")
    parser.add_argument("--unhide", action="store_true",
                        help="copy the entries the image added under a directory replaced "
                        "here (an opaque directory) into it, instead of only reporting them")
    parser.add_argument("--lower", metavar="DIR",
                        help="the new image's directory, instead of the lower directory "
                        "the mount recorded")
    parser.add_argument("--json", action="store_true", help="the actions as JSON")
    return parser


# Every command besides mounting, with its parser (the man page is made from these).
SUBCOMMANDS = {"report": build_report_parser, "diff": build_diff_parser,
               "revert": build_revert_parser, "check": build_check_parser,
               "status": build_status_parser, "attic": build_attic_parser,
               "reconcile": build_reconcile_parser}


class UsageError(Exception):
    pass


def _mountinfo_top(path: str) -> str | None:
    """Filesystem type of the topmost mount at `path`, if `path` is a mount point."""
    from rofs._sys import mount_table
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
    from rofs.mount import Config

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
    from rofs.tools import dead_mount, unmount_command
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
    from rofs import policy
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
    # Not `python -m rofs`: that puts the current directory first on sys.path, and a
    # directory named rofs there (a checkout in ~, /etc/rofs/ for policies) would be
    # imported instead of this package.  The new process imports this very package.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bootstrap = ("import sys; sys.path[0] = %r; from rofs.cli import entry; "
                 "sys.exit(entry())" % here)
    try:
        os.execve(sys.executable, [sys.executable, "-c", bootstrap, *argv], env)
    except OSError:
        return  # keep going with the default allocator


def run_subcommand(name: str, argv: list[str]) -> int:
    from rofs import tools
    from rofs.report import ReportError
    from rofs.state import StateError
    try:
        if name == "report":
            from rofs import report
            parser = build_report_parser()
            args = parser.parse_args(argv)
            args.logs += [args.state] if args.state else []
            if not args.logs:
                parser.error("name a state dir, log directory or log file (LOG or --state)")
            return report.main(args)
        if name == "diff":
            parser = build_diff_parser()
            args = parser.parse_args(argv)
            path = (take_state(parser, args, args.operands, 1) or [None])[0]
            from rofs.report import patterns_of
            ignore = patterns_of(args, exceptions=False) if args.ignore or \
                args.ignore_file else None
            sys.stdout.write(tools.diff(args.state, path, as_json=args.json,
                                        with_patch=args.patch, lower=args.lower,
                                        ignore=ignore, summary=args.summary))
            return 0
        if name == "attic":
            from rofs import attic
            parser = build_attic_parser()
            args = parser.parse_args(argv)
            paths = take_state(parser, args, args.operands, 1 << 30)
            tools.mounts(args.state)  # a clear error for what is not a state dir
            if paths and not args.restore:
                parser.error("PATHs go with --restore")
            if args.restore:
                done, errors = attic.restore(args.state, args.restore, paths)
                for line in done:
                    print(line)
                for line in errors:
                    print("rofs attic: %s" % line, file=sys.stderr)
                return 1 if errors else 0
            if args.drop:
                print("\n".join(attic.drop(args.state, args.drop)))
                return 0
            sys.stdout.write(attic.format_sets(attic.sets(args.state)))
            return 0
        if name == "revert":
            args = build_revert_parser().parse_args(argv)
            done, errors = tools.revert(args.paths, args.state)
            for line in done:
                print(line)
            for line in errors:
                print("rofs revert: error: %s" % line, file=sys.stderr)
            return 1 if errors else 0
        if name == "status":
            args = build_status_parser().parse_args(argv)
            entries = tools.status(args.mountpoints)
            sys.stdout.write(json.dumps(entries, indent=1) + "\n" if args.json
                             else tools.format_status(entries, time.time()))
            return 0 if all(e["ok"] and not e.get("internal_errors") for e in entries) else 1
        if name == "reconcile":
            from rofs import reconcile
            parser = build_reconcile_parser()
            args = parser.parse_args(argv)
            path = (take_state(parser, args, args.operands, 1) or [None])[0]
            results = reconcile.reconcile_state(args.state, path, lower=args.lower,
                                                dry_run=args.dry_run, unhide=args.unhide)
            sys.stdout.write(reconcile.render(results, args.json))
            return 1 if any(a.action in ("conflict", "hidden") for r in results
                            for a in r.actions) else 0
        if name == "check":
            parser = build_check_parser()
            args = parser.parse_args(argv)
            take_state(parser, args, args.operands, 0)
            problems, notes = tools.check(args.state, repair=args.repair, lower=args.lower)
            for p in problems:
                print(p.line() + ("" if p.repair or not args.repair else
                                  "  (not repaired: decide by hand)"))
            for note in notes:
                print(note)
            left = [p for p in problems if not (args.repair and p.repair)]
            return 1 if left else 0
    except (ReportError, tools.ToolError, StateError) as e:
        print("rofs %s: error: %s" % (name, e), file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 1
    raise AssertionError(name)


def main(argv: list[str] | None = None, *, reexec: bool = False) -> int:
    words = sys.argv[1:] if argv is None else argv
    raise_open_file_limit()  # every command: the tools walk trees a user made
    if words and words[0] in SUBCOMMANDS:
        return run_subcommand(words[0], words[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from rofs.mount import MountError, run
    from rofs.state import StateError
    try:
        config = validate(args)
        if reexec:
            _use_c_allocator(sys.argv[1:] if argv is None else argv)
        return run(config)
    except (UsageError, StateError, PolicyError) as e:
        print("rofs: error: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    except MountError as e:
        print("rofs: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> int:
    """The `rofs` command."""
    return main(reexec=True)


if __name__ == "__main__":
    raise SystemExit(entry())
