"""Seeded stimulus generators for in-silico experiments: Monet2 (the published directional noise), rigidly
drifting directional pink noise, drifting gratings, flashing dots.

Conventions (``IN_SILICO.md`` section 1): frames are uint8 ``[T, H, W]``, row 0 at the top, gray = 128; screen
``x`` grows to the right and ``y`` UPWARDS; a direction ``theta`` (degrees) is the direction of motion, 0 = the
pattern moves right, 90 = up, counter-clockwise.

Every family lays out a clip the same way: ``burnin_frames`` of gray, then a sequence of events (a Monet block, a
grating block, a dot flash), each ``lead`` gray frames + ``shown`` stimulus frames + ``after`` gray frames, then
gray up to the end of the last scoring window. An event whose first stimulus frame is ``onset`` is scored over
``[onset + offset + latency_frames, onset + offset + latency_frames + scored)`` (``offset`` 0, except Monet2:
its coherent segment is centred in the event), which never reaches into the burn-in nor past the clip. Event orders
come from ``numpy.random.default_rng([seed, 0, trial])`` and pixel noise from ``default_rng([seed, 1, clip index])``:
:meth:`Family.windows` never draws pixels, and a clip depends only on (parameters, seed, index).

>>> family = family_from_name("monet2", trials=2, seed=3)
>>> family.num_clips, family.clip_id(1), family.windows(1)[0].to_json()
(2, 'monet2-s3-t001', {'direction_deg': 180.0, 'trial': 1, 'start': 32, 'stop': 54})
>>> family.frames(1).shape
(906, 144, 256)
"""

from __future__ import annotations

import abc
import itertools
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

__all__ = ["Window", "Family", "Monet2", "RigidMonet", "Gratings", "Dots", "FAMILIES", "family_from_name",
           "half_hamming", "orientation_mask"]

_GRAY = 128
_ORDER_STREAM, _PIXEL_STREAM = 0, 1


@dataclass(frozen=True)
class Window:
    """Frames ``[start, stop)`` of a clip whose responses are averaged for condition ``condition``.

    ``condition`` indexes ``family.conditions``; ``labels`` holds JSON-able fields for metadata: at least the
    fields of that condition, plus ``trial`` (and, for gratings, ``spatial_freq`` / ``temporal_freq``).
    """

    condition: int
    start: int
    stop: int
    labels: Mapping[str, Any]

    def to_json(self) -> dict:
        """``{**labels, "start": start, "stop": stop}``."""
        return {**self.labels, "start": self.start, "stop": self.stop}


@dataclass(frozen=True, kw_only=True)
class Family(abc.ABC):
    """A seeded, parametric set of stimulus clips (see the module docstring for the common clip layout).

    ``height`` x ``width`` pixels at ``fps`` Hz; ``burnin_frames`` gray frames open every clip and are never
    scored; ``latency_frames`` shifts every scoring window after its event's onset (the response delay).
    """

    name: ClassVar[str]
    _clip_tag: ClassVar[str]  # clip_id = f"{name}-s{seed}-{_clip_tag}{index:03d}"

    height: int = 144
    width: int = 256
    fps: float = 30.0
    burnin_frames: int = 10
    latency_frames: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("height", 1)
        self._check_int("width", 1)
        self._check_float("fps", lambda v: v > 0, "> 0")
        self._check_int("burnin_frames", 0)
        self._check_int("latency_frames", 0)
        self._check_int("seed", 0)

    # ------------------------------------------------------------------------------------ to implement
    @property
    @abc.abstractmethod
    def conditions(self) -> list[dict]:
        """The conditions windows refer to by index (JSON-able dicts)."""

    @property
    @abc.abstractmethod
    def num_clips(self) -> int:
        """Number of clips of the family."""

    @abc.abstractmethod
    def _events(self, index: int) -> list[tuple[int, dict]]:
        """``(condition, labels)`` of the events of clip ``index``, in display order (cheap, no pixels)."""

    @abc.abstractmethod
    def _layout(self) -> tuple[int, int, int, int]:
        """Frames of every event: ``(lead, shown, after, scored)`` (gray, stimulus, gray, window length)."""

    @abc.abstractmethod
    def _draw(self, labels: dict, rng: np.random.Generator) -> np.ndarray:
        """The ``shown`` stimulus frames of the event with ``labels``: uint8 ``[shown, H, W]``."""

    def _window_offset(self) -> int:
        """Frames from an event's first stimulus frame to the start of its scored part (before the latency)."""
        return 0

    # ------------------------------------------------------------------------------------ public API
    def clip_id(self, index: int) -> str:
        """Stable id of clip ``index``, e.g. ``monet-s0-t003``."""
        self._check_index(index)
        return f"{self.name}-s{self.seed}-{self._clip_tag}{index:03d}"

    def num_frames(self, index: int) -> int:
        """Length ``T`` of clip ``index`` (no pixels drawn)."""
        return self._length(len(self._events(index)))

    def windows(self, index: int) -> list[Window]:
        """The scoring windows of clip ``index``, one per event in display order (no pixels drawn)."""
        events = self._events(index)
        *_, scored = self._layout()
        start = self._window_offset() + self.latency_frames
        return [
            Window(condition, onset + start, onset + start + scored, labels)
            for (condition, labels), onset in zip(events, self._onsets(len(events)))
        ]

    def frames(self, index: int) -> np.ndarray:
        """Clip ``index``: uint8 ``[T, H, W]``, deterministic in (parameters, seed, index)."""
        events = self._events(index)
        _, shown, _, _ = self._layout()
        out = np.full((self._length(len(events)), self.height, self.width), _GRAY, dtype=np.uint8)
        rng = np.random.default_rng([self.seed, _PIXEL_STREAM, index])
        for (_, labels), onset in zip(events, self._onsets(len(events))):
            out[onset : onset + shown] = self._draw(labels, rng)
        return out

    def params(self) -> dict:
        """Every parameter (JSON-able; tuples as lists): ``family_from_name(f.name, **f.params()) == f``."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    # ------------------------------------------------------------------------------------ helpers
    def _onsets(self, n: int) -> list[int]:
        lead, shown, after, _ = self._layout()
        return [self.burnin_frames + k * (lead + shown + after) + lead for k in range(n)]

    def _length(self, n: int) -> int:
        lead, shown, after, scored = self._layout()
        last_onset = self.burnin_frames + (n - 1) * (lead + shown + after) + lead
        return max(self.burnin_frames + n * (lead + shown + after),
                   last_onset + self._window_offset() + self.latency_frames + scored)

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_clips:
            raise ValueError(
                f"{type(self).__name__}: clip index {index!r} out of range, expected 0..{self.num_clips - 1}"
            )

    def _fail(self, key: str, expected: str) -> None:
        raise ValueError(f"{type(self).__name__}: {key}={getattr(self, key)!r}, expected {expected}")

    def _check_int(self, key: str, minimum: int) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            self._fail(key, f"an integer >= {minimum}")
        object.__setattr__(self, key, int(value))

    def _check_float(self, key: str, ok: Callable[[float], bool], expected: str) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            self._fail(key, f"a finite number {expected}")
        if not ok(float(value)):
            self._fail(key, f"a number {expected}")
        object.__setattr__(self, key, float(value))


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------ directional
@dataclass(frozen=True, kw_only=True)
class _Directional(Family):
    """Shared by :class:`Monet2`, :class:`RigidMonet` and :class:`Gratings`: ``directions`` equally spaced directions
    starting at 0 degrees; one clip per trial (``trials``) holding every block once, in a seeded random order; blocks of
    ``block_frames``; ``contrast`` in (0, 1] around gray. Conditions are the directions, ascending."""

    _clip_tag: ClassVar[str] = "t"

    directions: int = 16
    trials: int = 1
    block_frames: int = 30
    contrast: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("directions", 1)
        self._check_int("trials", 1)
        self._check_int("block_frames", 1)
        self._check_float("contrast", lambda v: 0 < v <= 1, "in (0, 1]")

    @property
    def conditions(self) -> list[dict]:
        return [{"direction_deg": 360.0 * k / self.directions} for k in range(self.directions)]

    @property
    def num_clips(self) -> int:
        return self.trials

    def _blocks(self) -> list[tuple[int, dict]]:
        """``(condition, labels)`` of every block of a trial, in canonical order."""
        return list(enumerate(self.conditions))

    def _events(self, index: int) -> list[tuple[int, dict]]:
        self._check_index(index)
        blocks = self._blocks()
        order = np.random.default_rng([self.seed, _ORDER_STREAM, index]).permutation(len(blocks))
        return [(blocks[i][0], {**blocks[i][1], "trial": index}) for i in order]


@dataclass(frozen=True, kw_only=True)
class _Blocks(_Directional):
    """Shared by :class:`RigidMonet` and :class:`Monet2`: one block of ``block_frames`` per direction, of which
    ``round(ori_fraction * block_frames)`` frames are coherent (the scoring window's length)."""

    ori_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_float("ori_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
        if round(self.ori_fraction * self.block_frames) < 1:
            self._fail("ori_fraction", f"round(ori_fraction * block_frames={self.block_frames}) >= 1 coherent frame")

    def _layout(self) -> tuple[int, int, int, int]:
        return 0, self.block_frames, 0, round(self.ori_fraction * self.block_frames)


@dataclass(frozen=True, kw_only=True)
class RigidMonet(_Blocks):
    """Directional pink noise drifting rigidly (this project's first "Monet"-like family; not the published
    Monet2, see :class:`Monet2`). One clip per trial: gray burn-in, then one block per direction.

    A block's first ``round(ori_fraction * block_frames)`` frames (its coherent part, the scoring window's
    length) show a fresh periodic ``H x W`` noise field with a ``1/f`` amplitude spectrum up to
    ``max_spatial_freq`` cycles per screen width, filtered to wave vectors within a Gaussian window of standard
    deviation ``bandwidth_deg`` around the direction of motion (so its structure is elongated perpendicular to
    it), drifting rigidly along the direction at ``speed`` screen widths per second (sub-pixel FFT phase shift).
    The rest of the block shows a static isotropic field of the same spectrum. Each field is scaled by its
    standard deviation: ``pixel = round(128 + 127 * contrast * clip(z / 3, -1, 1))`` (z in SDs).
    """

    name: ClassVar[str] = "rigid_monet"

    bandwidth_deg: float = 15.0
    speed: float = 0.2
    max_spatial_freq: float = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_float("bandwidth_deg", lambda v: v > 0, "> 0")
        self._check_float("speed", lambda v: v > 0, "> 0 (screen widths per second)")
        self._check_float("max_spatial_freq", lambda v: v > 0, "> 0 (cycles per screen width)")
        if self.speed * self.max_spatial_freq >= self.fps / 2:
            limit = self.fps / 2 / self.max_spatial_freq
            self._fail("speed", f"< fps / 2 / max_spatial_freq = {limit:g} (no temporal aliasing)")
        kx, krow, amplitude = self._spectrum()
        for condition in self.conditions:
            if not np.any(amplitude * self._band(kx, krow, condition["direction_deg"]) > 0):
                where = f"{condition['direction_deg']:g} deg with max_spatial_freq={self.max_spatial_freq:g}"
                self._fail("bandwidth_deg", f"a wider band: no spectral energy at {where}")

    def _spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rFFT grid: ``kx`` ``[1, W//2+1]`` (cycles/px, rightwards), ``krow`` ``[H, 1]`` (cycles/px, downwards)
        and the isotropic amplitude ``[H, W//2+1]`` (``1/f``, no DC, no Nyquist, none above the cut-off)."""
        kx = np.fft.rfftfreq(self.width)[None, :]
        krow = np.fft.fftfreq(self.height)[:, None]
        radius = np.hypot(kx, krow) * self.width  # cycles per screen width
        amplitude = np.where((radius > 0) & (radius <= self.max_spatial_freq), 1.0 / np.maximum(radius, 1e-12), 0.0)
        if self.width % 2 == 0:
            amplitude[:, -1] = 0.0
        if self.height % 2 == 0:
            amplitude[self.height // 2, :] = 0.0
        return kx, krow, amplitude

    def _band(self, kx: np.ndarray, krow: np.ndarray, direction_deg: float) -> np.ndarray:
        """Gaussian window in spectral angle (y up, modulo 180) around the direction: ``[H, W//2+1]``."""
        angle = np.degrees(np.arctan2(-krow, kx))
        offset = (angle - direction_deg + 90.0) % 180.0 - 90.0
        return np.exp(-0.5 * (offset / self.bandwidth_deg) ** 2)

    def _draw(self, labels: dict, rng: np.random.Generator) -> np.ndarray:
        _, block, _, coherent = self._layout()
        kx, krow, amplitude = self._spectrum()
        direction = labels["direction_deg"]
        spectrum = np.fft.rfft2(rng.standard_normal((self.height, self.width))) * amplitude
        spectrum *= self._band(kx, krow, direction)
        step = self.speed * self.width / self.fps * np.arange(coherent)[:, None, None]  # px per frame
        shift_x = step * math.cos(math.radians(direction))
        shift_row = -step * math.sin(math.radians(direction))  # moving up = towards row 0
        phase_x = np.exp(-2j * np.pi * kx * shift_x).astype(np.complex64)  # [F, 1, W//2+1]
        phase_row = np.exp(-2j * np.pi * krow * shift_row).astype(np.complex64)  # [F, H, 1]
        moving = spectrum.astype(np.complex64) * phase_x * phase_row  # single precision: 2x faster, ample for uint8
        out = np.empty((block, self.height, self.width), dtype=np.uint8)
        out[:coherent] = self._to_uint8(np.fft.irfft2(moving, s=(self.height, self.width)))
        if coherent < block:
            still = np.fft.rfft2(rng.standard_normal((self.height, self.width))) * amplitude
            out[coherent:] = self._to_uint8(np.fft.irfft2(still, s=(self.height, self.width))[None])
        return out

    def _to_uint8(self, field: np.ndarray) -> np.ndarray:
        """``[F, H, W]`` rigid copies of one field -> uint8, scaled by the first frame's SD (shared by all)."""
        z = np.clip(field / (3.0 * field[0].std()), -1.0, 1.0)
        return np.rint(_GRAY + 127.0 * self.contrast * z).astype(np.uint8)


def half_hamming(taps: int) -> np.ndarray:
    """The causal temporal kernel of :class:`Monet2`: the falling half of a Hamming window, ``h[n] = 0.54 +
    0.46 cos(pi n / taps)`` for ``n = 0 .. taps - 1``, scaled to unit energy (``sum h^2 = 1``): ``[taps]``."""
    kernel = 0.54 + 0.46 * np.cos(np.pi * np.arange(taps) / taps)
    return kernel / np.sqrt(np.sum(kernel**2))


def orientation_mask(offset_rad: np.ndarray, coherence: float, mix: float) -> np.ndarray:
    """The amplitude factor of :class:`Monet2` at spectral orientation ``offset_rad`` (radians from the direction
    of motion, wrapped to ``[-pi/2, pi/2)``): ``(1 - mix) + mix * sqrt(c) * hann(c * offset)`` with ``hann(x) =
    (1 + cos x) / 2`` for ``|x| <= pi``, 0 beyond. Its power ``mask^2`` has a full width at half maximum of
    ``2 arccos(2 * 2**-0.5 - 1) / c`` for ``mix = 1`` (87.4 degrees at ``c = 1.5``)."""
    x = coherence * np.asarray(offset_rad, dtype=np.float64)
    hann = np.where(np.abs(x) <= np.pi, 0.5 * (1.0 + np.cos(x)), 0.0)
    return (1.0 - mix) + mix * math.sqrt(coherence) * hann


@dataclass(frozen=True, kw_only=True)
class Monet2(_Blocks):
    """Monet2, the published pipeline's directional noise (``IN_SILICO.md`` §6), in our conventions.

    One clip per trial: gray burn-in, then one period of ``block_frames`` per direction (seeded order). The
    whole clip after the burn-in is one dynamic noise movie:

    1. white Gaussian noise on a coarse ``pattern_height x pattern_width`` grid per frame (``pattern_height =
       round(pattern_width * height / width)``: square pattern pixels), filtered in time by the causal
       :func:`half_hamming` kernel of ``round(fps / temporal_bandwidth)`` taps (``temporal_bandwidth`` in Hz; the
       kernel's history is drawn too, so the first frame is as filtered as the others);
    2. upsampled ``upscale`` times with a Gaussian interpolation kernel of SD ``sigma`` upsampled pixels:
       band-limited (Fourier) upsampling times the Gaussian's transfer ``exp(-2 pi^2 (sigma / upscale)^2 f^2)``
       (``f`` in cycles per pattern pixel; the spectral images of zero insertion that this kernel leaves, under
       1% in amplitude, are dropped), so the spatial spectrum is a Gaussian low-pass; the upsampled pattern is
       stretched over the screen (evaluated on the ``height x width`` pixel grid, whose Nyquist limit drops
       what a small screen cannot show);
    3. in the coherent segment of each period, ``round(ori_fraction * block_frames)`` frames centred in it, the
       amplitude is multiplied by :func:`orientation_mask` (``coherence``, ``mix``) around the direction of
       motion (wave vectors along the motion: structure elongated perpendicular to it) and the movie drifts
       along the direction at ``speed`` screen widths per second (applied on the upsampled grid; the upsampled
       pattern spans the screen, so also screen widths per second), the displacement counted from the
       segment's first frame; the rest of the period is the same dynamic noise, isotropic and still.

    Pixels: ``round(128 + 127 * contrast * clip(z / 3, -1, 1))`` with ``z`` the movie in units of its standard
    deviation over the clip (after the burn-in). Scoring windows: the coherent segments (plus the latency).
    The defaults are the published values: 16 directions, 30-s movies at 30 fps (``block_frames`` = 56, 1.87 s
    per direction), pattern width 80, x3 upsampling, sigma 3, 4 Hz, coherence 1.5, mix 1, ``ori_fraction``
    0.4, speed 0.25. (Monet2's own directions convert to ours as ``(90 - dir) mod 360``; the exact values used
    for the MICrONS scans are not public.)
    """

    name: ClassVar[str] = "monet2"

    block_frames: int = 56
    ori_fraction: float = 0.4
    temporal_bandwidth: float = 4.0
    pattern_width: int = 80
    upscale: int = 3
    sigma: float = 3.0
    coherence: float = 1.5
    mix: float = 1.0
    speed: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_float("temporal_bandwidth", lambda v: 0 < v <= self.fps, f"in (0, fps = {self.fps:g}] (Hz)")
        self._check_int("pattern_width", 4)
        self._check_int("upscale", 1)
        self._check_float("sigma", lambda v: v > 0, "> 0 (upsampled pixels)")
        self._check_float("coherence", lambda v: v >= 1, ">= 1")
        self._check_float("mix", lambda v: 0 <= v <= 1, "in [0, 1]")
        self._check_float("speed", lambda v: v >= 0, ">= 0 (screen widths per second)")

    @property
    def pattern_height(self) -> int:
        return max(1, round(self.pattern_width * self.height / self.width))

    @property
    def taps(self) -> int:
        """Length of the temporal kernel in frames."""
        return max(1, round(self.fps / self.temporal_bandwidth))

    def _window_offset(self) -> int:
        _, shown, _, coherent = self._layout()
        return (shown - coherent) // 2

    def _draw(self, labels: dict, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError("Monet2 draws whole clips (frames)")  # frames() is overridden

    def _spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coarse grid's rFFT frequencies in cycles per pattern pixel, ``kx [1, pw//2+1]`` (rightwards) and
        ``ky [ph, 1]`` (UPWARDS), and the Gaussian transfer ``[ph, pw//2+1]`` (Nyquist rows/columns zeroed)."""
        ph, pw = self.pattern_height, self.pattern_width
        kx = np.fft.rfftfreq(pw)[None, :]
        ky = -np.fft.fftfreq(ph)[:, None]
        transfer = np.exp(-2.0 * np.pi**2 * (self.sigma / self.upscale) ** 2 * (kx**2 + ky**2))
        if pw % 2 == 0:
            transfer[:, -1] = 0.0
        if ph % 2 == 0:
            transfer[ph // 2, :] = 0.0
        return kx, ky, transfer

    def _on_screen(self, spectra: np.ndarray) -> np.ndarray:
        """Coarse rFFT spectra ``[F, ph, pw//2+1]`` -> fields on the screen's pixel grid ``[F, H, W]`` (zero
        padding: the band-limited pattern evaluated at the screen's pixels; on a screen of fewer pixels than the
        pattern, the frequencies it cannot hold are dropped)."""
        ph, pw = self.pattern_height, self.pattern_width
        padded = np.zeros((spectra.shape[0], self.height, self.width // 2 + 1), dtype=np.complex64)
        cols = min(pw // 2 + 1, (self.width - 1) // 2 + 1)
        up, down = min((ph + 1) // 2, (self.height + 1) // 2), min(ph - (ph + 1) // 2, (self.height - 1) // 2)
        padded[:, :up, :cols] = spectra[:, :up, :cols]
        if down:
            padded[:, self.height - down :, :cols] = spectra[:, ph - down :, :cols]
        return np.fft.irfft2(padded, s=(self.height, self.width)).astype(np.float32)

    def frames(self, index: int) -> np.ndarray:
        """Clip ``index``: uint8 ``[T, H, W]``, deterministic in (parameters, seed, index)."""
        events = self._events(index)
        _, block, _, coherent = self._layout()
        offset = self._window_offset()
        out = np.full((self._length(len(events)), self.height, self.width), _GRAY, dtype=np.uint8)
        rng = np.random.default_rng([self.seed, _PIXEL_STREAM, index])
        shown = len(events) * block
        ph, pw, taps = self.pattern_height, self.pattern_width, self.taps
        noise = rng.standard_normal((shown + taps - 1, ph, pw), dtype=np.float32)
        kernel = half_hamming(taps).astype(np.float32)
        filtered = sum(kernel[n] * noise[taps - 1 - n : taps - 1 - n + shown] for n in range(taps))  # [shown, ph, pw]
        kx, ky, transfer = self._spectrum()
        angle = np.arctan2(ky, kx)  # spectral direction, y up
        movie = np.empty((shown, self.height, self.width), dtype=np.float32)
        step = self.speed * pw / self.fps  # pattern pixels per frame
        for k, ((_, labels), onset) in enumerate(zip(events, self._onsets(len(events)))):
            spectra = np.fft.rfft2(filtered[k * block : (k + 1) * block]) * transfer.astype(np.float32)
            theta = math.radians(labels["direction_deg"])
            offset_rad = (angle - theta + np.pi / 2) % np.pi - np.pi / 2
            mask = orientation_mask(offset_rad, self.coherence, self.mix).astype(np.float32)
            shift = step * np.arange(coherent)[:, None, None]
            phase = np.exp(-2j * np.pi * shift * (kx * math.cos(theta) + ky * math.sin(theta))).astype(np.complex64)
            moving = spectra[offset : offset + coherent] * mask * phase
            spectra[offset : offset + coherent] = moving
            movie[k * block : (k + 1) * block] = self._on_screen(spectra)
        z = np.clip(movie / (3.0 * movie.std()), -1.0, 1.0)
        out[self.burnin_frames : self.burnin_frames + shown] = np.rint(_GRAY + 127.0 * self.contrast * z)
        return out


@dataclass(frozen=True, kw_only=True)
class Gratings(_Directional):
    """Drifting sinusoidal gratings ``128 + 127 * contrast * sin(2 pi (f_s u - f_t t))``.

    ``u = x cos(theta) + y sin(theta)`` in screen widths (x right, y up, origin at the screen centre), ``t`` in
    seconds from the block's first grating frame. One clip per trial holding every (direction, spatial
    frequency, temporal frequency) block once in a seeded order, each block ``gray_frames`` of gray then
    ``block_frames`` of grating (the scoring window's length). Conditions are the directions; window labels add
    ``spatial_freq`` (cycles per screen width) and ``temporal_freq`` (Hz).
    """

    name: ClassVar[str] = "gratings"

    spatial_freqs: tuple[float, ...] = (4.0,)
    temporal_freqs: tuple[float, ...] = (2.0,)
    gray_frames: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_freqs("spatial_freqs", self.width / 2, "width / 2 (spatial Nyquist)")
        self._check_freqs("temporal_freqs", self.fps / 2, "fps / 2 (temporal Nyquist)")
        self._check_int("gray_frames", 0)

    def _check_freqs(self, key: str, limit: float, limit_name: str) -> None:
        values = getattr(self, key)
        numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values
        )
        if not (numbers and values and all(0 < v < limit for v in values)):
            self._fail(key, f"a non-empty list of numbers in (0, {limit_name} = {limit:g})")
        object.__setattr__(self, key, tuple(float(v) for v in values))

    def _layout(self) -> tuple[int, int, int, int]:
        return self.gray_frames, self.block_frames, 0, self.block_frames

    def _blocks(self) -> list[tuple[int, dict]]:
        return [
            (k, {**condition, "spatial_freq": fs, "temporal_freq": ft})
            for (k, condition), fs, ft in itertools.product(
                enumerate(self.conditions), self.spatial_freqs, self.temporal_freqs
            )
        ]

    def _draw(self, labels: dict, rng: np.random.Generator) -> np.ndarray:
        theta = math.radians(labels["direction_deg"])
        x = (np.arange(self.width) + 0.5 - self.width / 2) / self.width
        y = (self.height / 2 - np.arange(self.height) - 0.5) / self.width
        u = x[None, :] * math.cos(theta) + y[:, None] * math.sin(theta)
        t = np.arange(self.block_frames)[:, None, None] / self.fps
        wave = np.sin(2 * np.pi * (labels["spatial_freq"] * u[None] - labels["temporal_freq"] * t))
        return np.rint(_GRAY + 127.0 * self.contrast * wave).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- dots
@dataclass(frozen=True, kw_only=True)
class Dots(Family):
    """Flashing dots (sparse noise) on a ``rows x cols`` grid covering the screen (row 0 at the top).

    Cell ``(row, col)`` spans pixel rows ``[row * H // rows, (row + 1) * H // rows)`` (same for columns); its
    dot is the centred rectangle of ``dot_size`` times the cell's height and width (the whole cell by default;
    about square on the default grid, 28.8 x 28.4 px), white (255, "on") or black (0, "off") on gray for
    ``dot_frames``, then ``gap_frames`` of gray. Each trial shows every (cell, polarity) once in a seeded
    order; trials follow one another and the events are cut into clips of at most ``events_per_clip``.
    Condition index = ``(polarity * rows + row) * cols + col``, polarity 0 = "on", 1 = "off".
    """

    name: ClassVar[str] = "dots"
    _clip_tag: ClassVar[str] = "c"
    POLARITIES: ClassVar[tuple[str, str]] = ("on", "off")

    rows: int = 5
    cols: int = 9
    dot_size: float = 1.0
    dot_frames: int = 6
    gap_frames: int = 0
    trials: int = 1
    events_per_clip: int = 40

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("rows", 1)
        self._check_int("cols", 1)
        if self.rows > self.height:
            self._fail("rows", f"<= height = {self.height}")
        if self.cols > self.width:
            self._fail("cols", f"<= width = {self.width}")
        self._check_float("dot_size", lambda v: 0 < v <= 1, "in (0, 1] (fraction of a cell)")
        self._check_int("dot_frames", 1)
        self._check_int("gap_frames", 0)
        self._check_int("trials", 1)
        self._check_int("events_per_clip", 1)

    @property
    def conditions(self) -> list[dict]:
        return [
            {"row": r, "col": c, "polarity": polarity}
            for polarity in self.POLARITIES
            for r in range(self.rows)
            for c in range(self.cols)
        ]

    @property
    def num_clips(self) -> int:
        return -(-len(self.conditions) * self.trials // self.events_per_clip)

    def _layout(self) -> tuple[int, int, int, int]:
        return 0, self.dot_frames, self.gap_frames, self.dot_frames

    def _events(self, index: int) -> list[tuple[int, dict]]:
        self._check_index(index)
        conditions = self.conditions
        n = len(conditions)
        first, stop = index * self.events_per_clip, min((index + 1) * self.events_per_clip, n * self.trials)
        events = []
        for trial in range(first // n, (stop - 1) // n + 1):
            order = np.random.default_rng([self.seed, _ORDER_STREAM, trial]).permutation(n)
            for position in range(max(first - trial * n, 0), min(stop - trial * n, n)):
                c = int(order[position])
                events.append((c, {**conditions[c], "trial": trial}))
        return events

    def _draw(self, labels: dict, rng: np.random.Generator) -> np.ndarray:
        frame = np.full((self.height, self.width), _GRAY, dtype=np.uint8)
        rows = _dot_span(labels["row"], self.rows, self.height, self.dot_size)
        cols = _dot_span(labels["col"], self.cols, self.width, self.dot_size)
        frame[rows, cols] = 255 if labels["polarity"] == "on" else 0
        return np.broadcast_to(frame, (self.dot_frames, self.height, self.width))


def _dot_span(cell: int, cells: int, pixels: int, size: float) -> slice:
    """Pixel range of a dot of ``size`` (fraction of a cell) centred in ``cell`` of ``cells`` over ``pixels``."""
    lo, hi = cell * pixels // cells, (cell + 1) * pixels // cells
    extent = max(1, round(size * (hi - lo)))
    start = lo + (hi - lo - extent) // 2
    return slice(start, start + extent)


#: The families by name.
FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Monet2, RigidMonet, Gratings, Dots)}


def family_from_name(name: str, **params: Any) -> Family:
    """The family ``name`` ("monet2" | "rigid_monet" | "gratings" | "dots") with ``params`` (the others at their
    defaults)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown stimulus family {name!r}, expected one of: {', '.join(FAMILIES)}")
    cls = FAMILIES[name]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown parameter(s) {', '.join(unknown)}, expected some of: {', '.join(known)}"
        )
    return cls(**params)
