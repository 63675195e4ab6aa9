"""rofs(1), generated from the command line parsers, so the man page and --help never
disagree.  `python -m rofs.manpage > docs/rofs.1`; tests/test_cli.py checks the
committed page is what this prints."""

from __future__ import annotations

import argparse
import sys

from rofs import __version__, cli
from rofs.commands import mount


def _roff(text: str) -> str:
    out = text.replace("\\", "\\\\").replace("-", "\\-")
    lines = []
    for line in out.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()[1:])


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()
                names += " [%s]" % metavar if action.nargs == "?" else " %s" % metavar
        else:
            names = action.metavar or action.dest
        out += [".TP", "\\fB%s\\fR" % _roff(names), _roff(action.help or "")]
    return out


def _section(parser: argparse.ArgumentParser) -> list[str]:
    out = [".PP", "\\fB%s\\fR" % _roff(_usage(parser))]
    if parser.description:
        out += [".PP", _roff(" ".join(parser.description.split()))]
    out += _options(parser)
    if parser.epilog:
        out += [".PP", ".nf", _roff(parser.epilog), ".fi"]
    return out


def render() -> str:
    main = mount.build_parser()
    lines = [
        '.TH ROFS 1 "" "rofs %s" "User Commands"' % __version__,
        ".SH NAME",
        "rofs \\- copy\\-on\\-write FUSE overlay for read\\-only roots",
        ".SH SYNOPSIS",
    ]
    parsers = [main] + [command.build_parser() for command in cli.COMMANDS.values()]
    for parser in parsers:
        lines += [".PP", "\\fB%s\\fR" % _roff(_usage(parser))]
    lines += [".SH DESCRIPTION", _roff(" ".join(main.description.split())), ".SH OPTIONS"]
    lines += _options(main)
    lines += [".PP", ".nf", _roff(main.epilog), ".fi", ".SH COMMANDS"]
    for parser in parsers[1:]:
        lines += [".SS %s" % _roff(parser.prog)] + _section(parser)
    lines += [
        ".SH FILES",
        ".TP", "\\fISTATEDIR\\fR/\\fIMOUNTPOINT\\fR/", "the upper layer (kernel overlayfs format)",
        ".TP", "\\fISTATEDIR\\fR/.rofs/", "format, work, index, scratch layer, write log, mount "
        "records, attic (saved changes a policy change or a reconcile moved aside), bases "
        "(what a merge with a new image needs)",
        ".TP", "/run/rofs/", "live mounts' records and control sockets "
        "(\\fB$XDG_RUNTIME_DIR\\fR/rofs/ for a user's mounts)",
        ".SH ENVIRONMENT",
        ".TP", "ROFS_RUN_DIR", "where live mounts publish their records and control sockets, "
        "instead of /run/rofs/ (the tests use it; daemons and tools must agree)",
        ".TP", "ROFS_LISTING_BUDGET", "directory names the daemon may hold in readdir "
        "snapshots for users other than root (default 2000000); past it their readdir "
        "fails with ENOMEM",
        ".TP", "/usr/local/lib/systemd/system/rofs@.service", "the systemd template unit "
        "(installed by setup.sh; the instance is the escaped mountpoint)",
        ".SH SEE ALSO",
        "mount.fuse3(8), fusermount3(1), systemd.service(5), the docs/ directory of the "
        "rofs sources.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
