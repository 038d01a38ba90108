"""`jobs.bench` end to end on the tiny network: it runs, and its JSON is consistent with its rows (no timing
asserts)."""

from __future__ import annotations

import json

import pytest

from jobs import bench


@pytest.mark.slow
def test_bench_writes_consistent_json(tmp_path):
    path = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--config", "tiny", "--scans", "1", "--units", "50", "--frames", "2", "--batches", "1,2",
                         "--repeats", "2", "--no-sweep", "--no-tuning", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["engine_vs_baseline"] == pytest.approx(result["engine_vs_baseline"])
    rows = saved["rows"]
    assert [r["name"].split(":")[0] for r in rows] == ["baseline"] + ["engine float32"] * 2 + ["engine bfloat16"] * 2
    baseline = rows[0]["scan_frames_per_s"]
    best = max(rows[1:], key=lambda r: r["scan_frames_per_s"])
    assert saved["engine_best"] == best
    assert saved["engine_vs_baseline"] == pytest.approx(best["scan_frames_per_s"] / baseline)
    for name in ("float32", "bfloat16"):
        rate = max(r["scan_frames_per_s"] for r in rows if r["dtype"] == name and r is not rows[0])
        assert saved[f"engine_{name}_vs_baseline"] == pytest.approx(rate / baseline)
    for row in rows:
        assert row["scan_frames_per_s"] == pytest.approx(row["scans"] * row["clips"] * row["frames"] / row["seconds"])
        assert row["gflops"] > 0 and 0 < row["peak_fraction"] and row["peak_memory_mb"] > 0
    assert saved["sweep"] is None and saved["sweep_vs_engine"] is None
    assert 0 < saved["bfloat16_max_rel_error"] < 0.5  # bfloat16 differs from float32, but not wildly
    assert saved["bfloat16_error_release"] is None  # the tiny run loads no other release
    assert saved["settings"]["repeats"] == 2
