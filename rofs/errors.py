"""The one place where exceptions become errno values for the kernel.

A request handler must never let anything but FUSEError escape: any other exception
ends pyfuse3.main() and leaves a dead mount ("Transport endpoint is not connected").
`fuse_errors` wraps every handler: FUSEError passes, OSError keeps its errno, anything
else is logged with its traceback, counted, and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

log = logging.getLogger(__name__)


class Counters:
    """Unexpected failures, for tests and for the operator (logged as they happen)."""

    def __init__(self) -> None:
        self.internal_errors = 0
        # Fault injection for tests of this very path: a request naming this entry
        # raises inside its handler (set from the ROFS_FAULT_NAME environment variable).
        self.fault_name: bytes | None = None


class InjectedFault(Exception):
    pass


def fuse_errors(method):
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("%s%r", name, _brief(args))
        try:
            fault = self.counters.fault_name
            if fault is not None and fault in args:
                raise InjectedFault("injected fault in %s" % name)
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError as e:
            if debug:
                log.debug("%s -> %s", name, errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            if debug:
                log.debug("%s -> %s", name, errno.errorcode.get(e.errno, e.errno))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            self.counters.internal_errors += 1
            log.exception("internal error in %s%r", method.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _brief(args: tuple) -> tuple:
    """Request arguments for the debug log: no request contexts, no file contents."""
    out = []
    for arg in args:
        if isinstance(arg, pyfuse3.RequestContext):
            out.append("pid=%d uid=%d" % (arg.pid, arg.uid))
        elif isinstance(arg, bytes) and len(arg) > 64:
            out.append("<%d bytes>" % len(arg))
        else:
            out.append(arg)
    return tuple(out)
