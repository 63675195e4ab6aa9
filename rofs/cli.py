"""The `rofs` command: `rofs COMMAND ...` runs that command's module (rofs/commands/),
anything else mounts (rofs/commands/mount.py).  A user's mistake in a command is one
line and exit code 2."""

from __future__ import annotations

import sys

from rofs._sys import raise_open_file_limit
from rofs.commands import (
    attic,
    check,
    diff,
    mount,
    reconcile,
    report,
    restart,
    revert,
    status,
)
from rofs.commands.common import EXIT_USAGE
from rofs.commands.patterns import PatternError
from rofs.commands.report import ReportError
from rofs.store.registry import ToolError
from rofs.store.state import StateError

# Every command besides mounting (the man page and --help are made from their parsers).
COMMANDS = {"report": report, "diff": diff, "revert": revert, "check": check,
            "status": status, "attic": attic, "reconcile": reconcile, "restart": restart}


def run_command(name: str, argv: list[str]) -> int:
    try:
        return COMMANDS[name].main(argv)
    except (PatternError, ReportError, ToolError, StateError) as e:
        print("rofs %s: error: %s" % (name, e), file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 1


def main(argv: list[str] | None = None, *, reexec: bool = False) -> int:
    words = sys.argv[1:] if argv is None else argv
    raise_open_file_limit()  # every command: the tools walk trees a user made
    if words and words[0] in COMMANDS:
        return run_command(words[0], words[1:])
    return mount.main(words, reexec=reexec)


def entry() -> int:
    """The `rofs` command."""
    return main(reexec=True)


if __name__ == "__main__":
    raise SystemExit(entry())
