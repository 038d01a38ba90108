"""fnn_ray.stimuli: the stimulus Parquet contract, sharding and validation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fnn_ray import stimuli, storage
from fnn_ray.stimuli import Clip, Shard


def make_clips(n=7, seed=0, hw=(4, 6)):
    """Clips of varying length T = 3 + i; odd clips have perspectives, every third one modulations."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        T = 3 + i
        clips.append(
            Clip(
                clip_id=f"clip-{i:03d}",
                frames=rng.integers(0, 256, (T, *hw), dtype=np.uint8),
                perspectives=rng.standard_normal((T, 2)).astype(np.float32) if i % 2 else None,
                modulations=rng.standard_normal((T, 2)).astype(np.float32) if i % 3 == 0 else None,
            )
        )
    return clips


def raw_table(n=3, T=2, H=3, W=4, **override):
    """A valid stimulus table built directly with pyarrow; ``override`` replaces/drops (None) columns."""
    rng = np.random.default_rng(1)
    cols = {
        "clip_id": pa.array([f"r{i}" for i in range(n)], pa.string()),
        "frames": pa.array([rng.integers(0, 256, T * H * W, dtype=np.uint8).tobytes() for _ in range(n)], pa.binary()),
        "num_frames": pa.array([T] * n, pa.int32()),
        "height": pa.array([H] * n, pa.int32()),
        "width": pa.array([W] * n, pa.int32()),
    }
    for k, v in override.items():
        if v is None:
            cols.pop(k)
        else:
            cols[k] = v
    return pa.table(cols)


def put_table(url, name, table, **kw):
    fs, root = storage.filesystem(url)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    storage.commit_bytes(fs, f"{root}/{name}", sink.getvalue())
    return storage.join(url, name)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_round_trip(kind, tmp_url):
    url = tmp_url(kind)
    clips = make_clips(7)
    files = stimuli.write_clips(url, clips, clips_per_file=3)
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    shards = stimuli.list_shards(url, clips_per_shard=2)
    # shards never span files: 3 + 3 + 1 clips -> 2 + 2 + 1 shards
    assert [(s.file, s.row_start, s.row_stop) for s in shards] == [
        ("part-00000.parquet", 0, 2),
        ("part-00000.parquet", 2, 3),
        ("part-00001.parquet", 0, 2),
        ("part-00001.parquet", 2, 3),
        ("part-00002.parquet", 0, 1),
    ]
    assert [c for s in shards for c in s.clip_ids] == [c.clip_id for c in clips]
    assert shards[0].frames == 3 + 4 and shards[-1].frames == 9

    got = [c for s in shards for c in stimuli.read_shard(s)]
    assert got == clips
    for c in got:
        assert c.frames.dtype == np.uint8 and c.frames.flags.writeable and c.frames.flags.c_contiguous
        for a in (c.perspectives, c.modulations):
            assert a is None or (a.dtype == np.float32 and a.shape == (c.num_frames, 2))


def test_round_trip_s3_with_explicit_storage_options(s3, s3_url, monkeypatch):
    clips = make_clips(4)
    stimuli.write_clips(s3_url, clips, s3.storage_options)
    # without the env vars only the explicit options can find the server
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    shards = stimuli.list_shards(s3_url, 3, s3.storage_options)
    assert [c for s in shards for c in stimuli.read_shard(s, s3.storage_options)] == clips


def test_single_file_url_and_hidden_files_ignored(tmp_url):
    url = tmp_url("local")
    clips = make_clips(5)
    stimuli.write_clips(url, clips, clips_per_file=2)
    # files under '_' / '.' names are not part of the dataset (like pyarrow.dataset)
    os.makedirs(f"{url}/_staging", exist_ok=True)
    with open(f"{url}/_staging/junk.parquet", "wb") as f:
        f.write(b"junk")
    with open(f"{url}/.hidden.parquet", "wb") as f:
        f.write(b"junk")
    with open(f"{url}/README.txt", "w") as f:
        f.write("not parquet, not .parquet")
    assert len(stimuli.list_shards(url, 10)) == 3

    single = storage.join(url, "part-00001.parquet")
    shards = stimuli.list_shards(single, 10)
    assert len(shards) == 1 and shards[0].clip_ids == ("clip-002", "clip-003")
    assert shards[0].file_url == single
    assert stimuli.read_shard(shards[0]) == clips[2:4]


def test_nested_directories_sorted(tmp_url):
    url = tmp_url("memory")
    clips = make_clips(4)
    stimuli.write_clips(storage.join(url, "b"), clips[:2])
    stimuli.write_clips(storage.join(url, "a"), clips[2:])
    shards = stimuli.list_shards(url, 5)
    assert [s.file for s in shards] == ["a/part-00000.parquet", "b/part-00000.parquet"]
    assert [s.shard_id for s in shards] == ["a.part-00000.000000-000002", "b.part-00000.000000-000002"]
    assert [c for s in shards for c in stimuli.read_shard(s)] == clips[2:] + clips[:2]


def test_shard_is_hashable_picklable_and_stable(tmp_url):
    url = tmp_url("local")
    stimuli.write_clips(url, make_clips(6), clips_per_file=6)
    shards = stimuli.list_shards(url, 4)
    assert len({s.shard_id for s in shards}) == len(shards) == 2
    assert shards[0].shard_id == "part-00000.000000-000004"
    again = stimuli.list_shards(url, 4)
    assert again == shards and {hash(s) for s in again} == {hash(s) for s in shards}
    clone = pickle.loads(pickle.dumps(shards[1]))
    assert clone == shards[1] and clone.shard_id == shards[1].shard_id
    with pytest.raises(Exception):
        shards[0].row_start = 1  # frozen
    # a Shard built by hand (list of ids, no file) is normalised
    s = Shard(url="/x", path="/x/y.parquet", row_start=0, row_stop=2, clip_ids=["a", "b"], frames=5)
    assert s.clip_ids == ("a", "b") and s.file == "y.parquet" and s.shard_id == "y.000000-000002"
    assert hash(s) == hash(Shard("/x", "/x/y.parquet", 0, 2, ("a", "b"), 5))


def test_list_shards_reads_no_frames_and_read_shard_reads_its_row_groups(tmp_url, monkeypatch):
    url = tmp_url("local")
    clips = make_clips(6)
    stimuli.write_clips(url, clips, clips_per_file=6, clips_per_row_group=1)
    read_columns, read_groups = [], []
    real_read, real_rg = pq.ParquetFile.read, pq.ParquetFile.read_row_groups

    def spy_read(self, columns=None, **kw):
        read_columns.append(columns)
        return real_read(self, columns=columns, **kw)

    def spy_rg(self, row_groups, columns=None, **kw):
        read_groups.append(list(row_groups))
        return real_rg(self, row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy_rg)
    shards = stimuli.list_shards(url, 2)
    assert read_columns and all(cols is not None and "frames" not in cols for cols in read_columns)
    assert read_groups == []
    assert stimuli.read_shard(shards[1]) == clips[2:4]
    assert read_groups == [[2, 3]]


def test_read_shard_with_large_row_groups_slices(tmp_url):
    url = tmp_url("local")
    clips = make_clips(7)
    stimuli.write_clips(url, clips, clips_per_row_group=4)
    shards = stimuli.list_shards(url, 3)
    assert [c for s in shards for c in stimuli.read_shard(s)] == clips


def test_write_clips_refuses_to_overwrite_unless_asked(tmp_url):
    url = tmp_url("memory")
    stimuli.write_clips(url, make_clips(5), clips_per_file=2)
    with pytest.raises(FileExistsError, match="pass --overwrite to replace them"):
        stimuli.write_clips(url, make_clips(2))
    stimuli.write_clips(url, make_clips(2, seed=5), overwrite=True)
    shards = stimuli.list_shards(url, 10)
    assert len(shards) == 1 and stimuli.read_shard(shards[0]) == make_clips(2, seed=5)


# ----------------------------------------------------------------------------------- write validation
@pytest.mark.parametrize(
    "bad, match",
    [
        (Clip("x", np.zeros((3, 4, 5), np.float32)), r"'x'.*uint8 \[T, H, W\].*float32"),
        (Clip("x", np.zeros((3, 4), np.uint8)), r"'x'.*uint8 \[T, H, W\]"),
        (Clip("x", np.zeros((0, 4, 5), np.uint8)), r"'x'.*empty axis"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), perspectives=np.zeros((3, 3))), r"'x'.*perspectives.*\[3, 2\]"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), modulations=np.zeros((2, 2))), r"'x'.*modulations.*\[3, 2\]"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), perspectives=np.array([[0, 0], [np.nan, 0], [0, 0]])),
         r"clip 'x': perspectives of frame 1 is \[nan, 0\.0\]: not finite"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), modulations=np.array([[0, 0], [0, 0], [0, -np.inf]])),
         r"clip 'x': modulations of frame 2 is \[0\.0, -inf\]: not finite"),
        (Clip("", np.zeros((3, 4, 5), np.uint8)), r"clip_id must be a non-empty string"),
        (Clip("clip-001", np.zeros((3, 4, 5), np.uint8)), r"duplicate clip_id 'clip-001'"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), context_frames=3), r"'x'.*context_frames.*\[0, 3\), got 3"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), context_frames=-1), r"'x'.*context_frames.*got -1"),
        (Clip("x", np.zeros((3, 4, 5), np.uint8), context_frames=1.0), r"'x'.*context_frames.*got 1\.0"),
    ],
)
def test_write_clips_validates_before_writing(bad, match, tmp_url):
    url = tmp_url("local")
    with pytest.raises(ValueError, match=match):
        stimuli.write_clips(url, make_clips(3) + [bad], clips_per_file=1)
    assert not os.path.exists(url)  # nothing written, not even the first files


# ------------------------------------------------------------------------------------- context frames
def with_context(clips, every=2):
    """The clips, every ``every``-th one with context_frames = T // 2 (the others 0)."""
    return [Clip(c.clip_id, c.frames, c.perspectives, c.modulations, c.num_frames // 2 if i % every == 0 else 0)
            for i, c in enumerate(clips)]


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_context_frames_round_trip(kind, tmp_url):
    url = tmp_url(kind)
    clips = with_context(make_clips(5))
    stimuli.write_clips(url, clips, clips_per_file=2)
    fs, root = storage.filesystem(url)
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):  # the column is in every file
        with fs.open(path, "rb") as f:
            assert pq.read_schema(f).field("context_frames").type == pa.int32()
    shards = stimuli.list_shards(url, 2)
    assert [s.frames for s in shards] == [3 + 4, 5 + 6, 7]  # all frames the model runs, context included
    got = [c for s in shards for c in stimuli.read_shard(s)]
    assert got == clips and [c.context_frames for c in got] == [1, 0, 2, 0, 3]


def test_context_column_only_when_needed(tmp_url):
    url = tmp_url("memory")
    stimuli.write_clips(url, make_clips(2))
    fs, root = storage.filesystem(url)
    with fs.open(f"{root}/part-00000.parquet", "rb") as f:
        assert "context_frames" not in pq.read_schema(f).names
    assert [c.context_frames for c in stimuli.read_shard(stimuli.list_shards(url, 2)[0])] == [0, 0]


@pytest.mark.parametrize("values, row, got", [([0, 2, 1], 1, 2), ([0, 1, -1], 2, -1)])
def test_bad_context_frames(values, row, got, tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(n=3, T=2, context_frames=pa.array(values, pa.int32())))
    with pytest.raises(ValueError, match=rf"p\.parquet row {row} \(clip_id 'r{row}'\): context_frames must be in "
                                         rf"\[0, num_frames\) = \[0, 2\), got {got}"):
        stimuli.list_shards(url, 10)


def test_context_frames_null_is_zero_and_other_int_types(tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(n=3, T=2, context_frames=pa.array([1, None, 0], pa.int64())))
    clips = stimuli.read_shard(stimuli.list_shards(url, 10)[0])
    assert [c.context_frames for c in clips] == [1, 0, 0]
    put_table(url, "p.parquet", raw_table(n=3, T=2, context_frames=pa.array([1.0, 0, 0], pa.float32())))
    with pytest.raises(ValueError, match=r"column 'context_frames' has type float, expected int32"):
        stimuli.list_shards(url, 10)


# ------------------------------------------------------------------------------------ streaming writer
def test_clip_writer_streams_file_by_file(tmp_url):
    url = tmp_url("local")
    clips = make_clips(7)
    committed = []
    with stimuli.ClipWriter(url, clips_per_file=3, columns={"perspectives", "modulations"}) as writer:
        for c in clips:
            writer.write(c)
            committed.append(len([n for n in os.listdir(url) if n.endswith(".parquet")]) if os.path.isdir(url)
                             else 0)
    assert committed == [0, 0, 0, 1, 1, 1, 2]  # a file is committed as soon as the next one starts
    assert writer.files == [storage.join(url, f"part-0000{k}.parquet") for k in range(3)]
    assert (writer.clips, writer.frames) == (7, sum(c.num_frames for c in clips))
    assert writer.bytes == sum(os.path.getsize(f) for f in writer.files)
    assert [c for s in stimuli.list_shards(url, 2) for c in stimuli.read_shard(s)] == clips
    # write_clips of the same list writes the same files
    again = tmp_url("local")
    stimuli.write_clips(again, clips, clips_per_file=3)
    for name in os.listdir(url):
        if name.endswith(".parquet"):
            assert pq.read_table(f"{url}/{name}").equals(pq.read_table(f"{again}/{name}"))


def test_clip_writer_file_bytes_and_new_columns(tmp_url):
    url = tmp_url("memory")
    plain = [Clip(f"c{i}", np.full((3 + i, 4, 6), i, np.uint8)) for i in range(4)]  # 72, 96, 120, 144 bytes
    with stimuli.ClipWriter(url, max_file_bytes=216) as writer:
        for c in plain:
            writer.write(c)
    assert [s.clip_ids for s in stimuli.list_shards(url, 10)] == [("c0", "c1"), ("c2",), ("c3",)]
    # a clip needing a column the file being built lacks starts a new file
    mixed = [plain[0], Clip("p", plain[1].frames, perspectives=np.ones((4, 2), np.float32)), plain[2],
             Clip("w", plain[3].frames, context_frames=2)]
    url = tmp_url("memory")
    with stimuli.ClipWriter(url) as writer:
        for c in mixed:
            writer.write(c)
    shards = stimuli.list_shards(url, 10)
    assert [s.clip_ids for s in shards] == [("c0",), ("p", "c2"), ("w",)]
    assert [c for s in shards for c in stimuli.read_shard(s)] == mixed


def test_clip_writer_error_removes_what_it_wrote(tmp_url):
    url = tmp_url("local")
    with pytest.raises(ValueError, match=r"duplicate clip_id 'clip-000' \(clip 3 repeats an earlier one\)"):
        with stimuli.ClipWriter(url, clips_per_file=1) as writer:
            for c in make_clips(3) + make_clips(2):
                writer.write(c)
    assert writer.files == [] and not os.path.exists(url)


def test_clip_writer_overwrite_keeps_old_files_until_the_first_new_one(tmp_url):
    url = tmp_url("s3")
    old = make_clips(5)
    stimuli.write_clips(url, old, clips_per_file=2)
    with pytest.raises(FileExistsError, match="already holds 3 parquet file"):
        stimuli.ClipWriter(url)
    with pytest.raises(RuntimeError, match="source failed"):
        with stimuli.ClipWriter(url, overwrite=True) as writer:
            writer.write(make_clips(1, seed=3)[0])
            raise RuntimeError("source failed")
    assert [c for s in stimuli.list_shards(url, 9) for c in stimuli.read_shard(s)] == old
    with stimuli.ClipWriter(url, overwrite=True) as writer:
        writer.write(make_clips(1, seed=3)[0])
    assert [c for s in stimuli.list_shards(url, 9) for c in stimuli.read_shard(s)] == make_clips(1, seed=3)


# ------------------------------------------------------------------------------------------ bytes read
def test_reads_fetch_only_what_an_item_needs(s3, s3_url, s3_gets):
    """Counted at the S3 client: every GetObject's body; 12 clips of 20 frames of 144x256 in one file."""
    rng = np.random.default_rng(4)
    clips = [Clip(f"c{i:02d}", rng.integers(0, 256, (20, 144, 256), dtype=np.uint8),
                  perspectives=rng.standard_normal((20, 2)).astype(np.float32) if i % 2 else None,
                  context_frames=i % 3) for i in range(12)]
    (file_url,) = stimuli.write_clips(s3_url, clips)
    fs, path = storage.filesystem(file_url)
    size = fs.size(path)
    fetched = s3_gets
    fetched.clear()  # count from here on
    listing = {}
    assert len(stimuli.list_shards(s3_url, 1, stats=listing)) == 12
    assert listing["bytes_read"] == sum(fetched) < 0.01 * size  # footer and small columns only
    for per_shard in (1, 4):
        total = {}
        for shard in stimuli.list_shards(s3_url, per_shard):
            fetched.clear()
            stats = {}
            got = stimuli.read_shard(shard, stats=stats)
            assert got == clips[shard.row_start : shard.row_stop]
            frame_bytes = sum(c.frames.nbytes for c in got)
            assert stats["frame_bytes"] == frame_bytes
            assert stats["bytes_read"] == sum(fetched) and stats["requests"] == len(fetched)
            assert stats["bytes_read"] <= 1.3 * frame_bytes
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        assert total["bytes_read"] / total["frame_bytes"] < 1.06  # footer: 32 KiB per item of 737 KB or more


def test_footer_larger_than_the_first_read(tmp_url):
    """200 one-clip row groups: the footer is over 32 KiB and is completed by a second request."""
    url = tmp_url("local")
    clips = with_context(make_clips(200, hw=(2, 3)), every=3)
    (file_url,) = stimuli.write_clips(url, clips, clips_per_file=200)
    footer = int.from_bytes(open(file_url, "rb").read()[-8:-4], "little")
    assert footer > 32 * 1024
    stats = {}
    shards = stimuli.list_shards(url, 50, stats=stats)
    assert stats["bytes_read"] > footer
    stats = {}
    assert stimuli.read_shard(shards[2], stats=stats) == clips[100:150]
    assert stats["requests"] == 3  # the footer in two pieces, then the shard's rows in one range


# ------------------------------------------------------------------------------------ read validation
def test_wrong_frames_size(tmp_url):
    url = tmp_url("local")
    t = raw_table(n=3, T=2, H=3, W=4)
    frames = t.column("frames").to_pylist()
    frames[1] = frames[1][:-5]
    put_table(url, "part-00000.parquet", t.set_column(1, "frames", pa.array(frames, pa.binary())))
    shards = stimuli.list_shards(url, 10)  # listing does not look at frames
    with pytest.raises(ValueError) as e:
        stimuli.read_shard(shards[0])
    msg = str(e.value)
    assert "part-00000.parquet" in msg and "row 1" in msg and "'r1'" in msg
    assert "19 bytes" in msg and "2*3*4 = 24" in msg


@pytest.mark.parametrize("column, expected", [("clip_id", "string"), ("frames", "binary"), ("num_frames", "int32"),
                                              ("height", "int32"), ("width", "int32")])
def test_missing_column(column, expected, tmp_url):
    url = tmp_url("local")
    put_table(url, "part-00000.parquet", raw_table())
    put_table(url, "part-00001.parquet", raw_table(**{column: None}))
    with pytest.raises(ValueError) as e:
        stimuli.list_shards(url, 10)
    msg = str(e.value)
    assert "part-00001.parquet" in msg and f"missing column '{column}'" in msg and f"expected {expected}" in msg


@pytest.mark.parametrize(
    "column, array, expected",
    [
        ("frames", pa.array(["abc"] * 3, pa.string()), "binary"),
        ("num_frames", pa.array([2.0] * 3, pa.float32()), "int32"),
        ("clip_id", pa.array([1, 2, 3], pa.int64()), "string"),
        ("perspectives", pa.array([[1, 2]] * 3, pa.list_(pa.int32())), "list<float32>"),
    ],
)
def test_wrong_column_type(column, array, expected, tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(**{column: array}))
    with pytest.raises(ValueError, match=rf"p\.parquet: column '{column}' has type .*, expected {expected}"):
        stimuli.list_shards(url, 10)


def test_other_integer_widths_accepted(tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(n=2, T=2, H=3, W=4, num_frames=pa.array([2, 2], pa.int64()),
                                          height=pa.array([3, 3], pa.int16())))
    clips = stimuli.read_shard(stimuli.list_shards(url, 10)[0])
    assert [c.frames.shape for c in clips] == [(2, 3, 4), (2, 3, 4)]


def test_duplicate_clip_id_across_files(tmp_url):
    url = tmp_url("local")
    stimuli.write_clips(url, make_clips(4), clips_per_file=2)
    put_table(url, "part-00002.parquet", raw_table(clip_id=pa.array(["a", "clip-001", "b"])))
    with pytest.raises(ValueError) as e:
        stimuli.list_shards(url, 10)
    msg = str(e.value)
    assert "duplicate clip_id 'clip-001'" in msg
    assert "part-00000.parquet row 1" in msg and "part-00002.parquet row 1" in msg


def test_duplicate_clip_id_within_file(tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(clip_id=pa.array(["a", "b", "a"])))
    with pytest.raises(ValueError, match=r"duplicate clip_id 'a': .*p\.parquet row 0 and .*p\.parquet row 2"):
        stimuli.list_shards(url, 10)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_corrupt_parquet(kind, tmp_url):
    url = tmp_url(kind)
    stimuli.write_clips(url, make_clips(2))
    fs, root = storage.filesystem(url)
    storage.commit_bytes(fs, f"{root}/part-00001.parquet", b"PAR1 garbage, not a parquet footer")
    with pytest.raises(ValueError, match=r"part-00001\.parquet: not a valid parquet file"):
        stimuli.list_shards(url, 10)


def test_truncated_parquet(tmp_url):
    url = tmp_url("local")
    stimuli.write_clips(url, make_clips(2))
    path = f"{url}/part-00000.parquet"
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"part-00000\.parquet"):
        stimuli.list_shards(url, 10)


@pytest.mark.parametrize("column", ["perspectives", "modulations"])
def test_bad_perspectives_length(column, tmp_url):
    url = tmp_url("local")
    good, bad = [0.0] * 4, [0.0] * 5  # T = 2 -> 4 values
    put_table(url, "p.parquet", raw_table(n=3, T=2, **{column: pa.array([good, None, bad], pa.list_(pa.float32()))}))
    shards = stimuli.list_shards(url, 2)
    clips = stimuli.read_shard(shards[0])  # rows 0 (good) and 1 (null = absent) are fine
    assert getattr(clips[0], column).shape == (2, 2) and getattr(clips[1], column) is None
    with pytest.raises(ValueError) as e:
        stimuli.read_shard(shards[1])
    msg = str(e.value)
    assert "p.parquet" in msg and "row 2" in msg and "'r2'" in msg
    assert f"{column} has 5 values, expected 2*num_frames = 4" in msg


@pytest.mark.parametrize("column", ["perspectives", "modulations"])
def test_non_finite_perspectives_named_by_file_row_and_frame(column, tmp_url):
    url = tmp_url("local")
    good, bad = [0.0] * 4, [0.0, 0.0, float("inf"), 1.0]  # T = 2: frame 1 is [inf, 1]
    put_table(url, "p.parquet", raw_table(n=2, T=2, **{column: pa.array([good, bad], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match=rf"p\.parquet row 1 \(clip_id 'r1'\): {column} of frame 1 is "
                                         rf"\[inf, 1\.0\]: not finite"):
        stimuli.read_shard(stimuli.list_shards(url, 2)[0])


@pytest.mark.parametrize("column", ["num_frames", "height", "width"])
def test_nonpositive_dimensions(column, tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(**{column: pa.array([2, 0, 2], pa.int32())}))
    with pytest.raises(ValueError, match=rf"p\.parquet row 1 \(clip_id 'r1'\): {column} must be > 0, got 0"):
        stimuli.list_shards(url, 10)


def test_null_frames(tmp_url):
    url = tmp_url("memory")
    put_table(url, "p.parquet", raw_table(n=2, T=2, H=3, W=4, frames=pa.array([b"x" * 24, None], pa.binary())))
    with pytest.raises(ValueError, match=r"p\.parquet row 1 \(clip_id 'r1'\): frames is null"):
        stimuli.read_shard(stimuli.list_shards(url, 10)[0])


def test_file_changed_since_listing(tmp_url):
    url = tmp_url("local")
    stimuli.write_clips(url, make_clips(4))
    shards = stimuli.list_shards(url, 2)
    stimuli.write_clips(url, make_clips(3, seed=9)[::-1], overwrite=True)
    with pytest.raises(ValueError, match="changed since it was listed"):
        stimuli.read_shard(shards[0])
    with pytest.raises(ValueError, match="changed since it was listed"):
        stimuli.read_shard(shards[1])


# ---------------------------------------------------------------------------------- missing datasets
def test_missing_local_path(tmp_path):
    url = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"not found: {url}"):
        stimuli.list_shards(url, 4)


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        stimuli.list_shards(str(tmp_path), 4)


def test_missing_memory_path():
    with pytest.raises(FileNotFoundError, match="memory://fnn-nothing-here/x"):
        stimuli.list_shards("memory://fnn-nothing-here/x", 4)


def test_missing_s3_bucket_and_prefix(s3, s3_url):
    secret = s3.storage_options["secret"]
    url = "s3://fnn-no-such-bucket/stimuli"
    with pytest.raises(FileNotFoundError) as e:
        stimuli.list_shards(url, 4, s3.storage_options)
    assert url in str(e.value) and secret not in str(e.value)
    with pytest.raises(FileNotFoundError, match=s3_url):
        stimuli.list_shards(s3_url, 4, s3.storage_options)


def test_unreachable_endpoint_names_url_without_credentials():
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIAEXAMPLE", "secret": "top-secret-value",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    url = "s3://somebucket/stimuli"
    with pytest.raises(FileNotFoundError) as e:
        stimuli.list_shards(url, 4, opts)
    assert url in str(e.value)
    assert "top-secret-value" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


@pytest.mark.slow  # a process of its own
def test_shard_read_in_another_process_via_env(s3, s3_url):
    """A worker process (like a Ray actor) gets only the pickled Shard and reaches S3 through the env vars."""
    import subprocess
    import sys

    clips = make_clips(3)
    stimuli.write_clips(s3_url, clips)
    shard = stimuli.list_shards(s3_url, 5)[0]
    code = (
        "import pickle, sys; from fnn_ray import stimuli; "
        "clips = stimuli.read_shard(pickle.loads(sys.stdin.buffer.read())); "
        "sys.stdout.buffer.write(pickle.dumps([(c.clip_id, c.frames.tobytes()) for c in clips]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(shard), capture_output=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert pickle.loads(res.stdout) == [(c.clip_id, c.frames.tobytes()) for c in clips]
