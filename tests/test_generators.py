"""Tests of fnn_ray.generators: determinism, clip layout and windows, motion direction (x right, y UP, 0 deg =
rightwards, counter-clockwise) measured from the pixels by estimators written here, dot placement, bad parameters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fnn_ray import generators
from fnn_ray.generators import Dots, Family, Gratings, Monet2, RigidMonet, Window, family_from_name

# small clips of every family, with non-default sizes and layouts, for the generic tests
SMALL = [
    Monet2(height=36, width=64, pattern_width=16, directions=3, block_frames=10, trials=2, latency_frames=3),
    RigidMonet(height=36, width=64, directions=4, block_frames=8, ori_fraction=0.5, trials=2, max_spatial_freq=8.0),
    Gratings(height=40, width=50, directions=3, spatial_freqs=(1.0, 2.0), temporal_freqs=[1.0], gray_frames=3),
    Dots(height=30, width=45, rows=3, cols=4, dot_frames=2, gap_frames=1, trials=2, events_per_clip=7),
    RigidMonet(height=36, width=64, directions=2, block_frames=6, latency_frames=11, burnin_frames=0, max_spatial_freq=8.0),
    Dots(height=20, width=20, rows=2, cols=2, latency_frames=9, events_per_clip=3),
]


def angle_error(measured_deg: float, expected_deg: float) -> float:
    return abs((measured_deg - expected_deg + 180.0) % 360.0 - 180.0)


# ------------------------------------------------------------------------------------ motion estimators
def phase_correlation(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """Integer displacement ``(dx right, dy up)`` in pixels that maps ``before`` onto ``after``."""
    a = np.fft.fft2(before - before.mean())
    b = np.fft.fft2(after - after.mean())
    cross = b * np.conj(a)
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    row, col = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    row = row - h if row > h // 2 else row
    col = col - w if col > w // 2 else col
    return int(col), int(-row)


def normal_flow(prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray) -> tuple[float, float]:
    """Least-squares velocity ``(vx right, vy up)`` in px/frame from the brightness-constancy equation."""
    prev, cur, nxt = (f.astype(float) for f in (prev, cur, nxt))
    it = (nxt - prev)[1:-1, 1:-1] / 2
    ix = (cur[1:-1, 2:] - cur[1:-1, :-2]) / 2
    iy = -(cur[2:, 1:-1] - cur[:-2, 1:-1]) / 2  # y up = towards row 0
    a = np.array([[np.sum(ix * ix), np.sum(ix * iy)], [np.sum(ix * iy), np.sum(iy * iy)]])
    bvec = -np.array([np.sum(ix * it), np.sum(iy * it)])
    # a grating constrains only the velocity along its wave vector: take the minimum-norm solution
    vx, vy = np.linalg.pinv(a, rcond=1e-6) @ bvec
    return float(vx), float(vy)


def test_estimators_on_hand_made_motion():
    img = np.random.default_rng(0).random((64, 96))
    assert phase_correlation(img, np.roll(img, 5, axis=1)) == (5, 0)  # moves right: 0 deg
    assert phase_correlation(img, np.roll(img, -4, axis=0)) == (0, 4)  # towards row 0: up, 90 deg
    dx, dy = phase_correlation(img, np.roll(img, (3, -3), axis=(0, 1)))  # down-left: 225 deg
    assert angle_error(math.degrees(math.atan2(dy, dx)), 225.0) < 1e-9

    rows, cols = np.mgrid[0:48, 0:64]
    right = [np.sin(2 * np.pi * (cols - 2 * t) / 32) for t in range(3)]  # crest at col = 2 t
    vx, vy = normal_flow(*right)
    assert angle_error(math.degrees(math.atan2(vy, vx)), 0.0) < 1 and vx == pytest.approx(2.0, rel=0.05)
    up = [np.sin(2 * np.pi * (rows + 2 * t) / 32) for t in range(3)]  # crest at row = -2 t: moves up
    vx, vy = normal_flow(*up)
    assert angle_error(math.degrees(math.atan2(vy, vx)), 90.0) < 1 and vy == pytest.approx(2.0, rel=0.05)


# ------------------------------------------------------------------------------------ generic contract
@pytest.mark.parametrize("family", SMALL, ids=lambda f: f"{f.name}-{f.height}x{f.width}")
def test_frames_deterministic_and_shaped(family: Family):
    for index in range(family.num_clips):
        clip = family.frames(index)
        assert clip.dtype == np.uint8
        assert clip.shape == (family.num_frames(index), family.height, family.width)
        again = family_from_name(family.name, **family.params()).frames(index)
        assert clip.tobytes() == again.tobytes()
    other_seed = family_from_name(family.name, **{**family.params(), "seed": 1})
    assert not np.array_equal(family.frames(0), other_seed.frames(0))
    if family.num_clips > 1:
        assert not np.array_equal(family.frames(0)[: family.num_frames(1)], family.frames(1)[: family.num_frames(0)])


@pytest.mark.parametrize("family", SMALL, ids=lambda f: f"{f.name}-{f.height}x{f.width}")
def test_windows_inside_clip_and_consistent(family: Family):
    ids = [family.clip_id(i) for i in range(family.num_clips)]
    assert len(set(ids)) == len(ids) and ids[0] == f"{family.name}-s0-{'c' if family.name == 'dots' else 't'}000"
    for index in range(family.num_clips):
        frames = family.num_frames(index)
        windows = family.windows(index)
        assert windows
        for w in windows:
            assert family.burnin_frames <= w.start < w.stop <= frames
            condition = family.conditions[w.condition]
            assert {k: w.labels[k] for k in condition} == condition  # labels extend the condition
            assert w.to_json() == {**w.labels, "start": w.start, "stop": w.stop}
            json.dumps(w.to_json())
        starts = [w.start for w in windows]
        assert starts == sorted(starts)
    assert json.loads(json.dumps(family.params())) == family.params()
    assert family_from_name(family.name, **json.loads(json.dumps(family.params()))) == family


@pytest.mark.parametrize("family", SMALL[:3], ids=lambda f: f.name)
def test_windows_need_no_pixels(family: Family, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pixels drawn")

    monkeypatch.setattr(type(family), "frames", boom)
    monkeypatch.setattr(type(family), "_draw", boom)
    monkeypatch.setattr(np.fft, "irfft2", boom)
    for index in range(family.num_clips):
        assert family.windows(index) and family.num_frames(index) > 0 and family.clip_id(index)
    assert family.conditions and family.params()


def test_window_to_json():
    assert Window(3, 15, 45, {"direction_deg": 22.5}).to_json() == {"direction_deg": 22.5, "start": 15, "stop": 45}


# ------------------------------------------------------------------------------------ monet
def test_monet_layout_and_order():
    monet = RigidMonet(trials=3, height=36, width=64, max_spatial_freq=8.0)
    assert [c["direction_deg"] for c in monet.conditions] == [22.5 * k for k in range(16)]
    orders = []
    for trial in range(3):
        windows = monet.windows(trial)
        assert sorted(w.condition for w in windows) == list(range(16))
        assert [w.start for w in windows] == [10 + 5 + 30 * k for k in range(16)]
        assert all(w.stop - w.start == 30 for w in windows)
        assert all(w.labels["direction_deg"] == 22.5 * w.condition for w in windows)
        assert monet.num_frames(trial) == 10 + 16 * 30 + 5  # tail: the last window ends with the clip
        orders.append([w.condition for w in windows])
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] != [w.condition for w in RigidMonet(seed=1, height=36, width=64, max_spatial_freq=8.0).windows(0)]


def test_monet_drifts_along_labelled_direction():
    monet = RigidMonet()  # default: 16 directions, 144 x 256, 0.2 screen widths per second
    clip = monet.frames(0).astype(float)
    assert np.all(clip[: monet.burnin_frames] == 128)
    step = 25  # a long displacement (~43 px) keeps the integer peak's angle error small
    expected = monet.speed * monet.width / monet.fps * step
    seen = set()
    for w in monet.windows(0):
        onset = w.start - monet.latency_frames
        dx, dy = phase_correlation(clip[onset + 2], clip[onset + 2 + step])
        direction = w.labels["direction_deg"]
        assert angle_error(math.degrees(math.atan2(dy, dx)), direction) < 3, (direction, dx, dy)
        assert math.hypot(dx, dy) == pytest.approx(expected, abs=1.0)
        seen.add(direction)
    assert len(seen) == 16


def spectral_orientation(frame: np.ndarray) -> tuple[float, float]:
    """Mean wave-vector orientation (deg, y up, mod 180) weighted by the whitened power ``|F|^2 |k|^2`` (every
    frequency of a 1/f field counts alike) and its resultant length in [0, 1]."""
    h, w = frame.shape
    kx = np.fft.fftfreq(w)[None, :]
    ky = -np.fft.fftfreq(h)[:, None]
    power = np.abs(np.fft.fft2(frame - frame.mean())) ** 2 * (kx**2 + ky**2)
    doubled = np.exp(2j * np.arctan2(ky, kx))
    resultant = np.sum(power * doubled) / np.sum(power)
    return math.degrees(np.angle(resultant)) / 2 % 180, abs(resultant)


def radial_slope(frame: np.ndarray, low: float, high: float) -> float:
    """Slope of log mean amplitude vs log spatial frequency (cycles per width) over [low, high]."""
    h, w = frame.shape
    amplitude = np.abs(np.fft.fft2(frame - frame.mean()))
    radius = np.hypot(np.fft.fftfreq(w)[None, :], np.fft.fftfreq(h)[:, None]) * w
    edges = np.geomspace(low, high, 9)
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (radius >= lo) & (radius < hi)
        centres.append(np.sqrt(lo * hi))
        means.append(amplitude[ring].mean())
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def test_monet_structure_is_oriented_then_isotropic():
    monet = RigidMonet(ori_fraction=0.5)
    clip = monet.frames(0).astype(float)
    for w in monet.windows(0):
        onset = w.start - monet.latency_frames
        assert w.stop - w.start == 15
        # wave vectors along the motion = structure elongated perpendicular to it
        orientation, strength = spectral_orientation(clip[onset])
        assert angle_error(2 * orientation, 2 * (w.labels["direction_deg"] % 180)) / 2 < 3
        assert strength > 0.8
        isotropic = clip[onset + 15 : onset + 30]
        assert np.all(isotropic == isotropic[0]) and not np.array_equal(isotropic[0], clip[onset + 14])
        assert spectral_orientation(isotropic[0])[1] < 0.15
        assert radial_slope(isotropic[0], 2.0, 24.0) == pytest.approx(-1.0, abs=0.25)
        for frame in (clip[onset], isotropic[0]):  # around gray, using the range
            assert abs(frame.mean() - 128) < 12 and frame.min() < 40 and frame.max() > 216


def test_monet_contrast_scales_around_gray():
    low = RigidMonet(contrast=0.25, directions=2, height=36, width=64, max_spatial_freq=8.0).frames(0)
    assert np.all(np.abs(low.astype(int) - 128) <= round(127 * 0.25))


# ------------------------------------------------------------------------------------ gratings
def test_gratings_drift_along_labelled_direction():
    gratings = Gratings()  # default: 16 directions, 4 cycles per width, 2 Hz
    clip = gratings.frames(0)
    expected = gratings.temporal_freqs[0] / gratings.spatial_freqs[0] * gratings.width / gratings.fps
    seen = set()
    for w in gratings.windows(0):
        onset = w.start - gratings.latency_frames
        vx, vy = normal_flow(clip[onset + 3], clip[onset + 4], clip[onset + 5])
        direction = w.labels["direction_deg"]
        assert angle_error(math.degrees(math.atan2(vy, vx)), direction) < 3, (direction, vx, vy)
        assert math.hypot(vx, vy) == pytest.approx(expected, rel=0.1)
        seen.add(direction)
    assert len(seen) == 16


def test_gratings_pixels_follow_the_formula():
    gratings = Gratings(directions=8, contrast=0.5, spatial_freqs=(3.0,), temporal_freqs=(4.0,), gray_frames=4)
    clip = gratings.frames(0)
    rng = np.random.default_rng(1)
    for w in gratings.windows(0):
        onset = w.start - gratings.latency_frames
        assert np.all(clip[onset - 4 : onset] == 128)
        theta = math.radians(w.labels["direction_deg"])
        for _ in range(20):
            t, r, c = rng.integers(gratings.block_frames), rng.integers(144), rng.integers(256)
            x, y = (c + 0.5) / 256 - 0.5, (72 - r - 0.5) / 256
            u = x * math.cos(theta) + y * math.sin(theta)
            value = 128 + 127 * 0.5 * math.sin(2 * math.pi * (3.0 * u - 4.0 * t / 30.0))
            assert abs(int(clip[onset + t, r, c]) - value) <= 0.5 + 1e-6


def test_gratings_blocks_cover_all_frequencies():
    gratings = Gratings(directions=4, spatial_freqs=(2.0, 8.0), temporal_freqs=(1.0, 4.0), trials=2)
    for trial in range(2):
        windows = gratings.windows(trial)
        combos = sorted((w.condition, w.labels["spatial_freq"], w.labels["temporal_freq"]) for w in windows)
        assert combos == sorted((d, s, t) for d in range(4) for s in (2.0, 8.0) for t in (1.0, 4.0))
        assert all(w.labels["trial"] == trial for w in windows)
    assert [c["direction_deg"] for c in gratings.conditions] == [0.0, 90.0, 180.0, 270.0]


# ------------------------------------------------------------------------------------ dots
@pytest.mark.parametrize(
    "dots",
    [Dots(trials=2), Dots(height=60, width=90, rows=3, cols=4, dot_size=0.5, gap_frames=2, events_per_clip=5)],
    ids=["default", "small"],
)
def test_dots_show_labelled_cell_and_polarity(dots: Dots):
    h, w = dots.height, dots.width
    counts = np.zeros(2 * dots.rows * dots.cols, dtype=int)
    for index in range(dots.num_clips):
        clip = dots.frames(index)
        windows = dots.windows(index)
        assert len(windows) <= dots.events_per_clip
        shown = np.zeros(len(clip), dtype=bool)
        for win in windows:
            counts[win.condition] += 1
            row, col, polarity = win.labels["row"], win.labels["col"], win.labels["polarity"]
            p = ("on", "off").index(polarity)
            assert win.condition == (p * dots.rows + row) * dots.cols + col
            onset = win.start - dots.latency_frames
            assert win.stop - win.start == dots.dot_frames
            for frame in clip[onset : onset + dots.dot_frames]:
                dot = frame != 128
                assert np.all(frame[dot] == (255 if polarity == "on" else 0))
                rr, cc = np.nonzero(dot)
                # row 0 at the top: the cell spans rows [row, row + 1) * h / rows
                assert rr.min() >= math.floor(row * h / dots.rows) and rr.max() < math.ceil((row + 1) * h / dots.rows)
                assert cc.min() >= math.floor(col * w / dots.cols) and cc.max() < math.ceil((col + 1) * w / dots.cols)
                assert rr.mean() + 0.5 == pytest.approx((row + 0.5) * h / dots.rows, abs=1.0)
                assert cc.mean() + 0.5 == pytest.approx((col + 0.5) * w / dots.cols, abs=1.0)
                side = dots.dot_size * min(h / dots.rows, w / dots.cols)
                assert dot.sum() >= (side - 1) ** 2
            shown[onset : onset + dots.dot_frames] = True
        assert np.all(clip[~shown] == 128)  # burn-in, gaps and tail are gray
    assert np.all(counts == dots.trials)


def test_dots_clips_and_order():
    dots = Dots(trials=2)
    assert dots.num_clips == 5  # 2 x 90 events in clips of 40
    assert [len(dots.windows(i)) for i in range(5)] == [40, 40, 40, 40, 20]
    assert dots.num_frames(4) == 10 + 20 * 6 + 5
    first = [w.condition for i in range(5) for w in dots.windows(i) if w.labels["trial"] == 0]
    second = [w.condition for i in range(5) for w in dots.windows(i) if w.labels["trial"] == 1]
    assert sorted(first) == sorted(second) == list(range(90)) and first != second
    assert first != [w.condition for i in range(3) for w in Dots(seed=5).windows(i)][:90]
    assert dots.conditions[(1 * 5 + 2) * 9 + 3] == {"row": 2, "col": 3, "polarity": "off"}


# ------------------------------------------------------------------------------------ bad parameters
@pytest.mark.parametrize(
    "name, params, match",
    [
        ("rigid_monet", {"directions": 0}, "directions=0"),
        ("rigid_monet", {"trials": -1}, "trials=-1"),
        ("rigid_monet", {"block_frames": 0}, "block_frames=0"),
        ("rigid_monet", {"directions": 2.5}, "directions=2.5"),
        ("rigid_monet", {"ori_fraction": 0.0}, "ori_fraction"),
        ("rigid_monet", {"speed": 5.0}, "speed=5.0"),
        ("rigid_monet", {"contrast": 1.5}, "contrast=1.5"),
        ("rigid_monet", {"bandwidth_deg": -1.0}, "bandwidth_deg"),
        ("rigid_monet", {"bandwidth_deg": 0.001}, "no spectral energy"),
        ("rigid_monet", {"burnin_frames": -1}, "burnin_frames=-1"),
        ("rigid_monet", {"latency_frames": -2}, "latency_frames=-2"),
        ("rigid_monet", {"height": 0}, "height=0"),
        ("rigid_monet", {"fps": 0.0}, "fps=0.0"),
        ("rigid_monet", {"wobble": 1}, "unknown parameter.*wobble"),
        ("gratings", {"spatial_freqs": []}, "spatial_freqs"),
        ("gratings", {"temporal_freqs": [20.0]}, "temporal_freqs"),
        ("gratings", {"gray_frames": -1}, "gray_frames=-1"),
        ("dots", {"rows": 0}, "rows=0"),
        ("dots", {"cols": -3}, "cols=-3"),
        ("dots", {"dot_frames": 0}, "dot_frames=0"),
        ("dots", {"dot_size": 1.5}, "dot_size=1.5"),
        ("dots", {"events_per_clip": 0}, "events_per_clip=0"),
        ("dots", {"rows": 200}, "rows=200"),
        ("bars", {}, "unknown stimulus family 'bars'"),
    ],
)
def test_bad_parameters_raise(name, params, match):
    with pytest.raises(ValueError, match=match) as error:
        family_from_name(name, **params)
    assert "\n" not in str(error.value)


def test_bad_clip_index_raises():
    for family in SMALL[:3]:
        with pytest.raises(ValueError, match="clip index"):
            family.windows(family.num_clips)
        with pytest.raises(ValueError, match="clip index"):
            family.frames(-1)


def test_family_names():
    assert set(generators.FAMILIES) == {"monet2", "rigid_monet", "gratings", "dots"}
    assert isinstance(family_from_name("dots", rows=2), Dots) and family_from_name("dots", rows=2).rows == 2
