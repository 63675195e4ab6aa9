"""What a handler's coroutines may await while the request loop (rofs.fuse.session)
goes on serving: `offload(fn, *args)`, fn(*args) on a worker thread, its result sent
back to the coroutine on the loop's thread; `Event`, set by one handler and waited on
by others.  `Loop` hands the same to a model that must not import the protocol
(rofs.overlay gets `LOOP`), and `run_inline` runs such coroutines to their ends on one
thread, offloaded work inline (tests, and callers outside the loop)."""

from __future__ import annotations

import collections
from collections.abc import Callable


class Offload:
    """`await offload(fn, *args)`: fn(*args) on a worker thread (see the docstring).
    `short`: work that must not wait behind bulk copies (the fsyncs that make a change
    durable before its reply): it has workers of its own."""

    __slots__ = ("fn", "args", "short")

    def __init__(self, fn: Callable, *args, short: bool = False) -> None:
        self.fn, self.args, self.short = fn, args, short

    def __await__(self):
        return (yield self)


offload = Offload


class Event:
    """Set once; handlers that wait on it resume (on the loop's thread) when it is."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for resume in waiters:
            resume()

    def wait(self) -> Wait:
        return Wait(self)


class Wait:
    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __await__(self):
        if not self.event._set:
            yield self


class Loop:
    """What the request loop offers the coroutines of a filesystem's model, which may
    then know nothing of this protocol: `await loop.offload(fn, *args)` runs fn(*args)
    on a worker thread while the loop serves other requests; `loop.event()` is an Event
    that coroutines wait on (`await event.wait()`) until one sets it;
    `loop.offload_short` is offload for short work that must not queue behind bulk
    copies."""

    __slots__ = ()

    @staticmethod
    def offload(fn: Callable, *args) -> Offload:
        return Offload(fn, *args)

    @staticmethod
    def offload_short(fn: Callable, *args) -> Offload:
        """offload, on workers no bulk copy occupies (see Offload)."""
        return Offload(fn, *args, short=True)

    @staticmethod
    def event() -> Event:
        return Event()


LOOP = Loop()  # the one the Session and run_inline serve


def run_inline(*coros):
    """Run coroutines to their ends on this thread (tests, and callers outside the
    loop), taking turns at each await; offloaded work runs inline.  Returns the value
    of the one coroutine, or a list of them.  Waiting on an event nobody will set is an
    error."""
    results: list = [None] * len(coros)
    # (index, coroutine, value to send, exception to throw, event waited on)
    runnable = collections.deque((i, c, None, None, None) for i, c in enumerate(coros))
    stalled = 0
    while runnable:
        i, coro, value, error, waiting = runnable.popleft()
        if waiting is not None and not waiting.is_set():
            runnable.append((i, coro, None, None, waiting))
            stalled += 1
            if stalled > len(runnable):
                raise RuntimeError("run_inline: every coroutine waits on an event")
            continue
        stalled = 0
        try:
            step = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            results[i] = stop.value
            continue
        if isinstance(step, Offload):
            try:
                runnable.append((i, coro, step.fn(*step.args), None, None))
            except Exception as e:
                runnable.append((i, coro, None, e, None))
        elif isinstance(step, Wait):
            runnable.append((i, coro, None, None, step.event))
        else:
            raise RuntimeError("run_inline: a coroutine awaited %r" % (step,))
    return results[0] if len(coros) == 1 else results
