"""rofs.fuse.workers.FairPool on its own (the mount-level test of the same is
test_hostile.py's bulk-work test): turns per uid, a share per uid, root's reserve."""

import threading

import pytest

from rofs.fuse.workers import FairPool


def run(pool, jobs):
    """Submit (uid, name) jobs that each wait for their gate; returns the order they
    started in, the gates and a function waiting until n have started."""
    started, gates, cond = [], {}, threading.Condition()

    def job(name):
        with cond:
            started.append(name)
            cond.notify_all()
        gates[name].wait(30)

    for uid, name in jobs:
        gates[name] = threading.Event()
        pool.submit(uid, job, (name,), lambda result, error: None)

    def until(n):
        with cond:
            assert cond.wait_for(lambda: len(started) >= n, 10), started

    return started, gates, until


def test_a_user_s_jobs_leave_workers_to_root_and_to_others():
    pool = FairPool(4, "test", reserve=1, share=2)
    try:
        jobs = [(1000, "a%d" % i) for i in range(6)] + [(1001, "b0"), (0, "root")]
        started, gates, until = run(pool, jobs)
        until(4)
        # uid 1000 holds its share (2), uid 1001 one, root the reserve.
        assert sorted(started) == ["a0", "a1", "b0", "root"]
        gates["a0"].set()
        until(5)
        assert started[4] == "a2"  # its own next job, when one of its own is done
        for gate in gates.values():
            gate.set()
        until(8)
    finally:
        for gate in gates.values():
            gate.set()
        pool.shutdown()


def test_uids_take_turns():
    pool = FairPool(1, "test", reserve=0, share=1)
    gate = threading.Event()
    order = []
    pool.submit(5, gate.wait, (30,), lambda result, error: None)  # holds the worker
    for uid, name in [(7, "x1"), (7, "x2"), (7, "x3"), (8, "y1"), (8, "y2")]:
        pool.submit(uid, order.append, (name,), lambda result, error: None)
    gate.set()
    pool.shutdown()
    assert order == ["x1", "y1", "x2", "y2", "x3"]


def test_results_and_errors_reach_done():
    pool = FairPool(2, "test", reserve=0, share=2)
    got = []
    done = threading.Event()

    def record(result, error):
        got.append((result, type(error).__name__ if error else None))
        if len(got) == 2:
            done.set()

    pool.submit(3, divmod, (7, 2), record)
    pool.submit(3, divmod, (7, 0), record)
    assert done.wait(10)
    pool.shutdown()
    assert sorted(got, key=str) == [((3, 1), None), (None, "ZeroDivisionError")]
    with pytest.raises(RuntimeError):
        pool.submit(3, divmod, (1, 1), record)
