"""`jobs.bench`'s training rows on the tiny network: the bookkeeping of rates, ratios and memory (no timing
asserts)."""

from __future__ import annotations

import pytest
import torch

from fnn_model import NetworkConfig
from fnn_model.release import Release
from fnn_model.synthetic import make_release
from jobs import bench


@pytest.mark.slow
def test_training_rows_are_consistent(tmp_path) -> None:
    make_release(str(tmp_path), [(4, 7, 3)], NetworkConfig.tiny(), seed=0)
    result = bench.bench_training(Release.open(str(tmp_path)), (4, 7), units=20, frames=3, batch_size=2,
                                  device=torch.device("cpu"), repeats=2, checkpoint_frames=1,
                                  autocast=torch.bfloat16)
    rows = result["rows"]
    assert [r["name"].split(":")[0].split(",")[0] for r in rows] == ["training path", "plain loop"] + [
        "training path"] * 2
    for row in rows:
        assert (row["batch"], row["frames"]) == (2, 3)
        assert row["sample_frames_per_s"] == pytest.approx(6 / row["seconds"])
        assert row["saved_per_sample_frame_mb"] == pytest.approx(row["saved_mb"] / 6)
        assert 0 < row["saved_mb"] < row["peak_memory_mb"]
        assert row["step_peak_mb"] is None and row["step_peak_per_sample_frame_mb"] is None  # a GPU figure
    path, plain, checkpointed, mixed = rows
    assert "bfloat16" in mixed["name"] and result["autocast"] == "bfloat16"
    assert result["autocast_vs_float32"] == pytest.approx(mixed["sample_frames_per_s"] / path["sample_frames_per_s"])
    assert 0 < result["autocast_gradient_error"] < 0.5  # bfloat16 differs from float32, but not wildly
    assert result["autocast_gradient_error"] <= result["autocast_gradient_error_max"]
    assert result["training_vs_plain"] == pytest.approx(path["sample_frames_per_s"] / plain["sample_frames_per_s"])
    assert result["checkpoint_time_ratio"] == pytest.approx(checkpointed["seconds"] / path["seconds"])
    assert result["checkpoint_saved_ratio"] == pytest.approx(checkpointed["saved_mb"] / path["saved_mb"])
    assert checkpointed["saved_mb"] < path["saved_mb"]  # the checkpointed chunks keep nothing for backward
    assert plain["saved_mb"] > path["saved_mb"]  # all streams vs one
