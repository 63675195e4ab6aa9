"""What the commands share: the exit code of a usage error, and the arguments several of
them take (the state dir, --ignore)."""

from __future__ import annotations

import argparse
import textwrap

EXIT_USAGE = 2


def ignore_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ignore", metavar="PATTERN", action="append",
                        help="leave out paths matching PATTERN and everything below them "
                        "(a glob: * and ? within a name, ** across names, e.g. "
                        "'/etc/.git/**'; repeatable)")
    parser.add_argument("--ignore-file", metavar="FILE", action="append",
                        help="patterns to leave out, one per line, # comments (repeatable)")


def para(text: str) -> str:
    return textwrap.fill(text, 80)


def state_option(parser: argparse.ArgumentParser, text: str) -> None:
    """--state STATEDIR, which every command that reads a state dir takes (where it also
    takes the state dir as its first operand, as before, either way works)."""
    parser.add_argument("--state", metavar="STATEDIR", help=text)


def state_operands(parser: argparse.ArgumentParser, metavar: str, more: str = "") -> None:
    """The operands of a command whose first operand is the state dir (unless --state
    names it), then what `more` says; split by take_state."""
    parser.add_argument("operands", metavar=metavar, nargs="*",
                        help="the state dir (unless --state names it)" + more)
    state_option(parser, "the state dir")


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


def command_parser(name: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of `rofs NAME` (description wrapped, examples in the epilog as given)."""
    return argparse.ArgumentParser(
        prog="rofs " + name, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=para(description), epilog=epilog)
