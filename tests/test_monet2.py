"""Monet2 (fnn_ray.generators.Monet2) measured from its pixels against the analytic values of its definition
(IN_SILICO.md section 6): the orientation power band, the temporal filter's -6 dB point, the drift of every
coherent segment, the isotropy of the rest, determinism by seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fnn_ray.generators import Monet2, family_from_name


def angle_error(measured_deg: float, expected_deg: float) -> float:
    return abs((measured_deg - expected_deg + 180.0) % 360.0 - 180.0)


def power(frames: np.ndarray) -> np.ndarray:
    """Spatial power spectrum ``[H, W]`` summed over ``frames [F, H, W]`` (each frame's mean removed)."""
    return np.sum(np.abs(np.fft.fft2(frames - frames.mean(axis=(1, 2), keepdims=True))) ** 2, axis=0)


def angular_profile(spectra: list[tuple[float, np.ndarray]], reference: np.ndarray, bins: int = 18
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Power per bin of spectral orientation relative to each spectrum's direction (wrapped to [-90, 90), y
    up), over wave vectors of 0.01-0.1 cycles per pixel, divided by the ``reference`` power in the same cells
    (so the isotropic spatial filter cancels): (bin centres, ratio)."""
    h, w = reference.shape
    kx, ky = np.fft.fftfreq(w)[None, :], -np.fft.fftfreq(h)[:, None]
    radius = np.broadcast_to(np.hypot(kx, ky), (h, w))
    angle = np.broadcast_to(np.degrees(np.arctan2(ky, kx)), (h, w))
    ring = (radius > 0.01) & (radius < 0.1)
    edges = np.linspace(-90, 90, bins + 1)
    num, den = np.zeros(bins), np.zeros(bins)
    for direction, spectrum in spectra:
        index = np.digitize(((angle - direction + 90.0) % 180.0 - 90.0)[ring], edges) - 1
        num += np.bincount(index, spectrum[ring], bins)
        den += np.bincount(index, reference[ring], bins)
    return (edges[:-1] + edges[1:]) / 2, num / den


def segments(family: Monet2, clip: np.ndarray):
    """Per period: (window, coherent frames, [isotropic frames before, after])."""
    for k, window in enumerate(family.windows(0)):
        start = family.burnin_frames + k * family.block_frames
        first, stop = window.start - family.latency_frames, window.stop - family.latency_frames
        yield window, clip[first:stop], [clip[start:first], clip[stop : start + family.block_frames]]


def fwhm(centres: np.ndarray, profile: np.ndarray) -> float:
    """Full width at half maximum of a single-peaked profile centred at 0 (linear interpolation)."""
    half = profile.max() / 2
    above = np.flatnonzero(profile >= half)
    lo, hi = above[0], above[-1]
    left = np.interp(half, [profile[lo - 1], profile[lo]], [centres[lo - 1], centres[lo]])
    right = np.interp(half, [profile[hi + 1], profile[hi]], [centres[hi + 1], centres[hi]])
    return float(right - left)


def phase_shift(frames: np.ndarray, lag: int) -> tuple[int, int]:
    """Integer displacement ``(dx right, dy up)`` over ``lag`` frames, from the phase correlation summed over
    every pair of frames ``lag`` apart."""
    spectra = np.fft.fft2(frames - frames.mean(axis=(1, 2), keepdims=True))
    cross = np.sum(spectra[lag:] * np.conj(spectra[:-lag]) / (np.abs(spectra[lag:] * spectra[:-lag]) + 1e-9), axis=0)
    corr = np.fft.ifft2(cross).real
    row, col = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    return int(col - w if col > w // 2 else col), int(-(row - h if row > h // 2 else row))


def test_orientation_band_matches_the_mask():
    """The power of the coherent frames relative to the isotropic frames, per spectral orientation, has the
    mask's analytic full width at half maximum (87.4 deg at coherence 1.5) within 10%, centred on the direction
    of motion; the isotropic frames are flat in orientation."""
    family = Monet2(directions=8, block_frames=48, ori_fraction=0.5, trials=1)
    clip = family.frames(0).astype(np.float64)
    analytic = 2 * math.degrees(math.acos(2 * 2**-0.5 - 1)) / family.coherence
    assert analytic == pytest.approx(87.37, abs=0.01)
    coherent, isotropic = [], 0.0
    for window, frames, flanks in segments(family, clip):
        coherent.append((window.labels["direction_deg"], power(frames)))
        isotropic = isotropic + sum(power(flank) for flank in flanks)
    centres, profile = angular_profile(coherent, isotropic)
    assert fwhm(centres, profile) == pytest.approx(analytic, rel=0.10)
    assert abs(centres[np.argmax(profile)]) < 15
    # isotropy of the rest: the first flanks against the second ones, in every direction's frame
    first = [(w.labels["direction_deg"], power(flanks[0])) for w, _, flanks in segments(family, clip)]
    second = sum(power(flanks[1]) for _, _, flanks in segments(family, clip))
    _, flat = angular_profile(first, second, bins=6)
    assert flat.max() / flat.min() < 1.3


def test_temporal_spectrum_has_the_filter_minus_6_db_point():
    """Per-pixel temporal power of the isotropic noise falls to a quarter (-6 dB in amplitude) at the half-Hamming
    kernel's own -6 dB frequency, within 10%."""
    family = Monet2(directions=1, block_frames=256, ori_fraction=1 / 256, trials=6, height=36, width=64,
                    pattern_width=32, burnin_frames=0, latency_frames=0)
    taps = round(family.fps / family.temporal_bandwidth)
    kernel = 0.54 + 0.46 * np.cos(np.pi * np.arange(taps) / taps)  # the falling half of a Hamming window
    freqs = np.linspace(0, family.fps / 2, 2001)
    response = np.abs(np.exp(-2j * np.pi * np.outer(freqs / family.fps, np.arange(taps))) @ kernel)
    analytic = freqs[np.argmax(response <= response[0] / 2)]
    offset = (family.block_frames - 1) // 2
    series = np.concatenate([family.frames(t)[:offset].astype(np.float64) - 128 for t in range(family.trials)],
                            axis=1)  # [offset, trials * H, W]: isotropic, still frames only
    taper = np.hanning(offset)[:, None, None]
    power = np.mean(np.abs(np.fft.rfft(series * taper, axis=0)) ** 2, axis=(1, 2))
    f = np.fft.rfftfreq(offset, 1 / family.fps)
    below = np.argmax(power <= power[0] / 4)
    measured = np.interp(power[0] / 4, [power[below], power[below - 1]], [f[below], f[below - 1]])
    assert measured == pytest.approx(analytic, rel=0.10)


@pytest.mark.slow
def test_every_coherent_segment_drifts_along_its_direction_and_the_rest_is_still():
    family = Monet2()  # the published defaults: 16 directions, 144 x 256, 0.25 screen widths per second
    clip = family.frames(0).astype(np.float64)
    assert np.all(clip[: family.burnin_frames] == 128)
    lag = 4
    expected = family.speed * family.width / family.fps * lag
    seen = set()
    for window, coherent, flanks in segments(family, clip):
        assert len(flanks[0]) == (family.block_frames - round(0.4 * family.block_frames)) // 2  # centred
        assert len(coherent) == round(0.4 * family.block_frames)
        dx, dy = phase_shift(coherent, lag)
        direction = window.labels["direction_deg"]
        assert angle_error(math.degrees(math.atan2(dy, dx)), direction) < 8, (direction, dx, dy)
        assert math.hypot(dx, dy) == pytest.approx(expected, abs=1.5)
        seen.add(direction)
        for flank in flanks:
            assert phase_shift(flank, 1) == (0, 0)  # still (the noise changes, nothing moves)
    assert len(seen) == 16


def test_determinism_by_seed_and_windows_without_pixels():
    small = dict(height=36, width=64, pattern_width=16, directions=4, block_frames=10, trials=2)
    a, b = Monet2(seed=5, **small), family_from_name("monet2", seed=5, **small)
    assert a == b and np.array_equal(a.frames(1), b.frames(1))
    assert not np.array_equal(a.frames(0), a.frames(1))
    assert not np.array_equal(a.frames(1), Monet2(seed=6, **small).frames(1))
    assert [w.condition for w in a.windows(1)] != [w.condition for w in Monet2(seed=6, **small).windows(1)]
    assert family_from_name("monet2", **a.params()) == a
    assert Monet2().params()["coherence"] == 1.5 and Monet2().params()["ori_fraction"] == 0.4


@pytest.mark.parametrize("key, value, match", [
    ("coherence", 0.5, "coherence"), ("mix", 1.5, "mix"), ("temporal_bandwidth", 0.0, "temporal_bandwidth"),
    ("pattern_width", 2, "pattern_width"), ("ori_fraction", 0.001, "ori_fraction"), ("sigma", -1.0, "sigma"),
])
def test_bad_parameters_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        Monet2(**{key: value})


def test_small_screen_keeps_the_published_pattern():
    """A screen of fewer pixels than the pattern (36 x 64 against 80 pattern pixels per width) shows the same
    movie, low-passed at its Nyquist limit: close to the full-size movie subsampled."""
    small = Monet2(height=36, width=64, directions=2, block_frames=10, seed=2).frames(0).astype(float)
    large = Monet2(height=144, width=256, directions=2, block_frames=10, seed=2).frames(0).astype(float)
    assert small.shape == (small.shape[0], 36, 64)
    shown = slice(10, None)
    coarse = large[shown].reshape(-1, 36, 4, 64, 4).mean(axis=(2, 4))
    assert np.corrcoef(small[shown].ravel(), coarse.ravel())[0, 1] > 0.9
