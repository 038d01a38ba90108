"""Tests of fnn_ray.plan (work items, costs, shard sizing) and fnn_ray.scheduler (assignment, stealing, failure)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest

from fnn_ray.plan import (
    CORE_COST,
    HEAD_LOAD_COST,
    UNIT_COST,
    CostModel,
    WorkItem,
    build_items,
    choose_clips_per_shard,
)
from fnn_ray.scheduler import (
    Scheduler,
    SchedulerError,
    _Actor,
    _Bin,
    _earliest_plan,
    _moving_rate,
    _pack,
    balanced_assignment,
)
from fnn_ray.stimuli import Shard


def make_shards(n: int, clips_per_shard: int = 2, clip_frames: int = 300) -> list[Shard]:
    return [
        Shard(
            url="memory://stimuli",
            path="stimuli.parquet",
            row_start=i * clips_per_shard,
            row_stop=(i + 1) * clips_per_shard,
            clip_ids=tuple(f"c{i * clips_per_shard + k}" for k in range(clips_per_shard)),
            frames=clips_per_shard * clip_frames,
        )
        for i in range(n)
    ]


SCANS = [((4, 7), 5000), ((5, 6), 9000), ((8, 5), 9941), ((9, 6), 7000), ((6, 2), 6500)]


def make_items(n_shards: int = 20, scans=SCANS) -> list[WorkItem]:
    return build_items(scans, make_shards(n_shards))


def drain(sched: Scheduler, actors: list[str]) -> dict[str, list[WorkItem]]:
    """Run to completion, round-robin, one item at a time per actor; returns what each actor ran."""
    ran: dict[str, list[WorkItem]] = {a: [] for a in actors}
    while not sched.finished:
        progressed = False
        for actor in actors:
            item = sched.next_item(actor)
            if item is not None:
                sched.complete(actor, item)
                ran[actor].append(item)
                progressed = True
        assert progressed, "no actor could get work although the run is not finished"
    return ran


# ---------------------------------------------------------------------------------------------------- plan


def test_work_item_properties_and_cost():
    shard = make_shards(1)[0]
    item = WorkItem(8, 5, 9941, shard)
    assert item.scan == (8, 5)
    assert item.part_id == shard.shard_id
    assert item.frames == 600
    assert item.key == (8, 5, shard.shard_id)
    assert item.cost == pytest.approx(600 * (CORE_COST + 9941 * UNIT_COST))
    # readout is a few percent of the core for ~10k units (FLOPs in FNN_ARCHITECTURE.md §7.2)
    assert 0.005 < 9941 * UNIT_COST < 0.05
    assert CostModel().item_cost(600, 9941) == pytest.approx(item.cost)
    assert CostModel().head_load_cost == HEAD_LOAD_COST


def test_work_item_equality_uses_key_and_tolerates_unhashable_parts():
    @dataclass
    class MutableShard:  # unhashable (eq without frozen), like a plain dataclass with a list field
        clip_ids: list
        frames: int = 300

        @property
        def part_id(self) -> str:
            return "s0"

    a = WorkItem(4, 7, 10, MutableShard(["c0"]))
    b = WorkItem(4, 7, 10, MutableShard(["c0"]))
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != WorkItem(4, 8, 10, MutableShard(["c0"]))


def test_build_items_crosses_scans_and_shards_and_honours_skip():
    shards = make_shards(4)
    skip = {(4, 7, shards[1].shard_id), (9, 6, shards[3].shard_id), (1, 1, "not-there")}
    items = build_items(SCANS, shards, skip=skip)
    keys = [i.key for i in items]
    assert len(keys) == len(SCANS) * 4 - 2
    assert len(set(keys)) == len(keys)
    assert not skip & set(keys)
    # scan-major, shards in order within a scan
    assert [i.scan for i in items[:4]] == [(4, 7)] * 3 + [(5, 6)]
    assert items[0].units == 5000
    assert build_items(SCANS, shards) == build_items(SCANS, shards)


def test_build_items_rejects_duplicates():
    shards = make_shards(2)
    with pytest.raises(ValueError):
        build_items([((4, 7), 10), ((4, 7), 20)], shards)
    with pytest.raises(ValueError):
        build_items([((4, 7), 10)], [shards[0], shards[0]])
    with pytest.raises(ValueError):
        build_items([((4, 7), 0)], shards)


def test_choose_clips_per_shard():
    # few actors: the largest shard allowed
    assert choose_clips_per_shard(250, 13, 1) == 8
    # many actors: one clip per shard (items cannot be smaller than a clip)
    assert choose_clips_per_shard(250, 13, 256) == 1
    for actors in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        clips = choose_clips_per_shard(250, 13, actors, items_per_actor=32)
        items = 13 * math.ceil(250 / clips)
        assert 1 <= clips <= 8
        assert clips == 1 or items >= 32 * actors
    with pytest.raises(ValueError):
        choose_clips_per_shard(0, 13, 4)


# ----------------------------------------------------------------------------------------------- initial assignment


@pytest.mark.parametrize("n_actors", [1, 2, 3, 4, 7, 16, 40])
def test_balanced_assignment_covers_everything_once_and_balances(n_actors):
    items = make_items(30)
    segments = balanced_assignment(items, n_actors, head_load_cost=HEAD_LOAD_COST)
    assert len(segments) == n_actors
    assert Counter(i.key for s in segments for i in s) == Counter(i.key for i in items)
    loads = [sum(i.cost for i in s) + HEAD_LOAD_COST * len({i.scan for i in s}) for s in segments]
    biggest = max(i.cost for i in items) + HEAD_LOAD_COST
    mean = sum(loads) / n_actors
    assert max(loads) - mean <= biggest
    assert mean - min(loads) <= biggest
    # contiguous scan-ordered segments: each scan spans consecutive actors, actors hold few scans
    heads = sum(len({i.scan for i in s}) for s in segments)
    assert heads <= len(SCANS) + n_actors - 1


def test_balanced_assignment_splits_a_large_scan():
    # one scan much bigger than the per-actor share must be split over several actors
    items = build_items([((1, 1), 100), ((2, 2), 100)], make_shards(40)) + build_items(
        [((3, 3), 100)], make_shards(4)
    )
    segments = balanced_assignment(items, 4, head_load_cost=0.0)
    holders = [k for k, s in enumerate(segments) if any(i.scan == (1, 1) for i in s)]
    assert len(holders) >= 2
    loads = [sum(i.cost for i in s) for s in segments]
    assert max(loads) - min(loads) <= max(i.cost for i in items)


def test_every_actor_gets_work_and_costs_are_spread():
    items = make_items(40)
    actors = [f"a{k}" for k in range(8)]
    sched = Scheduler(items, actors)
    total = sum(i.cost for i in items)
    biggest = max(i.cost for i in items)
    for actor in actors:
        assert sched.queue_of(actor), f"{actor} got no work"
        assigned = sum(i.cost for i in sched.queue_of(actor)) + HEAD_LOAD_COST * len(sched.scans_of(actor))
        share = (total + HEAD_LOAD_COST * (len(SCANS) + len(actors) - 1)) / len(actors)
        assert abs(assigned - share) <= biggest + HEAD_LOAD_COST
        assert sched.scans_of(actor) == {i.scan for i in sched.queue_of(actor)}
    assert sched.pending == len(items) == sched.queued
    assert sched.remaining_cost() == pytest.approx(total)


def test_more_actors_than_items():
    items = make_items(1)[:3]
    actors = [f"a{k}" for k in range(6)]
    sched = Scheduler(items, actors)
    ran = drain(sched, actors)
    assert sorted(i.key for r in ran.values() for i in r) == sorted(i.key for i in items)


# ---------------------------------------------------------------------------------------------------- dynamics


def test_own_queue_first_and_complete_bookkeeping():
    items = make_items(10)
    sched = Scheduler(items, ["a", "b"])
    first = sched.queue_of("a")[0]
    item = sched.next_item("a")
    assert item == first
    assert sched.in_flight("a") == [item]
    assert sched.pending == len(items)
    before = sched.remaining_cost()
    sched.complete("a", item)
    assert sched.pending == len(items) - 1
    assert sched.remaining_cost() == pytest.approx(before - item.cost)
    assert sched.in_flight("a") == []


def run_own_queue(sched: Scheduler, actor: str) -> None:
    """Let ``actor`` work through its own queue (which may grow by pulls) while the others stand still."""
    while sched.queue_of(actor):
        sched.complete(actor, sched.next_item(actor))


def test_early_finisher_steals_from_the_most_loaded():
    items = make_items(20)
    sched = Scheduler(items, ["a", "b", "c"])
    run_own_queue(sched, "a")
    others = {x: sched.queue_of(x) for x in ("b", "c")}
    loads = {x: sum(i.cost for i in q) for x, q in others.items()}
    most = max(loads, key=lambda x: (loads[x], x == "b"))
    held = sched.scans_of("a")
    steals = sched.steals
    stolen = sched.next_item("a")
    assert stolen is not None and sched.steals == steals + 1
    source = next(x for x, q in others.items() if stolen in q)
    assert stolen not in sched.queue_of(source)
    assert stolen.scan in sched.scans_of("a")
    if stolen.scan in held:
        # preferred: an item of a scan the thief already holds (no head load), from a loaded victim
        assert loads[source] >= Scheduler.PREFER_HELD_FRACTION * loads[most]
    else:
        # otherwise the tail of the most loaded victim
        assert source == most and stolen == others[most][-1]


def test_thief_prefers_scans_it_holds():
    # a: X X X X X X X | b: X X X Y Y Y | c: Y Y Y Y Y Y Y  (X = scan (1, 1), Y = scan (2, 2))
    items = build_items([((1, 1), 200)], make_shards(10)) + build_items([((2, 2), 100)], make_shards(10))
    sched = Scheduler(items, ["a", "b", "c"], head_load_cost=0.0)
    assert sched.scans_of("a") == {(1, 1)} and sched.scans_of("b") == {(1, 1), (2, 2)}
    assert sched.scans_of("c") == {(2, 2)}
    run_own_queue(sched, "a")
    b_queue = sched.queue_of("b")
    assert any(i.scan == (1, 1) for i in b_queue)
    assert len(sched.queue_of("c")) > len(b_queue)  # c is the most loaded, but holds no scan of a's
    stolen = sched.next_item("a")
    assert stolen.scan == (1, 1)
    assert stolen == [i for i in b_queue if i.scan == (1, 1)][-1]


def test_thief_takes_one_item_at_a_time():
    items = make_items(20)
    sched = Scheduler(items, ["a", "b"])
    run_own_queue(sched, "a")
    queued = len(sched.queue_of("b"))
    assert sched.next_item("a") is not None
    assert len(sched.queue_of("b")) == queued - 1
    assert sched.queue_of("a") == []


def test_stealing_balances_a_fast_and_a_slow_actor():
    """The fast actor completes 3 items for each of the slow one's; the work should split about 3:1."""
    items = make_items(20)
    sched = Scheduler(items, ["fast", "slow"])
    done = Counter()
    while not sched.finished:
        for actor, rounds in (("fast", 3), ("slow", 1)):
            for _ in range(rounds):
                item = sched.next_item(actor)
                if item is not None:
                    sched.complete(actor, item)
                    done[actor] += 1
    assert done["fast"] + done["slow"] == len(items)
    assert done["fast"] >= 2.5 * done["slow"]


def test_complete_rejects_unknown_duplicate_and_foreign_items():
    items = make_items(4)
    sched = Scheduler(items, ["a", "b"])
    item = sched.next_item("a")
    with pytest.raises(SchedulerError):
        sched.complete("b", item)  # in flight elsewhere
    sched.complete("a", item)
    with pytest.raises(SchedulerError):
        sched.complete("a", item)  # duplicate
    stranger = WorkItem(99, 9, 10, make_shards(1)[0])
    with pytest.raises(SchedulerError):
        sched.complete("a", stranger)
    queued = sched.queue_of("b")[0]
    with pytest.raises(SchedulerError):
        sched.complete("b", queued)  # never handed out
    with pytest.raises(SchedulerError):
        sched.complete("nobody", item)
    with pytest.raises(SchedulerError):
        sched.next_item("nobody")


def test_constructor_rejects_duplicates():
    items = make_items(2)
    with pytest.raises(SchedulerError):
        Scheduler(items + items[:1], ["a"])
    with pytest.raises(SchedulerError):
        Scheduler(items, ["a", "a"])


def test_without_a_clock_prefetch_is_refused_only_at_the_very_end():
    items = make_items(8)
    actors = ["a", "b"]
    sched = Scheduler(items, actors)  # no clock: no end-game repacking, the last items stay unlocked instead
    assert sched.next_item("a") is not None
    assert sched.next_item("a") is not None  # prefetch granted while plenty is queued
    # drain everything else until the queue is almost empty
    while sched.queued > 0:
        item = sched.next_item("b")
        if item is None:
            break
        sched.complete("b", item)
    # "a" still has work in flight: with nothing (or almost nothing) queued a prefetch gets None
    assert sched.in_flight("a")
    assert sched.next_item("a") is None or sched.queued <= 1


# ---------------------------------------------------------------------------------------------------- end game


def test_moving_rate_smooths_jitter_and_follows_a_change():
    assert _moving_rate(None, 2.0, 0.3, 0.25) == 2.0
    assert _moving_rate(1.0, 1.1, 0.3, 0.25) == pytest.approx(1.03)  # jitter: averaged
    assert _moving_rate(1.0 / 3, 1.0, 0.3, 0.25) == 1.0  # a straggler recovered: the newest item alone
    assert _moving_rate(1.0, 0.5, 0.3, 0.25) == 0.5


def packing_bins(busy_b: float = 0.0) -> tuple[list[_Bin], list[WorkItem]]:
    """a and b hold scan X = (1, 1), c holds Y = (2, 2); c has all three Y items queued, a and b one X each."""
    xs = build_items([((1, 1), 100)], make_shards(2, clips_per_shard=1))
    ys = build_items([((2, 2), 100)], make_shards(3, clips_per_shard=1))
    actors = [_Actor(name, order) for order, name in enumerate("abc")]
    for actor, scan, queued in zip(actors, [(1, 1), (1, 1), (2, 2)], [xs[:1], xs[1:], ys]):
        actor.started.add(scan)
        for item in queued:
            actor.push(item)
    return [_Bin(a, 1.0, busy) for a, busy in zip(actors, [0.0, busy_b, 0.0])], xs + ys


def test_pack_fills_the_holders_of_a_scan_first_then_pays_a_head_load():
    bins, items = packing_bins()
    cost = items[0].cost  # all five items cost the same
    head = cost / 2
    # best fit: both X on a, which leaves b the room for the third Y and its head load (1.5 items)
    plan = _pack(bins, items, 2 * cost + 1, head)
    assert plan is not None
    assert [Counter(i.scan for i in p) for p in plan] == [{(1, 1): 2}, {(2, 2): 1}, {(2, 2): 2}]
    assert _pack(bins, items, 2 * cost - 1, head) is None


def test_earliest_plan_beats_the_queues_or_leaves_them():
    bins, items = packing_bins()
    cost, head = items[0].cost, items[0].cost / 2
    # as queued, c would need 3 items; the best plan takes 2
    plan = _earliest_plan(bins, head, tolerance=1.0)
    assert [Counter(i.scan for i in p) for p in plan] == [{(1, 1): 2}, {(2, 2): 1}, {(2, 2): 2}]
    # with b busy for 2 more items, nothing beats c doing its 3 items: the queues stay
    bins, _ = packing_bins(busy_b=2 * cost)
    assert _earliest_plan(bins, head, tolerance=1.0) is None


def clocked_run(n_shards: int, speeds: dict[str, float], fail: str) -> tuple[Scheduler, Counter]:
    """Each actor keeps two items in flight and computes them one after the other at its speed (cost per time
    unit); the scheduler reads the simulated time. ``fail`` dies in the end game, with 6 items queued."""
    t = [0.0]
    sched = Scheduler(make_items(n_shards), list(speeds), clock=lambda: t[0])
    done_at: dict[str, float] = {}  # actor -> when its computing item completes
    ran: Counter = Counter()
    while not sched.finished:
        for actor in sched.actors:
            while len(sched.in_flight(actor)) < 2 and sched.next_item(actor) is not None:
                pass
            if actor not in done_at and sched.in_flight(actor):
                done_at[actor] = t[0] + sched.in_flight(actor)[0].cost / speeds[actor]
        actor = min(done_at, key=lambda a: (done_at[a], a))
        t[0] = done_at.pop(actor)
        item = sched.in_flight(actor)[0]
        sched.complete(actor, item)
        ran[item.key] += 1
        if fail in sched.actors and sched.queued <= 6:
            sched.fail_actor(fail)
            done_at.pop(fail, None)
    return sched, ran


def test_end_game_repacks_hand_out_every_item_exactly_once():
    sched, ran = clocked_run(12, {"a": 1.0, "b": 0.5, "c": 1.5, "d": 1.0}, fail="d")
    assert sched.finished and sched.repacks >= 1
    assert len(ran) == 60 and set(ran.values()) == {1}


# ---------------------------------------------------------------------------------------------------- failure


def test_failure_requeues_every_item_exactly_once():
    items = make_items(30)
    actors = ["a", "b", "c", "d"]
    sched = Scheduler(items, actors)
    ran: Counter = Counter()
    in_hand = {a: [sched.next_item(a), sched.next_item(a)] for a in actors}
    for a in actors:  # everybody completes one item
        item = in_hand[a].pop(0)
        sched.complete(a, item)
        ran[item.key] += 1
    lost_inflight = list(in_hand["b"])
    lost_queued = sched.queue_of("b")
    requeued = sched.fail_actor("b")
    assert requeued == lost_inflight + lost_queued
    assert sched.requeued == len(requeued)
    assert sched.actors == ["a", "c", "d"]
    queued_now = Counter(i.key for a in sched.actors for i in sched.queue_of(a))
    for item in requeued:
        assert queued_now[item.key] == 1
        owner = next(a for a in sched.actors if item in sched.queue_of(a))
        assert item.scan in sched.scans_of(owner)  # the driver must (pre)load that head
    # the requeued work is spread over the survivors, not dumped on one of them
    receivers = {a for a in sched.actors if any(i in requeued for i in sched.queue_of(a))}
    assert len(receivers) >= 2
    with pytest.raises(SchedulerError):
        sched.complete("b", lost_inflight[0])  # a late report from the dead actor
    with pytest.raises(SchedulerError):
        sched.next_item("b")
    for a in ("a", "c", "d"):  # finish what is in hand
        for item in in_hand[a]:
            sched.complete(a, item)
            ran[item.key] += 1
    for a, items_ran in drain(sched, ["a", "c", "d"]).items():
        for item in items_ran:
            ran[item.key] += 1
    assert sched.finished and sched.pending == 0 and sched.remaining_cost() == 0.0
    assert set(ran) == {i.key for i in items}
    assert set(ran.values()) == {1}


def test_failure_of_the_last_actor_waits_for_a_replacement():
    items = make_items(5)
    sched = Scheduler(items, ["a"])
    item = sched.next_item("a")
    lost = sched.fail_actor("a")
    assert item in lost and len(lost) == len(items)
    assert sched.actors == [] and not sched.finished
    sched.add_actor("a")  # a replacement may reuse the name; it starts afresh
    assert len(sched.queue_of("a")) == len(items)
    drain(sched, ["a"])
    assert sched.finished


def test_add_actor_joins_and_steals():
    items = make_items(20)
    sched = Scheduler(items, ["a", "b"])
    sched.add_actor("c")
    assert sched.scans_of("c") == set()
    item = sched.next_item("c")
    assert item is not None
    assert item.scan in sched.scans_of("c")
    with pytest.raises(SchedulerError):
        sched.add_actor("c")
    sched.complete("c", item)
    drain(sched, ["a", "b", "c"])
    assert sched.finished


# ---------------------------------------------------------------------------------------------------- determinism


def _trace(clock_step: float | None) -> list:
    items = make_items(25)
    t = [0.0]
    clock = None if clock_step is None else (lambda: t[0])
    sched = Scheduler(items, ["a", "b", "c"], clock=clock)
    log = []
    speeds = {"a": 1, "b": 2, "c": 3}
    step = 0
    while not sched.finished:
        step += 1
        t[0] += clock_step or 0.0
        for actor, every in speeds.items():
            if step % every:
                continue
            item = sched.next_item(actor)
            log.append((actor, None if item is None else item.key))
            if item is not None:
                sched.complete(actor, item)
        if step == 10:
            log.append(("fail", [i.key for i in sched.fail_actor("b")]))
            speeds.pop("b")
    return log


@pytest.mark.parametrize("clock_step", [None, 7.0])
def test_deterministic(clock_step):
    assert _trace(clock_step) == _trace(clock_step)
