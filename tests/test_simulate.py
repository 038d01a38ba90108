"""Tests of jobs.simulate: the discrete-event simulator drives the real Scheduler; quick runs check the targets."""

from __future__ import annotations

import json

import pytest

from fnn_ray.simpool import SpeedProfile
from jobs.simulate import MICRONS_LIKE_SCANS, SCENARIOS, SimConfig, main, simulate

# a small stimulus set (10,000 frames = 34 clips) keeps the file quick; one test runs the full workload (~2 s)
SMALL = SimConfig(total_frames=10_000)


def test_workload_matches_the_release():
    assert len(MICRONS_LIKE_SCANS) == 13
    assert sum(u for _, u in MICRONS_LIKE_SCANS) == 104_171
    assert dict(MICRONS_LIKE_SCANS)[(8, 5)] == 9941
    assert all(5_000 <= u <= 10_500 for _, u in MICRONS_LIKE_SCANS)
    shards = SimConfig().shards(4)
    assert sum(s.frames for s in shards) == 75_000


def test_speed_profile():
    p = SpeedProfile([(0.0, 1.0), (10.0, 0.5), (20.0, 1.0)])
    assert p.finish(0.0, 5.0) == pytest.approx(5.0)
    assert p.finish(5.0, 10.0) == pytest.approx(20.0)  # 5 at speed 1, then 5 at speed 0.5
    assert p.capacity(0.0, 30.0) == pytest.approx(25.0)


@pytest.mark.parametrize("actors", [4, 16])
@pytest.mark.parametrize("scenario", ["uniform", "mixed", "stragglers"])
def test_makespan_near_lower_bound(scenario, actors):
    result = simulate(scenario, actors, SMALL)
    assert result.makespan >= result.lower_bound * (1 - 1e-9)
    assert result.ratio <= 1.06, result


def test_stragglers_at_256_actors_within_5_percent():
    """The full workload (one clip per item, ~13 items per actor): the end-game repacking keeps the tail short."""
    result = simulate("stragglers", 256)
    assert result.clips_per_shard == 1 and result.items == 3250
    assert result.ratio <= 1.05, result


@pytest.mark.parametrize("scenario", ["failure", "failure+replace"])
def test_failure_stays_within_bounds(scenario):
    result = simulate(scenario, 8, SMALL)
    assert result.requeued > 0
    assert 1.0 <= result.ratio <= 1.15, result


def test_single_actor_failure_without_replacement_is_skipped():
    assert simulate("failure", 1, SMALL) is None
    assert simulate("failure+replace", 1, SMALL).ratio < 1.05


def test_deterministic_and_seeded():
    a = simulate("mixed", 8, SMALL)
    b = simulate("mixed", 8, SMALL)
    assert a == b
    assert SimConfig(seed=1) != SMALL


def test_unknown_scenario():
    with pytest.raises(ValueError):
        simulate("meteor", 4, SMALL)
    assert "uniform" in SCENARIOS


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    argv = ["--actors", "2,4", "--scenarios", "uniform,failure", "--json", str(out), "--seed", "3", "--frames", "6000"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "makespan" in printed and "uniform" in printed
    data = json.loads(out.read_text())
    assert data["config"]["seed"] == 3 and data["config"]["total_frames"] == 6000
    rows = data["results"]
    assert {(r["scenario"], r["actors"]) for r in rows} == {
        ("uniform", 2),
        ("uniform", 4),
        ("failure", 2),
        ("failure", 4),
    }
    assert all(r["ratio"] >= 1.0 for r in rows)
