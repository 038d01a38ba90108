"""One output, one computation: a rerun whose fingerprint differs is refused (exit 2, nothing written) unless
``--overwrite`` starts a clean output; settings that only spread the work (actors, batch sizes) resume.

The fast tests build jobs with the plan functions (no Ray); the slow ones run the command lines on a tiny release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fnn_model.config import NetworkConfig
from fnn_model.synthetic import make_release
from fnn_ray.experiment import ExperimentConfig, plan_experiment
from fnn_ray.fingerprint import OtherComputation, check, clear, differences
from fnn_ray.generators import family_from_name
from fnn_ray.ledger import Ledger
from fnn_ray.manifest import Manifest
from fnn_ray.responses import read_responses
from fnn_ray.sweep import SweepConfig, plan_sweep
from jobs import sweep as sweep_cli
from jobs import tuning as tuning_cli
from jobs.make_stimuli import make_stimuli, synthetic_movie

REPO = Path(__file__).resolve().parent.parent
SCANS = [(4, 7, 9), (8, 5, 12)]
HEIGHT, WIDTH, CLIP_FRAMES, CONTEXT = 36, 64, 8, 3
SORT = [("session", "ascending"), ("scan_idx", "ascending"), ("clip_id", "ascending"), ("readout_id", "ascending")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two releases (other weights), a movie cut into 6 clips of 8 frames in 2 files without context, and the same
    clips with 3 context frames each (the first clip has none: the movie starts there)."""
    root = tmp_path_factory.mktemp("fingerprint")
    make_release(str(root / "release"), SCANS, NetworkConfig.tiny(), seed=0)
    make_release(str(root / "other-release"), SCANS, NetworkConfig.tiny(), seed=1)
    np.save(root / "movie.npy", synthetic_movie(6 * CLIP_FRAMES, HEIGHT, WIDTH))
    for name, context in (("stimuli", 0), ("context-stimuli", CONTEXT)):
        make_stimuli(str(root / "movie.npy"), str(root / name), clip_frames=CLIP_FRAMES, context_frames=context,
                     clips_per_file=3)
    return {"root": root, "release": root / "release", "other-release": root / "other-release",
            "stimuli": root / "stimuli", "context-stimuli": root / "context-stimuli"}


def sweep_config(data, output, **kw) -> SweepConfig:
    kw = {"release": str(data["release"]), "stimuli": str(data["stimuli"]), "output": str(output),
          "clips_per_shard": 2, **kw}
    return SweepConfig(**kw)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------- fast: plans
def test_fingerprint_ignores_how_the_work_is_spread_and_where_inputs_lie(data, tmp_path):
    base = plan_sweep(sweep_config(data, tmp_path / "out")).fingerprint
    assert set(base) == {"code", "release", "scans", "dtype", "stimuli", "context_frames"}
    assert base["scans"] == ["4-7", "8-5"] and base["dtype"] == "float32" and base["context_frames"] == 0
    spread = sweep_config(data, tmp_path / "out", actors=3, clips_per_batch=1, store_timeout_s=5.0, max_heads=1,
                          cpus_per_actor=1.0)
    assert plan_sweep(spread).fingerprint == base
    # the same release and stimuli copied elsewhere (their files rewritten: new mtimes) are the same inputs
    shutil.copytree(data["release"], tmp_path / "copy-release")
    shutil.copytree(data["stimuli"], tmp_path / "copy-stimuli")
    moved = sweep_config(data, tmp_path / "out", release=str(tmp_path / "copy-release"),
                         stimuli=str(tmp_path / "copy-stimuli"))
    assert plan_sweep(moved).fingerprint == base


@pytest.mark.parametrize("change, field", [
    ({"dtype": "bfloat16"}, "dtype"),
    ({"release": "other-release"}, "release"),
    ({"stimuli": "context-stimuli"}, "context_frames"),
    ({"scans": [(8, 5)]}, "scans"),
], ids=["dtype", "release", "context-frames", "scans"])
def test_fingerprint_follows_what_determines_the_numbers(data, tmp_path, change, field):
    base = plan_sweep(sweep_config(data, tmp_path / "out")).fingerprint
    kw = {k: str(data[v]) if k in ("release", "stimuli") else v for k, v in change.items()}
    other = plan_sweep(sweep_config(data, tmp_path / "out", **kw)).fingerprint
    changed = [line.split(" ")[0] for line in differences(base, other)]
    assert field in changed
    if field == "context_frames":
        assert f"context_frames 0 recorded, {5 * CONTEXT} now" in differences(base, other)
        assert "stimuli" in changed  # every clip's frames changed too
    else:
        assert changed == [field]


def test_generator_parameters_are_fields(data, tmp_path):
    def plan(**kw):
        family = family_from_name("dots", rows=2, cols=2, trials=1, dot_frames=4, height=HEIGHT, width=WIDTH,
                                  **{"seed": 0, **kw})
        return plan_experiment("receptive_fields", ExperimentConfig(release=str(data["release"]),
                                                                    output=str(tmp_path / "out"), family=family))
    base = plan().fingerprint
    assert base["generator.family"] == "dots" and base["generator.seed"] == 0
    assert differences(base, plan(seed=5).fingerprint) == ["generator.seed 0 recorded, 5 now"]
    assert plan().products == ()


def test_evaluation_fingerprint_holds_the_recordings_and_burnin(data, tmp_path):
    from fnn_ray.evaluate import EvaluateConfig, plan_evaluate
    from jobs.evaluate import synthetic_recordings

    recordings = tmp_path / "recordings"
    synthetic_recordings(str(data["release"]), str(recordings), videos=2, repeats=2, frames=12, height=HEIGHT,
                         width=WIDTH, scans=[(8, 5)])

    def plan(**kw):
        return plan_evaluate(EvaluateConfig(release=str(data["release"]), recordings=str(recordings),
                                            output=str(tmp_path / "out"), **{"burnin": 4, **kw}))
    base = plan()
    assert base.products == ("performance",)
    assert {"recordings", "burnin", "release", "scans"} <= set(base.fingerprint)
    assert differences(base.fingerprint, plan(burnin=2).fingerprint) == ["burnin 4 recorded, 2 now"]
    (recordings / "8-5" / "notes.txt").write_text("not read by the job")
    assert plan().fingerprint == base.fingerprint
    for path in (recordings / "8-5").glob("*/video0/1.npy"):  # one repeat fewer: other recordings
        path.unlink()
    assert differences(base.fingerprint, plan().fingerprint) == ["recordings differs"]


def test_check_passes_without_commits_and_clear_keeps_other_files(data, tmp_path):
    output = tmp_path / "out"
    job = plan_sweep(sweep_config(data, output))
    check(job)  # nothing there yet
    (output / "responses" / "session=4").mkdir(parents=True)
    (output / "responses" / "session=4" / "part.parquet").write_bytes(b"x")
    Manifest(job="sweep", release_url="r", inputs={}, scans=[], units=[], clips=1, frames=1, items_total=1,
             fingerprint={**job.fingerprint, "dtype": "bfloat16"}).save(str(output))
    check(job)  # files and a manifest of other settings but no commit marker: nothing can be mixed
    Ledger(str(output)).record((4, 7, "a"), "responses/session=4/part.parquet", 1, 1)
    with pytest.raises(OtherComputation, match='dtype "bfloat16" recorded, "float32" now'):
        check(job)
    Manifest(job="sweep", release_url="r", inputs={}, scans=[], units=[], clips=1, frames=1,
             items_total=1).save(str(output))
    with pytest.raises(OtherComputation, match="no record of what computed them"):
        check(job)  # a commit, but no fingerprint (an output of an earlier version)
    (output / "inputs").mkdir()
    (output / "inputs" / "keep.txt").write_text("mine")
    assert clear(job) == ["_ledger", "responses", "_staging", "manifest.json"]
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == ["inputs", "inputs/keep.txt"]


# ---------------------------------------------------------------------------------------------- slow: runs
def run_sweep_cli(data, output, *args: str) -> int:
    return sweep_cli.main(["--release", str(data["release"]), "--stimuli", str(data["stimuli"]),
                           "--output", str(output), "--clips-per-shard", "2", "--clips-per-batch", "2",
                           "--no-progress", *args])


@pytest.fixture(scope="module")
def finished(ray_cluster, data, tmp_path_factory) -> Path:
    """A finished float32 sweep of the tiny release (8 items: 2 scans x 2 files x 2 shards)."""
    output = tmp_path_factory.mktemp("finished") / "out"
    assert run_sweep_cli(data, output) == 0
    assert len(Ledger(str(output)).commits()) == 8
    return output


def damaged(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished sweep with two of its part files removed."""
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    parts = sorted((output / "responses").rglob("*.parquet"))
    for path in parts[:2]:
        path.unlink()
    return output


def rows(output: Path) -> list[dict]:
    return read_responses(str(output)).sort_by(SORT).to_pylist()


def relative_files(output: Path) -> list[str]:
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())


@pytest.mark.slow
def test_other_dtype_is_refused_then_overwrite_equals_a_fresh_run(data, finished, tmp_path):
    output = damaged(finished, tmp_path)
    before = snapshot(output)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--release", str(data["release"]), "--stimuli",
                           str(data["stimuli"]), "--output", str(output), "--dtype", "bfloat16", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert lines[-1].startswith("error:") and 'dtype "float32" recorded, "bfloat16" now' in lines[-1]
    assert "--overwrite" in lines[-1] and "Traceback" not in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # refused before Ray started
    assert snapshot(output) == before  # nothing written

    assert run_sweep_cli(data, output, "--dtype", "bfloat16", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert run_sweep_cli(data, fresh, "--dtype", "bfloat16") == 0
    assert relative_files(output) == relative_files(fresh)
    assert rows(output) == rows(fresh)
    assert rows(output) != rows(finished)  # bfloat16 numbers, not the float32 ones
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (output, fresh)]
    for m in manifests:
        m.pop("started"), m.pop("updated")
    assert manifests[0] == manifests[1] and manifests[0]["fingerprint"]["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("change, words", [
    (("--release", "other-release"), ["release differs"]),
    (("--stimuli", "context-stimuli"), [f"context_frames 0 recorded, {5 * CONTEXT} now", "stimuli differs"]),
], ids=["release", "context-frames"])
def test_other_inputs_are_refused_and_nothing_is_written(data, finished, tmp_path, capsys, change, words):
    output = damaged(finished, tmp_path)
    before = snapshot(output)
    flag, name = change
    args = {"--release": str(data["release"]), "--stimuli": str(data["stimuli"]), flag: str(data[name])}
    code = sweep_cli.main([*(x for kv in args.items() for x in kv), "--output", str(output), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error:") and all(word in err[-1] for word in words), err[-1]
    assert snapshot(output) == before


@pytest.mark.slow
def test_other_actors_and_batches_resume(data, finished, tmp_path):
    output = damaged(finished, tmp_path)
    kept = {c.file: c for c in Ledger(str(output)).verify()[0].values()}
    assert run_sweep_cli(data, output, "--actors", "2", "--cpus-per-actor", "1", "--clips-per-batch", "1",
                         "--store-timeout", "120") == 0
    good = Ledger(str(output)).verify()[0]
    assert len(good) == 8 and all(good[c.key] == c for c in kept.values())  # only the 2 removed were recomputed
    got, want = rows(output), rows(finished)
    assert [{k: v for k, v in r.items() if k != "response"} for r in got] == \
        [{k: v for k, v in r.items() if k != "response"} for r in want]
    # other batches round differently (float32 sums in another order): equal to rounding, not bit for bit
    np.testing.assert_allclose(np.concatenate([r["response"] for r in got]),
                               np.concatenate([r["response"] for r in want]), rtol=1e-5, atol=1e-6)


def run_tuning(data, output, *args: str) -> int:
    return tuning_cli.main(["--release", str(data["release"]), "--output", str(output), "--directions", "4",
                            "--trials", "1", "--block-frames", "8", "--size", f"{HEIGHT}x{WIDTH}", "--burnin", "4",
                            "--latency", "2", "--no-progress", *args])


@pytest.mark.slow
def test_tuning_with_another_generator_parameter(ray_cluster, data, tmp_path, capsys):
    output = tmp_path / "tuning"
    assert run_tuning(data, output) == 0
    partials = sorted((output / "_partials").rglob("*.parquet"))
    partials[0].unlink()
    before = snapshot(output)
    capsys.readouterr()
    assert run_tuning(data, output, "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "generator.seed 0 recorded, 1 now" in err, err
    assert snapshot(output) == before

    assert run_tuning(data, output, "--seed", "1", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert run_tuning(data, fresh, "--seed", "1") == 0
    assert relative_files(output) == relative_files(fresh)
    for name in ("units.csv", "metadata.json"):
        files = "ori_dir_tuning/_files"
        assert (output / files / name).read_bytes() == (fresh / files / name).read_bytes()
