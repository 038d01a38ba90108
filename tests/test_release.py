"""Release I/O: directories and zips on local disk, memory:// and a real S3 endpoint; every bad input refused."""

from __future__ import annotations

import io
import os
import zipfile
from collections import OrderedDict

import fsspec
import numpy as np
import pytest
import torch

from fnn_model import NetworkConfig, microns
from fnn_model.release import Release, ReleaseError, config_from_json, config_to_json
from fnn_model.synthetic import make_release, random_clips

CONFIG = NetworkConfig.tiny()
SCANS = ((4, 7, 5), (8, 5, 9))


def predictions(url: str, storage_options: dict | None = None) -> dict[tuple[int, int], np.ndarray]:
    release = Release.open(url, storage_options=storage_options)
    clip = list(random_clips(1, 3, 36, 64, seed=7)[0])
    return {s.key: release.load_network(*s.key).predict(clip) for s in release.scans}


def test_config_round_trips_through_json() -> None:
    assert config_from_json(config_to_json(CONFIG)) == CONFIG
    assert config_from_json(config_to_json(NetworkConfig())) == NetworkConfig()


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
@pytest.mark.parametrize("archive", [False, True], ids=["dir", "zip"])
def test_synthetic_release_loads_and_predicts_identically_everywhere(tmp_url, tmp_path, kind, archive) -> None:
    reference = str(tmp_path / "reference")
    make_release(reference, SCANS, CONFIG, seed=3)
    url = tmp_url(kind, "release") + (".zip" if archive else "")
    make_release(url, SCANS, CONFIG, seed=3)
    release = Release.open(url)
    assert [(s.session, s.scan_idx, s.units) for s in release.scans] == [s for s in SCANS]
    assert release.config == CONFIG
    units = release.units(8, 5)
    assert list(units.index) == list(range(9)) and units.unit_id.is_monotonic_increasing
    expected, got = predictions(reference), predictions(url)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert not np.allclose(expected[(4, 7)], 1.0)  # the synthetic weights do something


def test_release_copied_to_s3_matches_local(tmp_path, s3, s3_url) -> None:
    local = tmp_path / "release"
    make_release(str(local), SCANS, CONFIG, seed=11)
    fs = fsspec.filesystem("s3", **s3.storage_options, skip_instance_cache=True)
    fs.put(str(local) + "/", s3_url.removeprefix("s3://") + "/", recursive=True)
    expected = predictions(str(local))
    got = predictions(s3_url, storage_options=s3.storage_options)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_microns_scan_returns_model_and_unit_table(tmp_path) -> None:
    make_release(str(tmp_path), SCANS, CONFIG)
    model, ids = microns.scan(session=8, scan_idx=5, directory=str(tmp_path))
    assert model.units == 9 and list(ids.columns) == ["session", "scan_idx", "unit_id", "readout_id"]
    assert model.predict(list(random_clips(1, 2, 32, 48)[0])).shape == (2, 9)


@pytest.fixture
def release_dir(tmp_path):
    path = tmp_path / "release"
    make_release(str(path), SCANS, CONFIG)
    return path


def rewrite(path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    ("file", "edit", "match"),
    [
        ("params_core.pt", lambda s: s.pop("core.recurrent.out.weights.1"),
         r"params_core.pt .*missing key\(s\) \['core.recurrent.out.weights.1'\]"),
        ("params_8_5.pt", lambda s: s.__setitem__("readout.extra", torch.zeros(1)),
         r"params_8_5.pt .*unexpected key\(s\) \['readout.extra'\]"),
        ("params_8_5.pt", lambda s: s.__setitem__("readout.position.mu", torch.zeros(8, 2)),
         r"params_8_5.pt .*'readout.position.mu' has shape \[8, 2\], expected \[9, 2\]"),
        ("params_core.pt", lambda s: s.__setitem__("core.recurrent.scales.0", s["core.recurrent.scales.0"].double()),
         r"'core.recurrent.scales.0' has dtype torch.float64, expected torch.float32"),
    ],
)
def test_bad_state_dict_names_file_key_and_expectation(release_dir, file, edit, match) -> None:
    rewrite(release_dir / file, edit)
    release = Release.open(str(release_dir))
    with pytest.raises(ReleaseError, match=match):
        release.load_network(8, 5)


class Payload:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __reduce__(self):
        return (open, (os.environ["FNN_PICKLE_MARKER"], "w"))


def test_pickled_objects_are_refused_not_run(release_dir, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FNN_PICKLE_MARKER", str(marker))
    torch.save(OrderedDict(payload=Payload()), release_dir / "params_8_5.pt")
    with pytest.raises(ReleaseError, match=r"params_8_5.pt .*refused to load: it holds objects other than tensors"):
        Release.open(str(release_dir)).load_head(8, 5)
    assert not marker.exists()


def test_missing_file_unknown_scan_and_missing_release(release_dir, tmp_path) -> None:
    (release_dir / "params_4_7.pt").unlink()
    release = Release.open(str(release_dir))
    with pytest.raises(ReleaseError, match="missing file params_4_7.pt"):
        release.load_head(4, 7)
    with pytest.raises(ReleaseError, match="unknown scan 1-2; available: 4-7, 8-5"):
        release.load_head(1, 2)
    with pytest.raises(ReleaseError, match="no such directory or .zip file"):
        Release.open(str(tmp_path / "nowhere"))
    (release_dir / "scans.csv").unlink()
    with pytest.raises(ReleaseError, match="missing file scans.csv"):
        Release.open(str(release_dir))


def test_units_table_must_cover_every_readout_id(release_dir) -> None:
    text = (release_dir / "units.csv").read_text().splitlines()
    (release_dir / "units.csv").write_text("\n".join(text[:-1]) + "\n")  # drop the last unit of 8-5
    with pytest.raises(ReleaseError, match=r"scan 8-5 must list readout_id 0..8 once each"):
        Release.open(str(release_dir)).units(8, 5)


def test_zip_md5_is_checked_and_corrupt_zip_refused(tmp_path) -> None:
    archive = tmp_path / "release.zip"
    make_release(str(archive), SCANS, CONFIG)
    import hashlib

    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert Release.open(str(archive), md5=md5).scans
    with pytest.raises(ReleaseError, match=f"MD5 mismatch: expected {'0' * 32}, got {md5}"):
        Release.open(str(archive), md5="0" * 32)
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 3])
    with pytest.raises(ReleaseError, match="not a valid zip archive"):
        Release.open(str(corrupt))


def test_zip_with_a_top_folder_is_found(tmp_path, release_dir) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in release_dir.iterdir():
            archive.write(file, f"foundation_model/{file.name}")
    (tmp_path / "nested.zip").write_bytes(buffer.getvalue())
    expected, got = predictions(str(release_dir)), predictions(str(tmp_path / "nested.zip"))
    np.testing.assert_array_equal(got[(8, 5)], expected[(8, 5)])


def test_golden_release_loads_strictly(golden_dir) -> None:
    release = Release.open(str(golden_dir / "release"))
    assert release.config == NetworkConfig()
    assert [s.key for s in release.scans] == [(4, 7), (8, 5), (9, 6)]
    assert release.load_network(9, 6).units == 41
