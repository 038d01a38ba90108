"""Discrete-event simulation of a whole run, driving the real :class:`fnn_ray.scheduler.Scheduler` (no Ray).

    python -m jobs.simulate [--actors 1,2,4,...,256] [--json PATH] [--seed N] [--scenarios a,b,...]
                            [--head-load-cost C] [--frames N] [--clips-per-shard K] [--no-clock]

The workload is MICrONS-like: 13 scans with 104,171 units in total (the scan names and the total are those of
the release, and scan 8-5 has its real 9,941 units; the other counts are made up, between 5,000 and 10,500),
and a stimulus set of 75,000 frames in clips of 300 frames. The shard size is chosen per actor count by
:func:`fnn_ray.plan.choose_clips_per_shard` (8 clips per shard for few actors, down to 1 clip from 32
actors on). Costs come from :mod:`fnn_ray.plan` (core-frames).

Time is measured in core-frames of a speed-1.0 actor. The model of an actor, as the Ray driver runs it:

* it keeps 2 items in flight: one computing, one prefetched. An item's data arrives
  ``fetch_fixed + fetch_per_frame * frames`` (20 + 0.05/frame: a node-local cache) after the item is handed
  out, which is hidden behind the computing item when it was prefetched;
* the first item of a scan it has not loaded yet costs a head load (``--head-load-cost``, default
  :data:`fnn_ray.plan.HEAD_LOAD_COST`) before computing; loaded heads stay;
* computing an item takes ``cost / speed``, where the speed may change over time;
* the scheduler gets the simulated time as its clock (``--no-clock``: none), and idle actors ask for work
  again after every completion, failure and join.

Scenarios (all deterministic for a given ``--seed``):

* ``uniform``: every actor at speed 1.0;
* ``mixed``: 25 % of actors at 0.7x, 25 % at 1.3x, the rest at 1.0x (chosen by the seed);
* ``stragglers``: ``max(1, actors // 16)`` actors run 3x slower from 25 % to 75 % of the nominal run time;
* ``failure``: one actor dies at 50 % of the nominal time; its computing and prefetched items are lost (the
  partial work is wasted) and requeued; **no replacement** (needs >= 2 actors);
* ``failure+replace``: the same, and a fresh actor (speed 1.0, no heads) joins 5 % of the nominal time
  after the failure.

Lower bound: the ``T`` at which the capacity of all actors over ``[startup, T]`` equals the total item cost,
where ``startup = head_load_cost + shortest fetch`` (every working actor must fetch its first item and load at
least one head before it can compute; a failed actor contributes until it fails, a joiner from its join
time), and at least ``startup + largest item / fastest speed``. ``lb_work`` is the plain bound without
startup, ``max(total work / total speed, largest item / fastest speed)``. ``ratio = makespan / lower_bound``
and ``r_work = makespan / lb_work``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from fnn_ray.executor import Policy, execute
from fnn_ray.plan import HEAD_LOAD_COST, WorkItem, build_items, choose_clips_per_shard
from fnn_ray.scheduler import Scheduler
from fnn_ray.simpool import SimPool, SimWorker, SpeedProfile
from fnn_ray.stimuli import Shard

#: 13 scans, 104,171 units in total (8-5 is real; the other unit counts are made up for the simulation).
MICRONS_LIKE_SCANS: tuple[tuple[tuple[int, int], int], ...] = (
    ((4, 7), 5672),
    ((5, 6), 8431),
    ((5, 7), 7958),
    ((6, 2), 6207),
    ((6, 4), 9126),
    ((6, 6), 7532),
    ((6, 7), 8845),
    ((7, 3), 7114),
    ((7, 5), 10302),
    ((8, 5), 9941),
    ((9, 3), 6688),
    ((9, 4), 8019),
    ((9, 6), 8336),
)
assert sum(u for _, u in MICRONS_LIKE_SCANS) == 104_171

SCENARIOS = ("uniform", "mixed", "stragglers", "failure", "failure+replace")
DEFAULT_ACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SimConfig:
    """Workload and actor model of one simulation."""

    scans: tuple[tuple[tuple[int, int], int], ...] = MICRONS_LIKE_SCANS
    total_frames: int = 75_000
    clip_frames: int = 300
    clips_per_shard: int | None = None  # None: choose_clips_per_shard(...) for the actor count
    items_per_actor: int = 32
    max_clips_per_shard: int = 8
    head_load_cost: float = HEAD_LOAD_COST
    fetch_fixed: float = 20.0
    fetch_per_frame: float = 0.05
    seed: int = 0
    use_clock: bool = True  # give the scheduler the simulated clock (as the driver passes time.monotonic)

    def shards(self, actors: int) -> list[Shard]:
        """The stimulus set cut into shards (the last one may be short)."""
        clips = math.ceil(self.total_frames / self.clip_frames)
        per = self.clips_per_shard or choose_clips_per_shard(
            clips, len(self.scans), actors, items_per_actor=self.items_per_actor, max_clips=self.max_clips_per_shard
        )
        shards = []
        for first in range(0, clips, per):
            ids = tuple(f"clip{c:05d}" for c in range(first, min(first + per, clips)))
            frames = min((first + len(ids)) * self.clip_frames, self.total_frames) - first * self.clip_frames
            shards.append(Shard("sim://stimuli", "sim/part-00000.parquet", first, first + len(ids), ids, frames))
        return shards

    def fetch(self, item: WorkItem) -> float:
        return self.fetch_fixed + self.fetch_per_frame * item.frames


@dataclass
class SimResult:
    scenario: str
    actors: int
    clips_per_shard: int
    items: int
    makespan: float
    lower_bound: float
    ratio: float
    lb_work: float
    ratio_work: float
    head_loads: int
    steals: int
    repacks: int
    requeued: int
    wasted: float
    replacement: bool = False


def lower_bounds(config: SimConfig, items: Sequence[WorkItem], specs: Sequence[SimWorker]) -> tuple[float, float]:
    """(bound with per-actor startup, plain work bound); see the module docstring."""
    work = sum(i.cost for i in items)
    biggest = max(i.cost for i in items)
    fastest = max(s.profile.max_speed for s in specs)
    startup = config.head_load_cost + min(config.fetch(i) for i in items)

    def solve(delay: float) -> float:
        def capacity(t: float) -> float:
            return sum(
                s.profile.capacity(s.join_at + delay, min(t, s.fail_at if s.fail_at is not None else math.inf))
                for s in specs
            )

        lo, hi = 0.0, 1.0
        while capacity(hi) < work:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if capacity(mid) >= work else (mid, hi)
        return hi

    return max(solve(startup), startup + biggest / fastest), max(solve(0.0), biggest / fastest)


def make_specs(scenario: str, actors: int, nominal: float, seed: int) -> list[SimWorker]:
    """Actor specs of a scenario; ``nominal`` is total work / total base speed."""
    rng = random.Random(f"{seed}/{scenario}/{actors}")
    names = [f"actor-{i:03d}" for i in range(actors)]
    speeds = [1.0] * actors
    if scenario == "mixed":
        order = list(range(actors))
        rng.shuffle(order)
        quarter = actors // 4
        for i in order[:quarter]:
            speeds[i] = 0.7
        for i in order[quarter : 2 * quarter]:
            speeds[i] = 1.3
    specs = [SimWorker(n, SpeedProfile([(0.0, s)])) for n, s in zip(names, speeds)]
    if scenario == "stragglers":
        for i in rng.sample(range(actors), max(1, actors // 16)):
            specs[i].profile = SpeedProfile([(0.0, 1.0), (0.25 * nominal, 1 / 3), (0.75 * nominal, 1.0)])
    if scenario in ("failure", "failure+replace"):
        victim = rng.randrange(actors)
        specs[victim].fail_at = 0.5 * nominal
        if scenario == "failure+replace":
            specs.append(SimWorker("replacement-000", SpeedProfile([(0.0, 1.0)]), join_at=0.55 * nominal))
    return specs


def simulate(scenario: str, actors: int, config: SimConfig = SimConfig()) -> SimResult | None:
    """Simulate one (scenario, actor count) on the real executor and scheduler over a :class:`SimPool`; ``None``
    when the scenario cannot finish (failure of the only actor)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    if scenario == "failure" and actors < 2:
        return None
    shards = config.shards(actors)
    items = build_items(config.scans, shards)
    nominal = sum(i.cost for i in items) / actors  # run time at speed 1.0 (mixed speeds average 1.0)
    specs = make_specs(scenario, actors, nominal, config.seed)
    initial = [s for s in specs if s.join_at == 0.0]
    pool = SimPool(initial, config.fetch, config.head_load_cost, spares=[s for s in specs if s.join_at > 0.0])
    names = pool.start(len(initial))
    scheduler = Scheduler(items, names, head_load_cost=config.head_load_cost, clock=pool.clock if config.use_clock else None)
    completed: Counter = Counter()
    run = execute(items, pool, scheduler, lambda result: completed.update([result.key]),
                  policy=Policy(max_actor_restarts=len(specs) - len(initial), tick_s=math.inf))
    if run.failures or len(completed) != len(items) or set(completed.values()) != {1}:
        raise RuntimeError(f"an item was lost or completed twice: {run.failures}")
    lb, lb_work = lower_bounds(config, items, specs)
    return SimResult(
        scenario=scenario,
        actors=actors,
        clips_per_shard=shards[0].row_stop - shards[0].row_start,
        items=len(items),
        makespan=pool.makespan,
        lower_bound=lb,
        ratio=pool.makespan / lb,
        lb_work=lb_work,
        ratio_work=pool.makespan / lb_work,
        head_loads=pool.head_loads,
        steals=scheduler.steals,
        repacks=scheduler.repacks,
        requeued=scheduler.requeued,
        wasted=pool.wasted,
        replacement=scenario == "failure+replace",
    )


def format_table(results: Sequence[SimResult]) -> str:
    header = (
        f"{'scenario':<16} {'actors':>6} {'clips':>5} {'items':>6} {'makespan':>10} {'lower_bd':>10} "
        f"{'ratio':>6} {'lb_work':>10} {'r_work':>6} {'heads':>6} {'steals':>6} {'repack':>6} {'requeue':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.scenario:<16} {r.actors:>6} {r.clips_per_shard:>5} {r.items:>6} {r.makespan:>10.0f} "
            f"{r.lower_bound:>10.0f} {r.ratio:>6.3f} {r.lb_work:>10.0f} {r.ratio_work:>6.3f} "
            f"{r.head_loads:>6} {r.steals:>6} {r.repacks:>6} {r.requeued:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", default=",".join(map(str, DEFAULT_ACTORS)), help="comma-separated actor counts")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-load-cost", type=float, default=HEAD_LOAD_COST, help="head load cost (core-frames)")
    parser.add_argument("--clips-per-shard", type=int, default=None, help="fixed shard size (default: chosen)")
    parser.add_argument("--items-per-actor", type=int, default=SimConfig.items_per_actor)
    parser.add_argument("--no-clock", action="store_true", help="run the scheduler without a clock")
    parser.add_argument("--frames", type=int, default=SimConfig.total_frames, help="frames in the stimulus set")
    args = parser.parse_args(argv)

    actor_counts = [int(a) for a in args.actors.split(",") if a.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if any(a < 1 for a in actor_counts):
        parser.error("actor counts must be positive")
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    config = SimConfig(
        seed=args.seed,
        head_load_cost=args.head_load_cost,
        clips_per_shard=args.clips_per_shard,
        items_per_actor=args.items_per_actor,
        use_clock=not args.no_clock,
        total_frames=args.frames,
    )
    started = time.perf_counter()
    results = []
    for scenario in scenarios:
        for actors in actor_counts:
            result = simulate(scenario, actors, config)
            if result is not None:
                results.append(result)
    print(format_table(results))
    for label, failing in (("without failures", False), ("with a failure", True)):
        chosen = [r for r in results if ("failure" in r.scenario) == failing and r.actors >= 4]
        if chosen:
            worst = max(chosen, key=lambda r: r.ratio)
            print(f"worst ratio {label} (4+ actors): {worst.ratio:.3f} ({worst.scenario}, {worst.actors} actors)")
    print(f"({len(results)} runs in {time.perf_counter() - started:.1f} s; time unit: one core-frame at speed 1.0)")
    if args.json:
        payload = {"config": asdict(config), "results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
