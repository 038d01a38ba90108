"""The executor's loop and its retry decision, on simulated workers (no model, no Ray, no wall clock).

:func:`fnn_ray.executor.decide` is checked against a table; :func:`fnn_ray.executor.execute` runs on a
:class:`fnn_ray.simpool.SimPool` whose outcomes a test may rewrite (:class:`Scripted`), so retries, back-off,
store outages, lost workers and stealing are checked by what happened (attempts, submissions, counts).
"""

from __future__ import annotations

from collections import Counter

import pytest

from fnn_ray.executor import Fail, Policy, Resubmit, RetryAt, decide, execute
from fnn_ray.plan import WorkItem, build_items
from fnn_ray.scheduler import Scheduler
from fnn_ray.simpool import SimPool, SimWorker, SpeedProfile
from fnn_ray.stimuli import Shard
from fnn_ray.storage import StoreUnavailable

POLICY = Policy(max_retries=2, store_timeout_s=100.0, backoff_base_s=1.0, backoff_cap_s=8.0, jitter=lambda cap: cap)


# --------------------------------------------------------------------------------------------------- decide
@pytest.mark.parametrize("cause, attempts, first, now, expected", [
    (ValueError("bad row"), 1, 0.0, 0.0, Fail),
    (FileNotFoundError("gone"), 1, 0.0, 0.0, Fail),
    (KeyError("unit"), 1, 0.0, 0.0, Fail),
    (StoreUnavailable("down", what="x"), 1, 0.0, 0.0, Fail),
    (RuntimeError("cuda hiccup"), 1, 0.0, 0.0, Resubmit),
    (RuntimeError("cuda hiccup"), 2, 0.0, 0.0, Resubmit),
    (RuntimeError("cuda hiccup"), 3, 0.0, 0.0, Fail),  # max_retries=2: the third failure is final
    (ConnectionResetError("reset"), 1, 10.0, 10.0, RetryAt(12.0)),  # 1 * 2**1, jitter = the cap
    (ConnectionResetError("reset"), 3, 10.0, 20.0, RetryAt(28.0)),  # 1 * 2**3 = 8 = the cap
    (ConnectionResetError("reset"), 9, 10.0, 50.0, RetryAt(58.0)),  # capped at 8
    (TimeoutError("slow"), 4, 10.0, 109.9, RetryAt(117.9)),
    (TimeoutError("slow"), 4, 10.0, 110.0, Fail),  # 100 s since the first fault: given up
])
def test_decide(cause, attempts, first, now, expected):
    action = decide(cause, attempts, first, now, POLICY)
    if isinstance(expected, type):
        assert type(action) is expected
    else:
        assert action == expected


def test_decide_gives_up_on_the_store_with_a_clear_error():
    action = decide(ConnectionRefusedError("refused"), 5, 0.0, 300.0, POLICY)
    assert isinstance(action, Fail) and isinstance(action.error, StoreUnavailable)
    assert "store unreachable for 300 s: ConnectionRefusedError: refused; rerun when it is back" in str(action.error)


def test_decide_passes_a_data_error_through_unchanged():
    error = ValueError("item 4-7/x: row 2 (clip_id 'c'): frames has 7 bytes")
    assert decide(error, 1, 0.0, 0.0, POLICY) == Fail(error)


# -------------------------------------------------------------------------------------------------- execute
def items(shards: int = 12, scans=(((4, 7), 100), ((8, 5), 200))) -> list[WorkItem]:
    parts = [Shard("sim://s", "sim/p.parquet", 2 * i, 2 * i + 2, (f"c{2 * i}", f"c{2 * i + 1}"), 100)
             for i in range(shards)]
    return build_items(list(scans), parts)


class Scripted:
    """``pool`` whose outcome for an item is replaced by the next error of ``errors[item.key]`` while any are
    left (the item still takes its time); counts submissions per item."""

    def __init__(self, pool: SimPool, errors: dict) -> None:
        self.pool, self.errors, self.submitted = pool, {k: list(v) for k, v in errors.items()}, Counter()

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def submit(self, name, item):
        self.submitted[item.key] += 1
        self.pool.submit(name, item)

    def wait(self, timeout_s):
        outcome = self.pool.wait(timeout_s)
        if outcome is not None and outcome[1] is not None and self.errors.get(outcome[1].key):
            return outcome[0], outcome[1], self.errors[outcome[1].key].pop(0)
        return outcome


def run(work, workers, errors=None, policy=POLICY, spares=()):
    pool = Scripted(SimPool(workers, lambda item: 5.0, head_load_cost=20.0, spares=spares), errors or {})
    names = pool.start(len(workers))
    scheduler = Scheduler(work, names, head_load_cost=20.0, clock=pool.clock)
    committed = Counter()
    execution = execute(work, pool, scheduler, lambda result: committed.update([result.key]), policy=policy)
    return execution, committed, pool


def workers(n: int, speeds=None) -> list[SimWorker]:
    return [SimWorker(f"actor-{i}", SpeedProfile([(0.0, (speeds or {}).get(i, 1.0))])) for i in range(n)]


def test_every_item_once():
    work = items()
    execution, committed, pool = run(work, workers(3))
    assert execution.done == len(work) and not execution.failures
    assert set(committed) == {i.key for i in work} and set(committed.values()) == {1}
    assert sorted(k for keys in execution.ran.values() for k in keys) == sorted(committed)
    assert pool.submitted == Counter({i.key: 1 for i in work})


def test_ordinary_errors_are_retried_on_the_same_worker_then_given_up():
    work = items(4)
    flaky, broken = work[0].key, work[1].key
    execution, committed, pool = run(work, workers(2), {flaky: [RuntimeError("once")],
                                                        broken: [RuntimeError("again")] * 3})
    assert pool.submitted[flaky] == 2 and committed[flaky] == 1
    assert pool.submitted[broken] == 3 and broken not in committed  # 1 + max_retries attempts
    assert execution.failed == 1 and execution.retries == 3
    assert execution.failures[0].endswith("RuntimeError: again (after 3 attempts)")
    assert execution.done == len(work) - 1


def test_a_data_error_fails_its_item_at_once_and_only_it():
    work = items(4)
    execution, committed, pool = run(work, workers(2), {work[2].key: [ValueError("row 3: bad frames")]})
    assert pool.submitted[work[2].key] == 1 and execution.failed == 1 and execution.retries == 0
    assert "ValueError: row 3: bad frames" in execution.failures[0] and execution.done == len(work) - 1


def test_store_faults_back_off_then_succeed():
    work = items(3)
    key = work[0].key
    patient = Policy(store_timeout_s=10_000.0, jitter=lambda cap: cap)  # items take 100 time units each here
    execution, committed, pool = run(work, workers(1), {key: [ConnectionResetError("reset")] * 3}, policy=patient)
    assert pool.submitted[key] == 4 and committed[key] == 1 and execution.retries == 3 and not execution.failures


def test_a_store_outage_stops_handing_out_work():
    work = items(6)
    policy = Policy(store_timeout_s=10.0, backoff_base_s=1.0, backoff_cap_s=4.0, jitter=lambda cap: cap)
    down = {item.key: [ConnectionRefusedError("refused")] * 100 for item in work}
    execution, committed, pool = run(work, workers(1), down, policy=policy)
    assert not committed and execution.store_failures >= 1
    assert sum(pool.submitted.values()) < 100  # gave up instead of retrying every item for ever
    assert execution.failures[-1].startswith("store unreachable for 10 s:")
    assert all("store unreachable" in f for f in execution.failures)


def test_a_lost_worker_is_replaced_and_its_items_requeued():
    work = items(12)
    team = workers(3)
    team[1].fail_at = 300.0
    spare = SimWorker("spare-0", SpeedProfile([(0.0, 1.0)]))
    execution, committed, pool = run(work, team, spares=[spare])
    assert execution.actor_restarts == 1 and execution.requeued >= 1
    assert set(committed.values()) == {1} and len(committed) == len(work)
    assert "actor-1" not in execution.ran or all(k in committed for k in execution.ran["actor-1"])
    assert execution.ran.get("spare-0"), "the replacement did no work"


def test_without_a_live_worker_the_rest_is_reported_pending():
    work = items(12)
    team = workers(1)
    team[0].fail_at = 300.0
    execution, committed, pool = run(work, team, policy=Policy(max_actor_restarts=0))
    assert execution.actor_restarts == 0 and 0 < len(committed) < len(work)
    assert execution.failures == [f"no live worker left after 0 restart(s): {len(work) - len(committed)} item(s) "
                                  f"not computed; rerun to finish them"]


def test_idle_workers_steal_from_a_slow_one():
    work = items(16)
    execution, committed, pool = run(work, workers(4, speeds={0: 0.2}))
    slow = execution.assigned["actor-0"]
    stolen = [k for name, keys in execution.ran.items() if name != "actor-0" for k in keys if k in slow]
    assert execution.steals >= 1 and stolen
    assert len(execution.ran.get("actor-0", [])) < len(slow)
    assert set(committed.values()) == {1} and len(committed) == len(work)
