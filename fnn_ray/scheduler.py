"""Work scheduling policy: which actor runs which :class:`~fnn_ray.plan.WorkItem`, and when.

Pure Python and deterministic (no Ray, no randomness, no hidden clock): the same calls with the same clock
readings give the same answers. The Ray driver owns the actors and calls into a :class:`Scheduler`; the
discrete-event simulator in ``jobs/simulate.py`` drives the very same class.

Policy
------
1. **Initial assignment** (:func:`balanced_assignment`): scans are laid end to end in order of decreasing
   total cost (the items of one scan together) and the line is cut into one contiguous segment per actor,
   the segments as even as possible in cost *including* the head loads they imply (McNaughton's
   wrap-around rule, with the cap found by bisection). A scan cheaper than a per-actor share stays on one
   or two actors; a larger scan is split over as many actors as it needs; the whole run starts with at most
   ``scans + actors - 1`` head loads.
2. **Own queue first**: an actor takes items from the front of its own deque, one scan after the other.
3. **Speed estimates** (only with a ``clock``): each actor's speed is a moving average of item cost per
   second over its last items, restarted from the newest item when that one is more than ``RATE_RESET``
   (25 %) off (the actor's speed has changed: a straggler slowed down or recovered); its *time left* is its
   queued and in-flight cost over that speed, less what the computing item has already run.
4. **Stealing**: an actor whose deque is empty steals one item at a time from the actor with the most time
   left. It prefers an item of a scan it already holds (no head load) from any victim with at least half
   the longest time left, otherwise the tail of the most loaded victim. It steals only if it would finish
   the item (after its own in-flight work and any head load) before the victim would get it done; else it
   gets ``None`` and the item stays where it is.
5. **Pulling ahead of time**: whenever an actor takes from its own queue, it may also move one queued item
   of a scan it holds from the actor with the most time left to the end of its own queue, if it would
   still finish it at least half a mean item sooner. This evens out speed differences long before queues
   run dry, without extra head loads.
6. **End game**: once at most ``REPACK_ITEMS`` (3) items per actor are queued, and again each time that
   number has halved, all queued items are dealt out afresh (:meth:`Scheduler._repack`): the earliest
   common finishing time (found by bisection) by which a best-fit packing gets every actor done, items
   first to actors that hold their scan, then to any with room for a head load as well. With an item or
   two per actor left, item-by-item stealing leaves the tail to chance (a last item behind a head load or
   on an actor that finishes late); the packing sees the whole fleet, e.g. it lets an actor of a scan take
   one more item of it so that a peer has room for an item that needs a head load. Prefetching goes on to
   the end: each actor's queue is its share of the plan. A failure or a join in the end game triggers a
   repack at the next request. Without a clock the finishing times are too rough to pack by; instead a
   *prefetch* request (the actor already has an item in flight) is refused once at most
   ``PREFETCH_RESERVE`` (1/4) queued items per live actor are left, so the last items are not locked behind
   another item on a busy actor while a peer idles; the refused actor asks again when its item completes.
7. **Failure**: the failed actor's in-flight and queued items are dealt, one at a time, to the live actor
   estimated to finish each first (counting a head load against actors that do not hold its scan). With no
   live actor left they wait in an orphan pool that the next :meth:`Scheduler.add_actor` takes over.

Driver protocol
---------------
* Create the scheduler with ``clock=time.monotonic`` (without a clock it still works, but cannot see speed
  differences; see ``python -m jobs.simulate --no-clock``).
* At start, preload the heads of :meth:`Scheduler.scans_of` on each actor, then call
  :meth:`Scheduler.next_item` twice per actor (one item computing, one prefetched).
* When an actor finishes an item: :meth:`Scheduler.complete`, then call :meth:`Scheduler.next_item` for it
  until it has 2 items in flight again or gets ``None``. ``None`` means "nothing for you now", not "done":
  the run is over when :attr:`Scheduler.finished`.
* After every completion, failure or join, also call ``next_item`` for each actor that has nothing in
  flight: a steal that was not worthwhile before may be now, and requeued items need takers.
* When an actor dies: :meth:`Scheduler.fail_actor` (its items are requeued); discard anything it reports
  afterwards (:meth:`Scheduler.complete` from a failed actor raises :class:`SchedulerError`).
* An item of a scan that is not among the actor's loaded heads needs that head loaded first
  (:meth:`Scheduler.scans_of` changes when an actor steals, is given requeued work, or the queues are
  repacked in the end game).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from fnn_ray.plan import HEAD_LOAD_COST, Key, Scan

if TYPE_CHECKING:
    from fnn_ray.plan import WorkItem

__all__ = ["Scheduler", "SchedulerError", "balanced_assignment"]



class SchedulerError(ValueError):
    """A call that does not match the scheduler's state (unknown actor or item, duplicate completion, ...)."""


def _scan_order(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """Group items by scan (stable within a scan), groups by decreasing total cost, ties by scan."""
    groups: dict[Scan, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.scan, []).append(item)
    return sorted(groups.values(), key=lambda g: (-sum(i.cost for i in g), g[0].scan))


def _segments_needed(line: Sequence[WorkItem], start: int, cap: float, head_load_cost: float) -> int:
    """How many segments greedy filling up to ``cap`` needs for ``line[start:]`` (a huge number if impossible)."""
    count, load, last_scan = 0, 0.0, None
    for item in itertools.islice(line, start, None):
        extra = head_load_cost if item.scan != last_scan else 0.0
        if count == 0 or load + extra + item.cost > cap:
            if head_load_cost + item.cost > cap:
                return len(line) + 1
            count, load, extra = count + 1, 0.0, head_load_cost
        load += extra + item.cost
        last_scan = item.scan
    return count


def _min_cap(line: Sequence[WorkItem], n_actors: int, head_load_cost: float) -> float:
    """Smallest per-segment cost (within 0.1 %) for which ``line`` fits in ``n_actors`` contiguous segments."""
    lo = max(i.cost for i in line) + head_load_cost
    hi = sum(i.cost for i in line) + head_load_cost * len(line)
    if _segments_needed(line, 0, lo, head_load_cost) <= n_actors:
        return lo
    while hi - lo > 1e-3 * lo:
        mid = (lo + hi) / 2
        if _segments_needed(line, 0, mid, head_load_cost) <= n_actors:
            hi = mid
        else:
            lo = mid
    return hi


def balanced_assignment(
    items: Sequence[WorkItem], n_actors: int, head_load_cost: float = HEAD_LOAD_COST
) -> list[list[WorkItem]]:
    """Cut the scan-ordered item line into ``n_actors`` contiguous segments of (nearly) equal cost.

    A segment's cost counts one head load per scan it touches. No segment exceeds ``cap``, the smallest
    maximum any contiguous cut of the line can achieve (found by bisection). Within that cap, each segment
    aims at the average of what is left (recomputed per segment, counting the head loads that cuts add), so
    segments come out even rather than full-then-empty. With fewer items than actors, the last actors get
    nothing.
    """
    if n_actors < 1:
        return []
    segments: list[list[WorkItem]] = [[] for _ in range(n_actors)]
    line = [item for group in _scan_order(items) for item in group]
    if not line:
        return segments
    cap = _min_cap(line, n_actors, head_load_cost)
    # scans_from[i]: number of distinct scans among line[i:] (items are grouped by scan)
    scans_from = [0] * (len(line) + 1)
    for i in range(len(line) - 1, -1, -1):
        new_group = i == len(line) - 1 or line[i + 1].scan != line[i].scan
        scans_from[i] = scans_from[i + 1] + (1 if new_group else 0)

    def target_from(index: int, actors_left: int) -> float:
        cuts = min(actors_left - 1, len(line) - index - 1)  # each later cut inside a scan adds a head load
        return (remaining + head_load_cost * (scans_from[index] + cuts)) / actors_left

    remaining = sum(i.cost for i in line)
    actor, load, last_scan = 0, 0.0, None
    target = target_from(0, n_actors)
    for idx, item in enumerate(line):
        extra = head_load_cost if item.scan != last_scan else 0.0
        if actor < n_actors - 1 and load > 0:
            over_cap = load + extra + item.cost > cap
            over_target = load + extra + item.cost / 2 > target
            if over_cap or (
                over_target and _segments_needed(line, idx, cap, head_load_cost) <= n_actors - actor - 1
            ):
                actor, load, last_scan, extra = actor + 1, 0.0, None, head_load_cost
                target = target_from(idx, n_actors - actor)
        segments[actor].append(item)
        load += extra + item.cost
        remaining -= item.cost
        last_scan = item.scan
    return segments


@dataclass
class _Actor:
    """Book-keeping for one live actor (times are readings of the scheduler's optional clock)."""

    name: str
    order: int  # join order; breaks ties deterministically
    queue: deque[WorkItem] = field(default_factory=deque)
    queued_cost: float = 0.0
    # key -> (item, cost to this actor = item cost + a head load if it is the first item of its scan here)
    inflight: dict[Key, tuple[WorkItem, float]] = field(default_factory=dict)
    queued_scans: Counter[Scan] = field(default_factory=Counter)  # scan -> number of its items in the queue
    started: set[Scan] = field(default_factory=set)  # scans of which it has been handed an item
    current_since: float | None = None  # clock reading when the oldest in-flight item started computing
    rate: float | None = None  # measured speed: moving average of cost per clock unit over its last items

    @property
    def held(self) -> set[Scan]:
        """Scans whose heads it has loaded or will need for its queue."""
        return self.started | {scan for scan, n in self.queued_scans.items() if n > 0}

    def holds(self, scan: Scan) -> bool:
        return scan in self.started or self.queued_scans[scan] > 0

    def push(self, item: WorkItem) -> None:
        self.queue.append(item)
        self.queued_cost += item.cost
        self.queued_scans[item.scan] += 1

    def take(self, index: int) -> WorkItem:
        """Remove the queued item at ``index`` (0 = front, -1 = tail)."""
        if index == 0:
            item = self.queue.popleft()
        elif index == -1 or index == len(self.queue) - 1:
            item = self.queue.pop()
        else:
            item = self.queue[index]
            del self.queue[index]
        self.queued_cost -= item.cost
        self.queued_scans[item.scan] -= 1
        if not self.queue:
            self.queued_cost = 0.0  # no float drift on an empty queue
        return item

    def clear(self) -> None:
        """Empty the queue."""
        self.queue.clear()
        self.queued_cost = 0.0
        self.queued_scans.clear()

    def head_cost(self, scan: Scan, head_load_cost: float) -> float:
        """Head load this actor would pay for an item of ``scan``."""
        return 0.0 if self.holds(scan) else head_load_cost


@dataclass(frozen=True)
class _Estimate:
    """Speed and time-to-empty of one actor, as seen at one moment."""

    speed: float  # cost per time unit
    left: float  # time until everything in flight and queued is done


@dataclass(frozen=True)
class _Bin:
    """One live actor as :func:`_pack` sees it."""

    actor: _Actor
    speed: float  # cost per time unit
    busy: float  # time until its in-flight items are done

    def finish(self, head_load_cost: float) -> float:
        """Time until it would be done with its queue as it is (plus a head load per queued scan not started)."""
        new_scans = sum(1 for scan, n in self.actor.queued_scans.items() if n > 0 and scan not in self.actor.started)
        return self.busy + (self.actor.queued_cost + head_load_cost * new_scans) / self.speed


def _pack(
    bins: Sequence[_Bin], items: Sequence[WorkItem], level: float, head_load_cost: float
) -> list[list[WorkItem]] | None:
    """Deal ``items`` (grouped by scan) to ``bins`` so that each is done by ``level``; ``None`` if this fails.

    First every item goes to an actor that holds its scan (no head load), then what is left to any actor,
    counting a head load where it does not hold the scan yet. Each goes *best fit*: to the actor with the
    least room that still fits it, which keeps large gaps free for the items that need a head load.
    """
    room = [(level - b.busy) * b.speed for b in bins]
    holders: dict[Scan, list[int]] = {}
    for i, b in enumerate(bins):
        for scan in b.actor.started:
            holders.setdefault(scan, []).append(i)
    plan: list[list[WorkItem]] = [[] for _ in bins]
    rest = []
    for item in items:
        i = _best_holder(item, holders, room)
        if i is None:
            rest.append(item)
        else:
            room[i] -= item.cost
            plan[i].append(item)
    by_room = sorted((r, i) for i, r in enumerate(room))
    for item in rest:
        i = _best_holder(item, holders, room)
        need = item.cost
        if i is None:
            at = bisect.bisect_left(by_room, (item.cost + head_load_cost, -1))
            if at == len(by_room):
                return None
            i = by_room[at][1]
            need += head_load_cost
            holders.setdefault(item.scan, []).append(i)
        del by_room[bisect.bisect_left(by_room, (room[i], i))]
        room[i] -= need
        bisect.insort(by_room, (room[i], i))
        plan[i].append(item)
    return plan


def _earliest_plan(bins: Sequence[_Bin], head_load_cost: float, tolerance: float) -> list[list[WorkItem]] | None:
    """The :func:`_pack` plan of all queued items with the earliest level (bisection to within ``tolerance``)
    below the finishing time of the queues as they are; ``None`` if there is none."""
    items = sorted((item for b in bins for item in b.actor.queue), key=lambda item: item.scan)
    lo = min(b.busy for b in bins)
    hi = max(b.finish(head_load_cost) for b in bins)
    best = None
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        plan = _pack(bins, items, mid, head_load_cost)
        if plan is None:
            lo = mid
        else:
            hi, best = mid, plan
    return best


def _best_holder(item: WorkItem, holders: dict[Scan, list[int]], room: list[float]) -> int | None:
    """The holder of ``item``'s scan with the least room that still fits it, if any."""
    fits = [(room[i], i) for i in holders.get(item.scan, ()) if room[i] >= item.cost]
    return min(fits)[1] if fits else None


def _moving_rate(rate: float | None, sample: float, alpha: float, reset: float) -> float:
    """Moving average of speed samples; a sample further than ``reset`` (relative) from it starts afresh."""
    if rate is None or abs(sample - rate) > reset * rate:
        return sample
    return (1 - alpha) * rate + alpha * sample


class Scheduler:
    """Assigns work items to named actors, with per-actor queues, stealing, and failure handling.

    Every item is, at any time, exactly one of: queued on one actor (or in the orphan pool), in flight on
    one actor, or completed. See the module docstring for the policy and the driver protocol.

    ``clock`` (optional; the Ray driver passes ``time.monotonic``) lets the scheduler measure each actor's
    speed (item cost per second over its last items) and so steal and rebalance by estimated finishing
    *time*, which is what keeps mixed-speed fleets and stragglers near the optimum. Without it every actor is
    taken as equally fast and the computing item as half done. The scheduler is deterministic given the
    clock's readings; the simulator passes its simulated time.
    """

    #: A victim with an item of a scan the thief holds is preferred while its time-to-empty is at least this
    #: fraction of the longest.
    PREFER_HELD_FRACTION = 0.5
    #: Weight of the newest item in an actor's moving-average speed...
    RATE_ALPHA = 0.3
    #: ... unless it differs from the average by more than this fraction: then the actor's speed has changed
    #: (a straggler slowed down or recovered) and the newest item alone is the estimate.
    RATE_RESET = 0.25
    #: A queued item moves ahead of time (see :meth:`_pull`) only if that saves this many mean items of time.
    PULL_MARGIN_ITEMS = 0.5
    #: The queues are first repacked (see :meth:`_repack`) once at most this many items per actor are queued...
    REPACK_ITEMS = 3.0
    #: ... and again each time the number of queued items has fallen to this fraction of the last repack's.
    REPACK_FACTOR = 0.5
    #: A repack aims at the earliest common finishing time to within this fraction of a mean item.
    REPACK_TOLERANCE = 0.01
    #: Without a clock (no repacking), prefetch requests are refused once at most this many queued items per
    #: live actor are left.
    PREFETCH_RESERVE = 0.25

    def __init__(
        self,
        items: Sequence[WorkItem],
        actors: Sequence[str],
        head_load_cost: float = HEAD_LOAD_COST,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if head_load_cost < 0:
            raise SchedulerError("head_load_cost must be >= 0")
        if len(set(actors)) != len(actors):
            raise SchedulerError("actor names are not unique")
        self.head_load_cost = float(head_load_cost)
        self._clock = clock
        self._items: dict[Key, WorkItem] = {}
        for item in items:
            if item.key in self._items:
                raise SchedulerError(f"duplicate work item {item.key}")
            self._items[item.key] = item
        self._done: set[Key] = set()
        self._actors: dict[str, _Actor] = {}
        self._failed: set[str] = set()
        self._orphans: deque[WorkItem] = deque()
        self._joined = 0
        self._queued_items = 0
        self._remaining_cost = sum(i.cost for i in self._items.values())
        self._mean_cost = self._remaining_cost / len(self._items) if self._items else 1.0
        self._repack_below: float | None = None  # repack once at most this many items are queued (None: not yet)
        self.steals = 0
        """Number of items taken from another actor's queue, at once or ahead of time (a statistic)."""
        self.requeued = 0
        """Number of items handed back by :meth:`fail_actor` (a statistic)."""
        self.repacks = 0
        """Number of end-game repacks that changed the queues (a statistic)."""

        now = self._now()
        for name in actors:
            self._new_actor(name, now)
        if self._actors:
            segments = balanced_assignment(list(self._items.values()), len(self._actors), self.head_load_cost)
            for state, segment in zip(self._actors.values(), segments):
                for item in segment:
                    state.push(item)
                self._queued_items += len(segment)
        else:
            self._orphans.extend(self._items.values())
            self._queued_items = len(self._orphans)

    # ------------------------------------------------------------------ queries

    @property
    def actors(self) -> list[str]:
        """Live actors, in join order."""
        return list(self._actors)

    @property
    def finished(self) -> bool:
        """True when every item has completed."""
        return len(self._done) == len(self._items)

    @property
    def pending(self) -> int:
        """Items not completed yet (queued, orphaned or in flight)."""
        return len(self._items) - len(self._done)

    @property
    def queued(self) -> int:
        """Items waiting in a queue or the orphan pool (not handed out)."""
        return self._queued_items

    def remaining_cost(self) -> float:
        """Total estimated cost of the items not completed yet (queued, orphaned or in flight)."""
        return max(self._remaining_cost, 0.0) if self.pending else 0.0

    def scans_of(self, actor: str) -> set[Scan]:
        """Scans whose heads ``actor`` holds or needs: those it has been handed items of, and those queued."""
        return set(self._actor(actor).held)

    def in_flight(self, actor: str) -> list[WorkItem]:
        """Items handed to ``actor`` and not completed, oldest first."""
        return [item for item, _ in self._actor(actor).inflight.values()]

    def queue_of(self, actor: str) -> list[WorkItem]:
        """Items queued on ``actor``, in the order it will take them."""
        return list(self._actor(actor).queue)

    # ------------------------------------------------------------------ actions

    def next_item(self, actor: str) -> WorkItem | None:
        """Hand ``actor`` its next item: own queue first, then orphans, then a steal; ``None`` if none now.

        Call it once per free slot (twice at start for one computing + one prefetched item). ``None`` means
        nothing for this actor *now*: no steal is worthwhile, or (without a clock) a prefetch request at the
        very end of the run; it may change after other completions, a failure or a join. Near the end of the
        run a call may first repack all queues (with a clock; see the module docstring).
        """
        state = self._actor(actor)
        now = self._now()
        if now is None:
            if state.inflight and self._queued_items <= self.PREFETCH_RESERVE * len(self._actors):
                return None
        elif 0 < self._queued_items <= self._repack_limit():
            self._repack(now)
            self._repack_below = self.REPACK_FACTOR * self._queued_items
        if state.queue:
            item = state.take(0)
        elif self._orphans:
            item = self._orphans.popleft()
        else:
            choice = self._find_steal(state, now)
            if choice is None:
                return None
            victim, index = choice
            item = victim.take(index)
            self.steals += 1
        self._queued_items -= 1
        cost = item.cost
        if item.scan not in state.started:
            state.started.add(item.scan)
            cost += self.head_load_cost
        if not state.inflight:  # idle -> busy: the item starts computing now
            state.current_since = now
        state.inflight[item.key] = (item, cost)
        if state.queue:
            self._pull(state, now)
        return item

    def complete(self, actor: str, item: WorkItem) -> None:
        """Record that ``actor`` finished ``item``. Raises :class:`SchedulerError` unless it was in flight there."""
        if actor not in self._actors:
            why = "has failed" if actor in self._failed else "is unknown"
            raise SchedulerError(f"actor {actor!r} {why}; cannot complete {item.key}")
        state = self._actors[actor]
        if item.key not in state.inflight:
            if item.key not in self._items:
                raise SchedulerError(f"unknown work item {item.key}")
            if item.key in self._done:
                raise SchedulerError(f"work item {item.key} already completed")
            raise SchedulerError(f"work item {item.key} is not in flight on actor {actor!r}")
        now = self._now()
        _, cost = state.inflight.pop(item.key)
        self._done.add(item.key)
        self._remaining_cost -= item.cost
        if now is not None and state.current_since is not None and now > state.current_since:
            sample = cost / (now - state.current_since)
            state.rate = _moving_rate(state.rate, sample, self.RATE_ALPHA, self.RATE_RESET)
        state.current_since = now  # the prefetched item (if any) starts computing now

    def fail_actor(self, actor: str) -> list[WorkItem]:
        """Remove ``actor``; its in-flight then queued items go back to the live actors (balanced).

        Returns the requeued items. Each goes, in turn, to the live actor estimated to finish it first (its
        outstanding work and speed, plus a head load if it does not hold the item's scan). Without live
        actors the items wait for :meth:`add_actor`.
        """
        state = self._actor(actor)
        del self._actors[actor]
        self._failed.add(actor)
        lost = [item for item, _ in state.inflight.values()] + list(state.queue)
        self._queued_items += len(state.inflight)
        self.requeued += len(lost)
        self._replan()
        if not self._actors:
            self._orphans.extend(lost)
            return lost
        estimates = self._estimates(self._now())
        finish = {name: e.left for name, e in estimates.items()}

        def finish_with(s: _Actor, item: WorkItem) -> float:
            return finish[s.name] + (item.cost + s.head_cost(item.scan, self.head_load_cost)) / estimates[s.name].speed

        for item in lost:
            target = min(self._actors.values(), key=lambda s: (finish_with(s, item), s.order))
            finish[target.name] = finish_with(target, item)
            target.push(item)
        return lost

    def add_actor(self, actor: str) -> None:
        """A new (or replacement) actor joins with an empty queue; it takes orphans first, then steals.

        A failed actor's name may be reused; it starts afresh (no heads held).
        """
        if actor in self._actors:
            raise SchedulerError(f"actor {actor!r} is already live")
        self._failed.discard(actor)
        state = self._new_actor(actor, self._now())
        while self._orphans:
            state.push(self._orphans.popleft())
        self._replan()

    # ------------------------------------------------------------------ internals

    def _now(self) -> float | None:
        return None if self._clock is None else float(self._clock())

    def _new_actor(self, name: str, now: float | None) -> _Actor:
        state = _Actor(name=name, order=self._joined, current_since=now)
        self._joined += 1
        self._actors[name] = state
        return state

    def _actor(self, name: str) -> _Actor:
        try:
            return self._actors[name]
        except KeyError:
            why = "has failed" if name in self._failed else "is unknown"
            raise SchedulerError(f"actor {name!r} {why}") from None

    def _estimates(self, now: float | None) -> dict[str, _Estimate]:
        """Speed and time-to-empty of every live actor.

        With a clock, an actor's speed is its measured rate (actors without a completed item yet get the
        fleet's mean rate) and the computing item is credited with the time it has been running. Without a
        clock, or before any item completed, all speeds are 1 and the computing item counts half done.
        """
        rates = [s.rate for s in self._actors.values() if s.rate is not None]
        fleet = sum(rates) / len(rates) if now is not None and rates else None
        estimates = {}
        for s in self._actors.values():
            speed = 1.0 if fleet is None else (s.rate if s.rate is not None else fleet)
            work = s.queued_cost
            for position, (_, cost) in enumerate(s.inflight.values()):
                if position == 0:  # the computing item
                    if fleet is None or s.current_since is None:
                        cost /= 2
                    else:
                        cost -= min(0.9 * cost, speed * (now - s.current_since))
                work += cost
            estimates[s.name] = _Estimate(speed, work / speed)
        return estimates

    def _pull(self, state: _Actor, now: float | None) -> None:
        """Steal ahead of time: move one queued item of a scan ``state`` holds from the actor estimated to finish
        last to the end of ``state``'s queue, if ``state`` would still finish it a margin sooner.

        Without this, a fast actor would only start stealing when its own queue runs dry, which with big
        speed differences leaves too little time to even out. Only scans the actor holds are pulled (no head
        load), and the margin keeps estimation noise from moving items back and forth.
        """
        estimates = self._estimates(now)
        mine = estimates[state.name]
        held = state.held
        best: tuple[float, int, _Actor, int] | None = None
        for victim in self._actors.values():
            if victim is state or not victim.queue:
                continue
            left = estimates[victim.name].left
            if best is None or (-left, victim.order) < (best[0], best[1]):
                index = _last_index(victim.queue, held)
                if index is not None:
                    best = (-left, victim.order, victim, index)
        if best is None:
            return
        _, _, victim, index = best
        item = victim.queue[index]
        margin = self.PULL_MARGIN_ITEMS * self._mean_cost / mine.speed
        if mine.left + item.cost / mine.speed + margin < self._victim_done(victim, estimates[victim.name], index):
            state.push(victim.take(index))
            self.steals += 1

    def _replan(self) -> None:
        """After a failure or a join in the end game, repack at the next :meth:`next_item`."""
        if self._repack_below is not None:
            self._repack_below = float(self._queued_items)

    def _repack_limit(self) -> float:
        """Repack when at most this many items are queued."""
        if self._repack_below is None:
            return self.REPACK_ITEMS * len(self._actors)
        return self._repack_below

    def _repack(self, now: float) -> None:
        """End game: deal all queued items out afresh so that the last actor is estimated to finish as early as
        possible: :func:`_pack` against a common finishing time, the earliest it manages found by bisection.

        Stealing and pulling move one item at a time between two actors. Near the end, when each actor has
        one or two items left, that leaves the tail to chance: the last items end up behind a head load, or
        on an actor that finishes late. Packing all queued items at once sees the whole fleet: it can, say,
        give an item of a scan to the actor of that scan with time to spare, so that another actor of the
        scan has room for an item that needs a head load. The queues stay as they are unless the packing
        beats them.
        """
        estimates = self._estimates(now)
        bins = [_Bin(s, estimates[s.name].speed, estimates[s.name].left - s.queued_cost / estimates[s.name].speed)
                for s in self._actors.values()]
        tolerance = self.REPACK_TOLERANCE * self._mean_cost / max(b.speed for b in bins)
        plan = _earliest_plan(bins, self.head_load_cost, tolerance)
        if plan is None:
            return
        for b, planned in zip(bins, plan):
            b.actor.clear()
            for item in planned:
                b.actor.push(item)
        self.repacks += 1

    @staticmethod
    def _victim_done(victim: _Actor, estimate: _Estimate, index: int) -> float:
        """Estimated time until ``victim`` finishes its queued item at ``index``."""
        after = sum(i.cost for i in itertools.islice(victim.queue, index + 1, None))
        return estimate.left - after / estimate.speed

    def _find_steal(self, thief: _Actor, now: float | None) -> tuple[_Actor, int] | None:
        """Pick ``(victim, queue index)`` for ``thief`` to take now, or ``None`` if no steal is worthwhile.

        Victims are ranked by estimated time to finish their outstanding work (longest first). An item of a
        scan the thief holds is preferred from any victim within ``PREFER_HELD_FRACTION`` of the longest;
        otherwise the tail of the longest. A steal is worthwhile when the thief, after its own in-flight work
        and a head load for a scan it does not hold, would finish the item before the victim would.
        """
        estimates = self._estimates(now)
        ranked = sorted(
            (s for s in self._actors.values() if s is not thief and s.queue),
            key=lambda s: (-estimates[s.name].left, s.order),
        )
        if not ranked:
            return None
        mine = estimates[thief.name]

        def worthwhile(victim: _Actor, index: int) -> bool:
            item = victim.queue[index]
            thief_done = mine.left + (item.cost + thief.head_cost(item.scan, self.head_load_cost)) / mine.speed
            return thief_done < self._victim_done(victim, estimates[victim.name], index)

        longest = estimates[ranked[0].name].left
        held = thief.held
        if held:
            for victim in ranked:
                if estimates[victim.name].left < self.PREFER_HELD_FRACTION * longest:
                    break
                index = _last_index(victim.queue, held)
                if index is not None and worthwhile(victim, index):
                    return victim, index
        victim = ranked[0]
        if worthwhile(victim, len(victim.queue) - 1):
            return victim, len(victim.queue) - 1
        return None


def _last_index(queue: deque[WorkItem], scans: set[Scan]) -> int | None:
    """Index of the last item in ``queue`` whose scan is in ``scans``."""
    for index in range(len(queue) - 1, -1, -1):
        if queue[index].scan in scans:
            return index
    return None
