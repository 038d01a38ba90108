"""Import movies as stimulus clips, streaming with bounded memory: ``.npy``, ``.npz``, trial folders, video.

Sources (:func:`open_movies`; local paths or any fsspec URL):

* ``.npy``: uint8 ``[T, H, W]`` or ``[T, H, W, 1]``. A local file is memory-mapped (``np.load(mmap_mode="r")``);
  a remote one (``s3://...``) is read by byte ranges (its header parsed first, then one request per clip).
  Never whole in memory: the published 75,000-frame stimulus is 2.8 GB.
* ``.npz``: the frames are the array ``stimulus``, else ``stimuli``, else the only array other than
  ``perspectives`` / ``modulations`` (``key=`` names another); optional ``perspectives`` / ``modulations``
  float ``[T, 2]``. The frames member is streamed, stored or deflated.
* a folder in the original package's trial layout: ``stimuli/<trial>.npy`` (at any depth, e.g.
  ``stimuli/<video>/<repeat>.npy``; uint8 ``[T, H, W, 1]`` or ``[T, H, W]``) with optional
  ``perspectives/<trial>.npy`` and ``modulations/<trial>.npy`` (float ``[T, 2]``); every trial is a movie
  named by its path below ``stimuli/`` without ``.npy`` (e.g. ``video3/0``). Other folders are ignored.
* any other file: a video, decoded with PyAV (``pip install av``). Frames become gray (the luma plane),
  resized to ``size`` (default 144x256, area interpolation, aspect ratio not kept) and resampled to ``fps``
  (default 30 Hz) by sample-and-hold: output frame ``k``, at ``t0 + k / fps`` (``t0`` = the first frame's
  time), is the last decoded frame whose time is ``<=`` that, within 1 ms (containers such as Matroska round
  times to the millisecond); the movie ends at the last frame's time plus its duration.

Frame size: ``size`` is the frame size of the release the clips are for (the MICrONS release: 144x256). Arrays
of another size are refused unless ``resize=True`` (then resized: bilinear with antialiasing); with ``size=None``
arrays of any size are taken as they are. A 3-D array whose first two axes are the frame size and whose last is
not (``[144, 256, T]``) is time-last and refused whatever ``resize`` says.

Clips (:func:`cut`, :func:`import_clips`). Each movie is cut by ``clip_frames=N`` (consecutive N-frame clips,
the last one shorter when N does not divide the movie; N longer than the movie is an error), by ``boundaries``
(:func:`read_boundaries`: start frames, each clip running to the next start and the last to the end of the
movie; or ``start,stop`` pairs, sorted and non-overlapping, gaps allowed; one movie only), or, with neither,
into one clip per movie.
``context_frames=W``: every clip also carries the up to ``W`` frames of the movie before it
(:attr:`Clip.context_frames`), fewer when it starts less than ``W`` frames into its movie (the first clip of a
movie has none); with ``strict_context=True`` such a clip is an error instead. Clip ids are
``<movie>-<start>-<stop>`` with the clip's frame range without its context, zero-padded to 6 digits, e.g.
``stimulus-000300-000600``; the movie name is the file's stem (or the trial's name).

Bad input raises one line naming the file: ``FileNotFoundError`` for a missing source, ``ValueError`` for
anything else (not uint8, not ``[T, H, W]`` / ``[T, H, W, 1]``, undecodable video, boundaries outside the
movie or overlapping or unsorted, perspectives of another length, perspectives or modulations that are not
finite (naming the frame), ...). Some of it (a boundary past the end of a video, a corrupt member) only shows
while reading: :class:`fnn_ray.stimuli.ClipWriter` then removes what it wrote.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

import numpy as np
from fsspec import AbstractFileSystem

from fnn_ray import storage
from fnn_ray.stimuli import Clip, check_finite

__all__ = ["Boundaries", "Movie", "VIDEO_SIZE", "cut", "import_clips", "open_movies", "read_boundaries",
           "read_npy_header"]

#: Default ``(height, width)`` of imported video frames.
VIDEO_SIZE = (144, 256)
_FRAMES_KEYS = ("stimulus", "stimuli")
_VECTORS = ("perspectives", "modulations")
_HEADER_BYTES = 64 * 1024  # first read of a remote .npy: its header (a few hundred bytes) and then some
_CHUNK_BYTES = 16 << 20  # frames decoded or streamed per step
_TIME_SLACK = Fraction(1, 1000)  # video frame times are compared within 1 ms


# -------------------------------------------------------------------------------------------- movies
class Movie:
    """One continuous movie of uint8 ``[H, W]`` frames, read forward in frame ranges.

    ``name`` (for clip ids), ``url`` (for messages), ``height``, ``width``, ``num_frames`` (None when known
    only once read to the end: video), ``perspectives`` / ``modulations``: float32 ``[T, 2]`` or None.
    """

    def __init__(
        self,
        name: str,
        url: str,
        height: int,
        width: int,
        num_frames: int | None,
        reader: Callable[[int, int | None], np.ndarray],
        perspectives: np.ndarray | None = None,
        modulations: np.ndarray | None = None,
    ) -> None:
        self.name, self.url, self.height, self.width, self.num_frames = name, url, height, width, num_frames
        self.perspectives, self.modulations = perspectives, modulations
        self._reader = reader

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Frames ``[start, stop)`` (to the end when ``stop`` is None): uint8 ``[n, H, W]``, fewer than asked
        only at the end of the movie. A call may not start before the previous call's ``start``."""
        return self._reader(start, stop)


class _Forward:
    """``read(start, stop)`` over a forward-only iterator of uint8 ``[n, H, W]`` chunks: frames before the
    latest ``start`` are dropped, so memory holds one read and one chunk."""

    def __init__(self, chunks: Iterator[np.ndarray], height: int, width: int) -> None:
        self._chunks, self._shape = chunks, (height, width)
        self._parts: list[np.ndarray] = []
        self._first = 0  # index of the first buffered frame
        self._end = 0  # frames taken from the iterator so far
        self._done = False

    def _drop(self, start: int) -> None:
        while self._parts and self._first + len(self._parts[0]) <= start:
            self._first += len(self._parts.pop(0))
        if not self._parts:
            self._first = self._end

    def __call__(self, start: int, stop: int | None) -> np.ndarray:
        if start < self._first:
            raise RuntimeError(f"read from frame {start} after frames before {self._first} were dropped")
        while not self._done and (stop is None or self._end < stop):
            chunk = next(self._chunks, None)
            if chunk is None:
                self._done = True
                break
            self._parts.append(chunk)
            self._end += len(chunk)
            self._drop(start)
        self._drop(start)
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        frames = self._parts[0] if self._parts else np.empty((0, *self._shape), np.uint8)
        stop = self._end if stop is None else min(stop, self._end)
        return frames[start - self._first : max(start, stop) - self._first]


def read_npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Parse a .npy header from ``stream`` (left at the first data byte): ``(shape, dtype, fortran_order)``."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, EOFError) as e:
        raise ValueError(f"{where}: not a readable .npy array ({e})") from None
    return shape, dtype, fortran


def _frame_shape(shape: tuple[int, ...], dtype: np.dtype, fortran: bool, where: str,
                 size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """Check a frames array's header; return ``(T, H, W)``. An array whose first two axes are the frame size
    (``size``, default :data:`VIDEO_SIZE`) and whose last is not is ``[H, W, T]``: refused."""
    if dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{where}: frames must be uint8 [T, H, W] or [T, H, W, 1], got {dtype} {list(shape)}")
    height, width = size or VIDEO_SIZE
    if len(shape) == 3 and (shape[0], shape[1]) == (height, width) and shape[2] != width:
        raise ValueError(f"{where}: frames {list(shape)} look like [H, W, T] (time last); they must be [T, H, W] "
                         f"(e.g. numpy.moveaxis(movie, -1, 0))")
    if fortran:
        raise ValueError(f"{where}: frames must be stored in C order, got a Fortran-ordered array")
    if min(shape[:3]) == 0:
        raise ValueError(f"{where}: frames {list(shape)} has an empty axis")
    return shape[0], shape[1], shape[2]


def _vector(data: bytes, name: str, frames: int, where: str) -> np.ndarray:
    """A per-frame ``[T, 2]`` array (perspectives / modulations) from .npy bytes, as float32."""
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{where}: not a readable .npy array ({e})") from None
    if not isinstance(a, np.ndarray) or a.shape != (frames, 2) or not np.issubdtype(a.dtype, np.number):
        desc = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{where}: {name} must be a numeric [T, 2] = [{frames}, 2] array, got {desc}")
    a = a.astype(np.float32)
    check_finite(a, f"{where}: {name}")
    return a


def _npy_movie(fs: AbstractFileSystem, path: str, where: str, name: str, size: tuple[int, int] | None) -> Movie:
    nbytes = fs.size(path)
    header = io.BytesIO(fs.cat_file(path, start=0, end=min(nbytes, _HEADER_BYTES)))
    shape, dtype, fortran = read_npy_header(header, where)
    T, H, W = _frame_shape(shape, dtype, fortran, where, size)
    offset, frame_bytes = header.tell(), H * W
    if nbytes < offset + T * frame_bytes:
        raise ValueError(f"{where}: truncated: {nbytes} bytes, the header's {list(shape)} frames need "
                         f"{offset + T * frame_bytes}")
    if storage.is_local(fs):
        frames = np.load(path, mmap_mode="r").reshape(T, H, W)

        def reader(start: int, stop: int | None) -> np.ndarray:
            return np.array(frames[start:stop])
    else:
        def reader(start: int, stop: int | None) -> np.ndarray:
            stop = T if stop is None else min(stop, T)
            if stop <= start:
                return np.empty((0, H, W), np.uint8)
            data = fs.cat_file(path, start=offset + start * frame_bytes, end=offset + stop * frame_bytes)
            return np.frombuffer(data, np.uint8).reshape(stop - start, H, W)

    return Movie(name, where, H, W, T, reader)


def _npz_movie(fs: AbstractFileSystem, path: str, where: str, name: str, key: str | None,
               size: tuple[int, int] | None) -> Movie:
    f = fs.open(path, "rb")
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        f.close()
        raise ValueError(f"{where}: not a .npz archive ({e})") from None
    keys = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    if key is None:
        found = [k for k in _FRAMES_KEYS if k in keys]
        others = [k for k in keys if k not in _VECTORS]
        key = found[0] if found else others[0] if len(others) == 1 else None
        if key is None:
            f.close()
            raise ValueError(f"{where}: no frames: expected an array 'stimulus' or 'stimuli' (or a single array), "
                             f"found {keys}; name one with --key")
    elif key not in keys:
        f.close()
        raise ValueError(f"{where}: no array {key!r}; found {keys}")
    at = f"{where}[{key}]"
    member = archive.open(f"{key}.npy")
    T, H, W = _frame_shape(*read_npy_header(member, at), at, size)
    vectors = {v: _vector(archive.read(f"{v}.npy"), v, T, f"{where}[{v}]") for v in _VECTORS if v in keys}
    per_chunk = max(1, _CHUNK_BYTES // (H * W))

    def chunks() -> Iterator[np.ndarray]:
        try:
            for start in range(0, T, per_chunk):
                n = min(per_chunk, T - start)
                data = member.read(n * H * W)
                if len(data) < n * H * W:
                    raise ValueError(f"{at}: truncated: it ends within frame {start + len(data) // (H * W)} of {T}")
                yield np.frombuffer(data, np.uint8).reshape(n, H, W)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{at}: cannot read the frames ({e})") from None
        finally:
            f.close()

    return Movie(name, where, H, W, T, _Forward(chunks(), H, W), vectors.get("perspectives"),
                 vectors.get("modulations"))


def _trial_movies(fs: AbstractFileSystem, root: str, where: str, size: tuple[int, int] | None) -> Iterator[Movie]:
    base = posixpath.join(root, "stimuli")
    found = fs.find(base) if fs.isdir(base) else []
    trials = sorted(p for p in found if p.endswith(".npy") and not re.search(r"(^|/)[._]", p[len(base) :].strip("/")))
    if not trials:
        raise ValueError(f"{where}: expected a .npy, .npz or video file, or a folder with stimuli/<trial>.npy")
    for path in trials:
        trial = path[len(base) :].strip("/")[: -len(".npy")]
        at = storage.join(where, "stimuli", trial + ".npy")
        movie = _npy_movie(fs, path, at, trial, size)
        for name in _VECTORS:
            other = posixpath.join(root, name, trial + ".npy")
            if fs.isfile(other):
                setattr(movie, name, _vector(fs.cat_file(other), name, movie.num_frames,
                                             storage.join(where, name, trial + ".npy")))
        yield movie


def _video_movie(fs: AbstractFileSystem, path: str, where: str, name: str, size: tuple[int, int],
                 fps: float) -> Movie:
    try:
        import av
    except ImportError:
        raise ImportError(f"{where}: reading video needs PyAV: pip install av") from None
    source = path if storage.is_local(fs) else fs.open(path, "rb")
    try:
        container = av.open(source)
        if not container.streams.video:
            container.close()
            raise ValueError("no video stream")
    except (av.FFmpegError, OSError, ValueError) as e:
        if not isinstance(source, str):
            source.close()
        raise ValueError(f"{where}: cannot decode video ({e})") from None
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    height, width = size
    rate = Fraction(str(fps))
    time_base = stream.time_base or Fraction(1, 1)
    source_rate = Fraction(stream.average_rate) if stream.average_rate else None
    per_chunk = max(1, _CHUNK_BYTES // (height * width))

    def image(frame: Any) -> np.ndarray:
        return frame.reformat(width=width, height=height, format="gray", interpolation="AREA").to_ndarray()

    def held(frame: Any, count: int) -> Iterator[np.ndarray]:
        img = image(frame)
        for n in range(0, count, per_chunk):
            yield np.repeat(img[None], min(per_chunk, count - n), axis=0)

    def shown_until(t: Fraction) -> int:
        """Number of output frames whose time is before ``t`` (less the slack)."""
        return max(0, math.ceil((t - _TIME_SLACK) * rate))

    def chunks() -> Iterator[np.ndarray]:
        last = t0 = t = None  # the frame being held, the first frame's time, the held frame's time
        emitted, step = 0, (1 / source_rate if source_rate else 1 / rate)
        try:
            for frame in container.decode(stream):
                t = (Fraction(frame.pts) * time_base if frame.pts is not None
                     else (t + step if t is not None else Fraction(0)))
                t0 = t if t0 is None else t0
                if last is not None:
                    upto = shown_until(t - t0)
                    if upto > emitted:
                        yield from held(last, upto - emitted)
                        emitted = upto
                last = frame
            if last is None:
                raise ValueError(f"{where}: cannot decode video (no frames)")
            duration = Fraction(last.duration) * time_base if last.duration else step
            upto = shown_until(t + duration - t0)
            if upto > emitted:
                yield from held(last, upto - emitted)
        except (av.FFmpegError, OSError) as e:
            raise ValueError(f"{where}: cannot decode video ({e})") from None
        finally:
            container.close()
            if not isinstance(source, str):
                source.close()

    return Movie(name, where, height, width, None, _Forward(chunks(), height, width))


def _stem(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[n, H, W]`` -> uint8 ``[n, *size]`` (bilinear with antialiasing, rounded)."""
    import torch
    import torch.nn.functional as F

    if not len(frames):
        return np.empty((0, *size), np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(frames)).float()[:, None]
    out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _fit(movie: Movie, size: tuple[int, int] | None, resize: bool) -> Movie:
    """``movie`` checked against the release's frame ``size`` (None: any size), or resized to it."""
    if size is None or (movie.height, movie.width) == tuple(size):
        return movie
    if not resize:
        raise ValueError(f"{movie.url}: frames are {movie.height}x{movie.width}, the release's stimulus frames are "
                         f"{size[0]}x{size[1]} (--size): pass --resize to resize them")
    return Movie(movie.name, movie.url, size[0], size[1], movie.num_frames,
                 lambda start, stop: _resize(movie.read(start, stop), tuple(size)), movie.perspectives,
                 movie.modulations)


def open_movies(
    source: str,
    *,
    key: str | None = None,
    size: tuple[int, int] | None = None,
    resize: bool = False,
    fps: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Movie]:
    """The movies of ``source`` (see the module docstring), one at a time.

    ``key``: the frames array of a ``.npz``; ``size`` ``(height, width)``: the frame size of the release the clips
    are for: arrays of another size are refused, or resized with ``resize=True`` (None: arrays of any size);
    video frames are always resized to it (default :data:`VIDEO_SIZE`); ``fps``: video only (default 30 Hz).
    ``FileNotFoundError`` when ``source`` does not exist; ``ValueError`` naming the file for bad input (also an
    array that looks like ``[H, W, T]``, and perspectives / modulations that are not finite).
    """
    where = storage.redact_url(source)
    fs, path = storage.filesystem(source, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"stimulus source not found: {where}")
    video = not fs.isdir(path) and not path.endswith((".npy", ".npz"))
    if not video and fps is not None:
        raise ValueError(f"{where}: --fps applies to video sources only")
    if key is not None and not path.endswith(".npz"):
        raise ValueError(f"{where}: --key applies to .npz sources only")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"--size must be HEIGHTxWIDTH > 0, got {size}")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    if fs.isdir(path):
        movies = _trial_movies(fs, path, where, size)
    elif path.endswith(".npy"):
        movies = iter([_npy_movie(fs, path, where, _stem(path), size)])
    elif path.endswith(".npz"):
        movies = iter([_npz_movie(fs, path, where, _stem(path), key, size)])
    else:
        movies = iter([_video_movie(fs, path, where, _stem(path), tuple(size or VIDEO_SIZE), fps or 30.0)])
    for movie in movies:
        yield _fit(movie, size, resize)


# ---------------------------------------------------------------------------------------- boundaries
@dataclass(frozen=True)
class Boundaries:
    """Clip ranges of one movie: ``spans`` ``(start, stop)`` frames, ``stop`` None = to the end of the movie;
    ``source`` names where they came from and ``lines`` their line numbers there (for messages).

    Checked at construction: ``0 <= start < stop``, sorted and non-overlapping (gaps allowed).
    """

    spans: tuple[tuple[int, int | None], ...]
    source: str = "boundaries"
    lines: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", tuple((int(a), None if b is None else int(b)) for a, b in self.spans))
        if not self.spans:
            raise ValueError(f"{self.source}: no clip boundaries")
        previous = None
        for i, (start, stop) in enumerate(self.spans):
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"{self.at(i)}: bad clip [{start}, {stop}): need 0 <= start < stop")
            if previous is not None and (previous[1] is None or start < previous[1]):
                raise ValueError(f"{self.at(i)}: clip [{start}, {stop}) overlaps or precedes the previous clip "
                                 f"[{previous[0]}, {previous[1]}); boundaries must be sorted and must not overlap")
            previous = (start, stop)

    def at(self, i: int) -> str:
        """Where span ``i`` came from, e.g. ``cuts.csv line 4``."""
        return f"{self.source} line {self.lines[i]}" if self.lines else f"{self.source} entry {i}"

    def check(self, num_frames: int, movie: str) -> None:
        """Raise ValueError unless every span lies within a movie of ``num_frames`` frames."""
        for i, (start, stop) in enumerate(self.spans):
            if start >= num_frames or (stop or 0) > num_frames:
                raise ValueError(f"{self.at(i)}: clip [{start}, {stop}) of {movie} is outside the movie "
                                 f"({num_frames} frames)")


def read_boundaries(url: str, storage_options: Mapping[str, Any] | None = None) -> Boundaries:
    """Read a boundaries file: one clip per line, ``start`` or ``start,stop`` (commas or blanks), frames of the
    movie; blank lines and ``#`` comments are skipped and so is a first line with a header (``start,stop``).
    With starts only, each clip runs to the next start and the last one to the end of the movie."""
    where = storage.redact_url(url)
    fs, path = storage.filesystem(url, storage_options)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"boundaries file not found: {where}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not a text file") from None
    rows, lines = [], []
    first = True
    for number, line in enumerate(text.splitlines(), 1):
        fields = [x for x in re.split(r"[,\s]+", line.split("#", 1)[0].strip()) if x]
        if not fields:
            continue
        header, first = first and any(re.search(r"[A-Za-z]", x) for x in fields), False
        if header:
            continue
        if len(fields) not in (1, 2) or not all(re.fullmatch(r"[+-]?\d+", x) for x in fields):
            raise ValueError(f"{where} line {number}: expected 'start' or 'start,stop' (integer frames), got {line!r}")
        if rows and len(fields) != len(rows[0]):
            raise ValueError(f"{where} line {number}: every line must give {len(rows[0])} number(s), got {line!r}")
        rows.append([int(x) for x in fields])
        lines.append(number)
    if rows and len(rows[0]) == 1:
        starts = [r[0] for r in rows]
        spans = list(zip(starts, [*starts[1:], None]))
        for i in range(1, len(starts)):  # sorted starts make the spans above well formed
            if starts[i] <= starts[i - 1]:
                raise ValueError(f"{where} line {lines[i]}: start {starts[i]} is not after the previous start "
                                 f"{starts[i - 1]}; boundaries must be sorted")
    else:
        spans = [(r[0], r[1]) for r in rows]
    return Boundaries(tuple(spans), where, tuple(lines))


# ------------------------------------------------------------------------------------------- cutting
def cut(
    movie: Movie,
    *,
    clip_frames: int | None = None,
    boundaries: Boundaries | None = None,
    context_frames: int = 0,
    strict_context: bool = False,
) -> Iterator[Clip]:
    """Cut ``movie`` into clips (see the module docstring), each with up to ``context_frames`` frames of the
    movie before it."""
    if clip_frames is not None and boundaries is not None:
        raise ValueError("give --clip-frames or --boundaries, not both")
    if clip_frames is not None and clip_frames < 1:
        raise ValueError(f"--clip-frames must be >= 1, got {clip_frames}")
    if context_frames < 0:
        raise ValueError(f"--context-frames must be >= 0, got {context_frames}")
    T = movie.num_frames
    if clip_frames is not None and T is not None and clip_frames > T:
        raise ValueError(f"{movie.url}: --clip-frames {clip_frames} is longer than the movie ({T} frames)")
    if boundaries is not None:
        if T is not None:
            boundaries.check(T, movie.url)
        spans: Sequence[tuple[int, int | None]] | Iterator[tuple[int, int | None]] = boundaries.spans
    elif clip_frames is not None:
        starts = range(0, T, clip_frames) if T is not None else _count(clip_frames)
        spans = ((s, s + clip_frames if T is None else min(s + clip_frames, T)) for s in starts)
    else:
        spans = [(0, None)]
    for i, (start, stop) in enumerate(spans):
        at = (f"{boundaries.at(i)}: clip [{start}, {stop}) of {movie.url}" if boundaries is not None
              else f"{movie.url}: clip [{start}, {stop})")
        context = min(context_frames, start)
        if strict_context and context < context_frames:
            raise ValueError(f"{at} has only {context} of the {context_frames} context frames asked for before "
                             "it (strict context)")
        frames = movie.read(start - context, stop)
        end = start - context + len(frames)
        if end <= start and clip_frames is not None and start > 0:
            return  # a movie of unknown length ended
        if clip_frames is not None and start == 0 and end < clip_frames:  # a video: its length is known only now
            raise ValueError(f"{movie.url}: --clip-frames {clip_frames} is longer than the movie ({end} frames)")
        if end <= start or (boundaries is not None and stop is not None and end < stop):
            raise ValueError(f"{at} is outside the movie ({end} frames)")
        rows = slice(start - context, end)
        yield Clip(
            clip_id=f"{movie.name}-{start:06d}-{end:06d}",
            frames=frames,
            perspectives=None if movie.perspectives is None else movie.perspectives[rows],
            modulations=None if movie.modulations is None else movie.modulations[rows],
            context_frames=context,
        )


def _count(step: int) -> Iterator[int]:
    start = 0
    while True:
        yield start
        start += step


def import_clips(
    source: str,
    *,
    clip_frames: int | None = None,
    boundaries: Boundaries | str | None = None,
    context_frames: int = 0,
    strict_context: bool = False,
    key: str | None = None,
    size: tuple[int, int] | None = None,
    resize: bool = False,
    fps: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Clip]:
    """Every clip of every movie of ``source``, in order (see :func:`open_movies` and :func:`cut`).

    ``boundaries``: a :class:`Boundaries` or the URL of a boundaries file (:func:`read_boundaries`); it cuts a
    single movie, so a trial folder with it is an error. Memory holds one clip (with its context) at a time.
    """
    if isinstance(boundaries, str):
        boundaries = read_boundaries(boundaries, storage_options)
    if boundaries is not None:
        fs, path = storage.filesystem(source, storage_options)
        if fs.isdir(path):
            raise ValueError(f"{storage.redact_url(source)}: boundaries cut a single movie, not a folder of "
                             "trials (cut trials with --clip-frames, or import one trial file at a time)")
    for movie in open_movies(source, key=key, size=size, resize=resize, fps=fps, storage_options=storage_options):
        yield from cut(movie, clip_frames=clip_frames, boundaries=boundaries, context_frames=context_frames,
                       strict_context=strict_context)
