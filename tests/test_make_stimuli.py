"""fnn_ray.importers and jobs.make_stimuli: .npy (local and ranged S3 reads), .npz, trial folders, video,
boundaries, context frames, bad input; and how close clips with context come to one continuous run."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch

from fnn_model.config import NetworkConfig
from fnn_model.engine import Engine
from fnn_model.synthetic import make_core, make_head
from fnn_ray import importers, storage
from fnn_ray.importers import Boundaries, import_clips, read_boundaries
from fnn_ray.stimuli import list_shards, read_shard
from jobs.make_stimuli import main, synthetic_movie


def spans(T, clip_frames, context):
    """Expected (start, stop, context) of every clip: a plain loop over the definition."""
    out, start = [], 0
    while start < T:
        stop = min(start + clip_frames, T)
        out.append((start, stop, min(context, start)))
        start = stop
    return out


def check_clips(clips, movie, name, expected, perspectives=None):
    assert [c.clip_id for c in clips] == [f"{name}-{a:06d}-{b:06d}" for a, b, _ in expected]
    for clip, (a, b, w) in zip(clips, expected):
        assert clip.context_frames == w
        assert clip.frames.dtype == np.uint8 and np.array_equal(clip.frames, movie[a - w : b])
        if perspectives is not None:
            assert np.array_equal(clip.perspectives, perspectives[a - w : b].astype(np.float32))


def write_video(path, values, rate, size=(32, 48), codec="ffv1", pix_fmt="gray"):
    """A video of constant gray frames ``values`` at ``rate`` frames/s."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = *size, pix_fmt
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full(size, v, np.uint8), format="gray")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def parquet_files(url):
    fs, root = storage.filesystem(url)
    return [p for p in fs.find(root) if p.endswith(".parquet")] if fs.exists(root) else []


@pytest.fixture
def movie():
    return np.random.default_rng(0).integers(0, 256, (50, 6, 8), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ .npy
@pytest.mark.parametrize("trailing_axis", [False, True])
def test_npy_local_clips_with_context(movie, tmp_path, trailing_axis):
    path = tmp_path / "movie.npy"
    np.save(path, movie[..., None] if trailing_axis else movie)
    clips = list(import_clips(str(path), clip_frames=12, context_frames=5))
    check_clips(clips, movie, "movie", spans(50, 12, 5))
    assert [c.num_frames for c in clips] == [12, 17, 17, 17, 7]
    whole = list(import_clips(str(path)))
    check_clips(whole, movie, "movie", [(0, 50, 0)])


def test_npy_on_s3_reads_only_the_clips(s3, s3_url, s3_gets):
    movie = np.random.default_rng(1).integers(0, 256, (200, 48, 64), dtype=np.uint8)
    fs, root = storage.filesystem(s3_url)
    buffer = io.BytesIO()
    np.save(buffer, movie)
    fs.pipe_file(f"{root}/movie.npy", buffer.getvalue())
    fetched = s3_gets
    fetched.clear()  # count from here on
    clips = list(import_clips(f"{s3_url}/movie.npy", clip_frames=20, context_frames=10))
    check_clips(clips, movie, "movie", spans(200, 20, 10))
    # one 64 KiB header read, then exactly the frames of each clip (context included), one request per clip
    assert fetched == [64 * 1024] + [c.frames.nbytes for c in clips]
    assert max(fetched) < buffer.getbuffer().nbytes / 5


# ------------------------------------------------------------------------------------------------ .npz
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("key", ["stimulus", "stimuli", "frames"])
def test_npz(movie, tmp_path, save, key):
    rng = np.random.default_rng(2)
    eye, behaviour = rng.standard_normal((50, 2)), rng.standard_normal((50, 2)).astype(np.float32)
    save(tmp_path / "m.npz", **{key: movie}, perspectives=eye, modulations=behaviour)
    clips = list(import_clips(str(tmp_path / "m.npz"), clip_frames=20, context_frames=7))
    check_clips(clips, movie, "m", spans(50, 20, 7), perspectives=eye)
    for clip, (a, b, w) in zip(clips, spans(50, 20, 7)):
        assert clip.modulations.dtype == np.float32 and np.array_equal(clip.modulations, behaviour[a - w : b])


def test_npz_key_choice(movie, tmp_path):
    np.savez(tmp_path / "two.npz", left=movie, right=movie[::-1])
    with pytest.raises(ValueError, match=r"two\.npz: no frames: .*'left', 'right'.*--key"):
        list(import_clips(str(tmp_path / "two.npz")))
    check_clips(list(import_clips(str(tmp_path / "two.npz"), key="right")), movie[::-1], "two", [(0, 50, 0)])
    with pytest.raises(ValueError, match=r"two\.npz: no array 'middle'"):
        list(import_clips(str(tmp_path / "two.npz"), key="middle"))


# ---------------------------------------------------------------------------------------- trial folder
def test_trial_folder(tmp_path):
    rng = np.random.default_rng(3)
    trials = {"a/0": 9, "a/1": 7, "b/0": 12}
    frames, eyes = {}, {}
    for trial, T in trials.items():
        frames[trial] = rng.integers(0, 256, (T, 5, 7), dtype=np.uint8)
        for folder, array in [("stimuli", frames[trial][..., None])] + (
                [("perspectives", rng.standard_normal((T, 2)).astype(np.float32))] if trial != "a/1" else []):
            (tmp_path / folder / trial).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / folder / f"{trial}.npy", array)
        if trial != "a/1":
            eyes[trial] = np.load(tmp_path / "perspectives" / f"{trial}.npy")
    (tmp_path / "units").mkdir()  # the original layout's responses: ignored
    np.save(tmp_path / "units" / "x.npy", np.zeros(3))

    clips = list(import_clips(str(tmp_path)))
    assert [c.clip_id for c in clips] == ["a/0-000000-000009", "a/1-000000-000007", "b/0-000000-000012"]
    for clip, trial in zip(clips, trials):
        assert np.array_equal(clip.frames, frames[trial]) and clip.modulations is None
        assert (clip.perspectives is None) == (trial == "a/1")
        if trial in eyes:
            assert np.array_equal(clip.perspectives, eyes[trial])

    cut = list(import_clips(str(tmp_path), clip_frames=5, context_frames=2))
    expected = [(trial, s) for trial, T in trials.items() for s in spans(T, 5, 2)]
    assert [c.clip_id for c in cut] == [f"{t}-{a:06d}-{b:06d}" for t, (a, b, _) in expected]
    for clip, (trial, (a, b, w)) in zip(cut, expected):  # context never crosses into another trial
        assert clip.context_frames == w and np.array_equal(clip.frames, frames[trial][a - w : b])


# ----------------------------------------------------------------------------------------------- video
def expected_hold(source_times, end, fps=30):
    """Index of the source frame shown at each output time k / fps < end: the last one with time <= k / fps."""
    out, k = [], 0
    while k / fps < end - 1e-9:
        out.append(max(i for i, t in enumerate(source_times) if t <= k / fps + 1e-9))
        k += 1
    return out


def test_video_15fps_sample_and_hold(tmp_path):
    values = [10, 40, 80, 128, 200, 250, 0, 255, 17, 99]
    path = write_video(tmp_path / "v.mkv", values, rate=15)  # Matroska: times rounded to the millisecond
    (clip,) = import_clips(path, size=(16, 24))
    assert clip.clip_id == "v-000000-000020" and clip.frames.shape == (20, 16, 24)
    assert clip.frames[:, 0, 0].tolist() == [v for v in values for _ in range(2)]
    assert all((f == f[0, 0]).all() for f in clip.frames)
    (default,) = import_clips(path)
    assert default.frames.shape == (20, 144, 256) and np.array_equal(default.frames[:, 0, 0], clip.frames[:, 0, 0])


@pytest.mark.parametrize("codec, suffix, tolerance", [("ffv1", "mkv", 0), ("libx264", "mp4", 3)])
def test_video_24fps_to_30hz(tmp_path, codec, suffix, tolerance):
    if codec not in pytest.importorskip("av").codecs_available:
        pytest.skip(f"PyAV built without {codec}")
    values = list(range(20, 20 + 12 * 15, 15))  # 12 frames, 0.5 s
    path = write_video(tmp_path / f"v.{suffix}", values, rate=24, codec=codec,
                       pix_fmt="gray" if codec == "ffv1" else "yuv420p")
    index = expected_hold([i / 24 for i in range(12)], end=0.5)
    assert len(index) == 15
    (clip,) = import_clips(path, size=(8, 12))
    assert clip.frames.shape == (15, 8, 12)
    assert np.abs(clip.frames[:, 4, 6].astype(int) - [values[i] for i in index]).max() <= tolerance
    # cut into clips with context: the forward-only reader gives the same frames
    clips = list(import_clips(path, size=(8, 12), clip_frames=4, context_frames=3))
    check_clips(clips, clip.frames, "v", spans(15, 4, 3))


def test_video_shorter_than_clip_frames_is_refused(tmp_path):
    path = write_video(tmp_path / "v.mkv", list(range(0, 200, 20)), rate=15)  # 20 frames at 30 Hz
    with pytest.raises(ValueError, match=r"v\.mkv: --clip-frames 30 is longer than the movie \(20 frames\)"):
        list(import_clips(path, size=(8, 8), clip_frames=30))


# ------------------------------------------------------------------------------------------ frame size
def test_resize_to_the_release_frame_size(tmp_path):
    """--resize: each frame resized to --size; a flat frame stays flat, a left-to-right ramp stays a ramp."""
    flat = np.arange(10, dtype=np.uint8)[:, None, None].repeat(36, 1).repeat(64, 2) * 20  # [10, 36, 64]
    ramp = np.tile(np.linspace(0, 250, 64).astype(np.uint8), (10, 36, 1))
    np.save(tmp_path / "flat.npy", flat)
    np.save(tmp_path / "ramp.npy", ramp)
    with pytest.raises(ValueError, match=r"flat\.npy: frames are 36x64, .* 18x32 \(--size\): pass --resize"):
        list(import_clips(str(tmp_path / "flat.npy"), size=(18, 32)))
    (clip,) = import_clips(str(tmp_path / "flat.npy"), size=(18, 32), resize=True)
    assert clip.frames.shape == (10, 18, 32) and clip.frames.dtype == np.uint8
    assert np.array_equal(clip.frames, flat[:, :18, :32])
    clips = list(import_clips(str(tmp_path / "ramp.npy"), size=(18, 32), resize=True, clip_frames=4, context_frames=2))
    assert [c.frames.shape for c in clips] == [(4, 18, 32), (6, 18, 32), (4, 18, 32)]
    row = clips[0].frames[0, 9].astype(float)
    # a linear ramp stays linear: output pixel j sits at input position 2j + 0.5 (edge pixels clamp)
    expected = np.linspace(0, 250, 64)[0] + (250 / 63) * (2 * np.arange(32) + 0.5)
    assert np.abs(row - expected)[1:-1].max() <= 1.0 and (np.diff(row) > 0).all()
    assert all((c.frames == c.frames[:1, :1]).all() for c in clips)  # every row of every frame alike


# ------------------------------------------------------------------------------------------ boundaries
def test_boundaries(movie, tmp_path):
    np.save(tmp_path / "m.npy", movie)
    (tmp_path / "starts.txt").write_text("start\n# cut points\n0\n\n10\n25  # a comment\n")
    clips = list(import_clips(str(tmp_path / "m.npy"), boundaries=str(tmp_path / "starts.txt"), context_frames=4))
    check_clips(clips, movie, "m", [(0, 10, 0), (10, 25, 4), (25, 50, 4)])

    (tmp_path / "pairs.csv").write_text("start,stop\n2,8\n8, 20\n30 45\n")
    b = read_boundaries(str(tmp_path / "pairs.csv"))
    assert b.spans == ((2, 8), (8, 20), (30, 45)) and b.lines == (2, 3, 4)
    clips = list(import_clips(str(tmp_path / "m.npy"), boundaries=b, context_frames=5))
    check_clips(clips, movie, "m", [(2, 8, 2), (8, 20, 5), (30, 45, 5)])
    strict = r"pairs\.csv line 2: clip \[2, 8\) of .*m\.npy has only 2 of the 5 context frames .*\(strict context\)"
    with pytest.raises(ValueError, match=strict):
        list(import_clips(str(tmp_path / "m.npy"), boundaries=b, context_frames=5, strict_context=True))
    check_clips(list(importers.cut(next(importers.open_movies(str(tmp_path / "m.npy"))),
                                   boundaries=Boundaries(((40, None),)))), movie, "m", [(40, 50, 0)])


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_round_trip(movie, tmp_url, tmp_path, capsys):
    np.save(tmp_path / "m.npy", movie)
    out = tmp_url("memory")
    assert main(["--from", str(tmp_path / "m.npy"), "--output", out, "--clip-frames", "15", "--context-frames",
                 "5", "--clips-per-file", "2", "--size", "6x8"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 4 clip(s), 65 frames (15 of them context) in 2 file(s)" in summary
    shards = list_shards(out, 1)
    assert [s.frames for s in shards] == [15, 20, 20, 10]
    check_clips([c for s in shards for c in read_shard(s)], movie, "m", spans(50, 15, 5))


def test_cli_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert "wrote 5 clip(s), 420 frames (120 of them context)" in capsys.readouterr().out
    assert [c.context_frames for s in list_shards("fnn-ray-output/movie-stimuli", 8) for c in read_shard(s)] == \
        [0, 30, 30, 30, 30]


def bad_inputs(tmp_path, movie):
    """(name, argv, message pattern) of bad input, each written under tmp_path."""
    np.save(tmp_path / "float.npy", movie.astype(np.float32))
    np.save(tmp_path / "flat.npy", movie[0])
    np.save(tmp_path / "rgb.npy", np.repeat(movie[..., None], 3, axis=3))
    np.save(tmp_path / "m.npy", movie)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 this is not a video" * 100)
    (tmp_path / "outside.txt").write_text("0,20\n40,60\n")
    (tmp_path / "overlap.txt").write_text("0,20\n10,30\n")
    (tmp_path / "unsorted.txt").write_text("0\n30\n20\n")
    (tmp_path / "words.txt").write_text("0\nten\n")
    (tmp_path / "trials" / "stimuli").mkdir(parents=True)
    (tmp_path / "trials" / "perspectives").mkdir()
    np.save(tmp_path / "trials" / "stimuli" / "t.npy", movie)
    np.save(tmp_path / "trials" / "perspectives" / "t.npy", np.zeros((49, 2), np.float32))
    np.save(tmp_path / "time-last.npy", np.zeros((144, 256, 20), np.uint8))
    np.save(tmp_path / "time-last-small.npy", np.moveaxis(movie, 0, -1))
    (tmp_path / "nan" / "stimuli").mkdir(parents=True)
    (tmp_path / "nan" / "perspectives").mkdir()
    np.save(tmp_path / "nan" / "stimuli" / "t.npy", movie)
    eye = np.zeros((50, 2), np.float32)
    eye[7, 0] = np.nan
    np.save(tmp_path / "nan" / "perspectives" / "t.npy", eye)
    behaviour = np.zeros((50, 2))
    behaviour[3, 1] = np.inf
    np.savez(tmp_path / "inf.npz", stimulus=movie, modulations=behaviour)
    m = ["--from", str(tmp_path / "m.npy"), "--size", "6x8"]
    return [
        ("float", ["--from", str(tmp_path / "float.npy")], r"float\.npy: frames must be uint8 \[T, H, W\] .*float32"),
        ("2-D", ["--from", str(tmp_path / "flat.npy")], r"flat\.npy: frames must be uint8 .*\[6, 8\]"),
        ("rgb", ["--from", str(tmp_path / "rgb.npy")], r"rgb\.npy: frames must be .*\[50, 6, 8, 3\]"),
        ("video", ["--from", str(tmp_path / "junk.mp4")], r"junk\.mp4: cannot decode video"),
        ("outside", [*m, "--boundaries", str(tmp_path / "outside.txt")],
         r"outside\.txt line 2: clip \[40, 60\) of .*m\.npy is outside the movie \(50 frames\)"),
        ("overlap", [*m, "--boundaries", str(tmp_path / "overlap.txt")], r"overlap\.txt line 2: .*overlaps"),
        ("unsorted", [*m, "--boundaries", str(tmp_path / "unsorted.txt")],
         r"unsorted\.txt line 3: start 20 is not after the previous start 30"),
        ("words", [*m, "--boundaries", str(tmp_path / "words.txt")], r"words\.txt line 2: expected 'start'"),
        ("strict", [*m, "--clip-frames", "10", "--context-frames", "5", "--strict-context"],
         r"m\.npy: clip \[0, 10\) has only 0 of the 5 context frames"),
        ("missing", ["--from", str(tmp_path / "nope.npy")], r"not found: .*nope\.npy"),
        ("perspectives", ["--from", str(tmp_path / "trials")],
         r"perspectives/t\.npy: perspectives must be .*\[50, 2\] .*\[49, 2\]"),
        ("fps", [*m, "--fps", "30"], r"--fps applies to video sources only"),
        ("time-last", ["--from", str(tmp_path / "time-last.npy")],
         r"time-last\.npy: frames \[144, 256, 20\] look like \[H, W, T\] \(time last\)"),
        ("time-last-resize", ["--from", str(tmp_path / "time-last-small.npy"), "--size", "6x8", "--resize"],
         r"time-last-small\.npy: frames \[6, 8, 50\] look like \[H, W, T\]"),
        ("frame-size", ["--from", str(tmp_path / "m.npy")],
         r"m\.npy: frames are 6x8, the release's stimulus frames are 144x256 \(--size\): pass --resize"),
        ("clip-longer", [*m, "--clip-frames", "51"], r"m\.npy: --clip-frames 51 is longer than the movie \(50 frames\)"),
        ("nan-perspectives", ["--from", str(tmp_path / "nan"), "--size", "6x8"],
         r"nan/perspectives/t\.npy: perspectives of frame 7 is \[nan, 0\.0\]: not finite"),
        ("inf-modulations", ["--from", str(tmp_path / "inf.npz"), "--size", "6x8"],
         r"inf\.npz\[modulations\]: modulations of frame 3 is \[0\.0, inf\]: not finite"),
        ("zero-clip-frames", [*m, "--clip-frames", "0"], r"argument --clip-frames: must be >= 1, got 0"),
        ("negative-context", [*m, "--context-frames", "-1"], r"argument --context-frames: must be >= 0, got -1"),
        ("zero-clips-per-file", [*m, "--clips-per-file", "0"], r"argument --clips-per-file: must be >= 1, got 0"),
    ]


def status(argv):
    """``main(argv)``'s exit status, also when the argument parser exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_bad_input_one_line_exit_2_nothing_written(movie, tmp_path, capsys):
    for name, argv, pattern in bad_inputs(tmp_path, movie):
        out = str(tmp_path / f"out-{name}")
        assert status([*argv, "--output", out]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert "=True" not in err and "_frames" not in err, (name, err)  # flags, never Python keywords
        assert re.search(pattern, err), (name, err)
        assert not os.path.exists(out), name


def test_error_late_in_a_video_removes_what_was_written(tmp_path, tmp_url, capsys):
    """A video's length is known only at its end: clips already committed are removed again."""
    path = write_video(tmp_path / "v.mkv", list(range(0, 200, 20)), rate=15)  # 20 frames at 30 Hz
    (tmp_path / "cuts.txt").write_text("0,4\n4,8\n16,24\n")
    out = tmp_url("s3")
    assert main(["--from", path, "--output", out, "--boundaries", str(tmp_path / "cuts.txt"), "--clips-per-file",
                 "1", "--size", "8x8"]) == 2
    assert "cuts.txt line 3: clip [16, 24) of " in capsys.readouterr().err
    assert parquet_files(out) == []
    # the same cuts within the movie work; --overwrite replaces them
    (tmp_path / "cuts.txt").write_text("0,4\n4,8\n16,20\n")
    args = ["--from", path, "--output", out, "--boundaries", str(tmp_path / "cuts.txt"), "--size", "8x8"]
    assert main(args) == 0 and len(parquet_files(out)) == 1
    assert main(args) == 2 and "pass --overwrite to replace them" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--clips-per-file", "1"]) == 0 and len(parquet_files(out)) == 3


# ------------------------------------------------------------------------------------- context frames
def context_errors(engine, scans, movie_path, clip_frames, contexts):
    """Clips with context against one continuous run, for each W in ``contexts``.

    The .npy movie at ``movie_path`` is cut into ``clip_frames``-frame clips with W context frames
    (:func:`fnn_ray.importers.import_clips`); every clip is predicted from a reset state (all in one batch), its
    first W outputs dropped, and the rest compared with one continuous prediction of the whole movie: the
    relative error ``|clip - continuous| / continuous`` of every frame, unit and scan. Statistics are taken over
    the clips whose context is cut short by W (those starting more than W frames into the movie); the others
    see the whole movie before them and must match the continuous run (``exact``: their largest error).
    Returns rows ``(W, max, 99th percentile, median, exact, frames run per movie frame)``.
    """
    movie = np.load(movie_path)
    continuous = engine.predict(movie[None], scans)
    rows = []
    for W in contexts:
        clips = list(import_clips(movie_path, clip_frames=clip_frames, context_frames=W))
        batch = np.zeros((len(clips), max(c.num_frames for c in clips), *movie.shape[1:]), np.uint8)
        for n, clip in enumerate(clips):
            batch[n, : clip.num_frames] = clip.frames
        out = engine.predict(batch, scans, lengths=[c.num_frames for c in clips])
        cut, exact = [np.zeros(0)], [np.zeros(0)]
        for n, clip in enumerate(clips):
            start = int(clip.clip_id.split("-")[-2])
            for scan in scans:
                reference = continuous[scan][0, start : start + clip.num_frames - clip.context_frames]
                error = np.abs(out[scan][n, clip.context_frames : clip.num_frames] - reference) / reference
                (cut if start > W else exact).append(error.ravel())
        cut, exact = np.concatenate(cut), np.concatenate(exact)
        rows.append((W, float(cut.max()), float(np.percentile(cut, 99)), float(np.median(cut)), float(exact.max()),
                     sum(c.num_frames for c in clips) / len(movie)))
    return rows


def test_context_frames_approach_the_continuous_run(tmp_path):
    """On a tiny random network: the error falls with W; a clip whose context is the whole past is exact."""
    config = NetworkConfig.tiny()
    engine = Engine(make_core(config, seed=1))
    engine.add_head((1, 1), make_head(config, 16, seed=1))
    np.save(tmp_path / "movie.npy", synthetic_movie(48, 36, 64, seed=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = context_errors(engine, [(1, 1)], str(tmp_path / "movie.npy"), 12, [0, 4, 12, 24])
    finally:
        torch.set_num_threads(threads)
    maxima = [r[1] for r in rows]
    assert maxima[0] > 1e-2  # cutting without context visibly changes the answer
    assert maxima[0] > maxima[1] > maxima[2] > maxima[3]
    assert all(r[4] < 1e-5 for r in rows)  # clips 0..W/12 see the whole movie before them
    assert [r[5] for r in rows] == pytest.approx([1, (48 + 12) / 48, (48 + 12 + 24) / 48, (48 + 12 + 24 + 24) / 48])
