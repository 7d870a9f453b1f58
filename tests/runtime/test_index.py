"""hbi_runtime.index: scanning, incremental updates, windows, crash safety, and the stored sides themselves.

The scan and window-plan tests need nothing but numpy. The others index real videos (generated with the ffmpeg
binary of imageio-ffmpeg) with the tiny model, exported once per module: they need torch and hbi_export to build
the package, so they skip in the torch-free run (``pytest.importorskip`` in the ``pkg`` fixture) and are marked
``slow`` (the export takes ~20 s on 2 cores; the rest ~30 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.index import Index, compact, default_index_dir, index_status, plan_windows, scan, update_index
from hbi_runtime.index.catalog import CATALOG, SHARDS, Writer
from hbi_runtime.scoring import VideoStore

NON_UTF8 = b"clip-\xe9\xff.mp4"  # Latin-1 bytes: not valid UTF-8
MAX_FRAMES = 8
LEVEL_NAMES = ("entity", "action", "event")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _ffmpeg(*args: str) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _make_video(path: Path | bytes, seconds: float, *, rate: int = 10, pattern: str = "testsrc2") -> None:
    _ffmpeg("-f", "lavfi", "-i", f"{pattern}=size=64x48:rate={rate}", "-t", str(seconds), "-c:v", "libx264",
            "-pix_fmt", "yuv420p", os.fsdecode(path))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Source clips, made once: copied into each test's folder."""
    pytest.importorskip("av")
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, seconds, pattern in (("a.mp4", 2, "testsrc2"), ("b.mkv", 3, "testsrc"), ("c.webm", 1.5, "smptebars"),
                                   ("d.mp4", 2.5, "rgbtestsrc"), ("other.mp4", 3, "mandelbrot"),
                                   ("long.mp4", 25, "testsrc2")):
        path = d / name
        if name.endswith(".webm"):
            _ffmpeg("-f", "lavfi", "-i", f"{pattern}=size=64x48:rate=10", "-t", str(seconds), "-c:v", "libvpx-vp9",
                    "-deadline", "realtime", str(path))
        else:
            _make_video(path, seconds, pattern=pattern)
        out[name] = path
    return out


def _folder(root: Path, clips: dict[str, Path], names=("a.mp4", "b.mkv", "c.webm")) -> Path:
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy2(clips[name], (videos / "sub" if i == 1 else videos) / name)
    return videos


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    convert = pytest.importorskip("hbi_export.checkpoints.convert")
    package = pytest.importorskip("hbi_export.onnx.package")
    root = tmp_path_factory.mktemp("tiny")
    convert.init_random(root / "m", "tiny")
    package.export_package(root / "m", root / "pkg", max_words=12, max_frames=MAX_FRAMES)
    return root / "pkg"


@pytest.fixture(scope="module")
def model(pkg):
    from hbi_runtime.model import load

    with load(pkg) as m:
        yield m


def _stored(index: Index) -> dict[tuple[str, float], list[np.ndarray]]:
    """(display path, window start) -> the stored arrays (tokens as float32, weights, mask) per level."""
    store = index.video_store()
    out = {}
    for row in index.rows:
        arrays = []
        for level in store.levels:
            arrays += [level.dequantize(slice(row.row, row.row + 1))[0], np.asarray(level.weights[row.row]),
                       np.asarray(level.mask[row.row])]
        out[(row.display, row.start_s)] = arrays
    return out


def _reference(model, paths: list, dtype: str) -> list[list[np.ndarray]]:
    """What model.encode_videos gives for ``paths``, canonicalised as a store (zero at padding), per video."""
    side, decoded, errors = model.encode_videos(paths, workers=2)
    assert not errors and len(decoded) == len(paths)
    store = VideoStore.from_sides(side, "float32")
    return [[a for lv in store.levels for a in (lv.tokens[i], lv.weights[i], lv.mask[i])] for i in range(len(paths))]


def _check_consistent(index_dir: Path) -> None:
    """Every catalog row points into a shard folder that exists and holds as many rows as the catalog says, and
    no shard folder is left that the catalog does not name (after a writer ran)."""
    conn = sqlite3.connect(index_dir / CATALOG)
    shards = dict(conn.execute("SELECT id, n_rows FROM shards"))
    bad = conn.execute("SELECT COUNT(*) FROM rows r LEFT JOIN shards s ON s.id = r.shard_id "
                       "WHERE s.id IS NULL OR r.shard_row >= s.n_rows").fetchone()[0]
    conn.close()
    assert bad == 0
    for sid, n in shards.items():
        assert VideoStore.open(index_dir / SHARDS / f"{sid:06d}").n == n
    assert sorted(int(p.name) for p in (index_dir / SHARDS).iterdir()) == sorted(shards)


# ---------------------------------------------------------------------------------------------------------------
# scan (no model)


def _touch(path: Path | bytes, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_scan_finds_videos_by_extension_recursively_with_bytes_names(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x.MP4", "a/y.mkv", "a/b/z.ts", "a/notes.txt", "a/b/clip.webm.part"):
        _touch(tmp_path / rel)
    _touch(os.path.join(os.fsencode(tmp_path), NON_UTF8))
    found = scan(tmp_path)
    assert [e.rel for e in found.files] == sorted([b"a/b/z.ts", b"a/y.mkv", NON_UTF8, b"x.MP4"])
    assert found.skipped == []
    entry = next(e for e in found.files if e.rel == NON_UTF8)
    assert entry.display == "clip-\\xe9\\xff.mp4" and os.path.isfile(entry.path)
    assert [e.rel for e in scan(tmp_path, ["ts", ".MKV"]).files] == [b"a/b/z.ts", b"a/y.mkv"]


def test_scan_symlink_loop_and_outside_links(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    (inside / "d").mkdir(parents=True)
    outside.mkdir()
    _touch(inside / "d" / "v.mp4")
    _touch(outside / "far.mp4")
    (inside / "d" / "loop").symlink_to(inside)  # a loop back to the top
    (inside / "alias.mp4").symlink_to(inside / "d" / "v.mp4")  # inside: followed
    (inside / "ext").symlink_to(outside)  # outside: not followed unless asked
    (inside / "ext.mp4").symlink_to(outside / "far.mp4")
    (inside / "dead.mp4").symlink_to(inside / "gone.mp4")
    found = scan(inside)
    assert [e.rel for e in found.files] == [b"alias.mp4", b"d/v.mp4"]
    reasons = dict(found.skipped)
    assert "symlink loop" in reasons["d/loop"]
    assert "outside the folder" in reasons["ext"] and "outside the folder" in reasons["ext.mp4"]
    assert reasons["dead.mp4"] == "broken symlink"
    followed = scan(inside, follow_symlinks=True)
    assert [e.rel for e in followed.files] == [b"alias.mp4", b"d/v.mp4", b"ext.mp4", b"ext/far.mp4"]


def test_scan_skips_unreadable_and_vanishing_entries(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    _touch(tmp_path / "locked" / "v.mp4")
    _touch(tmp_path / "ok.mp4")
    _touch(tmp_path / "ghost.mp4")
    real_scandir = os.scandir

    class Listing(list):  # what os.scandir returns, as a context manager over already-listed entries
        def __enter__(self):
            return iter(self)

        def __exit__(self, *exc):
            pass

        def close(self):
            pass

    root_calls = []

    def scandir(path):
        if os.fsencode(path).endswith(b"/locked"):  # root reads anything: simulate a folder without permission
            raise PermissionError(13, "Permission denied")
        with real_scandir(path) as it:
            entries = Listing(it)
        root_calls.append(path)
        if len(root_calls) == 2:  # the walk's listing (the first call only checks that the folder opens)
            os.remove(tmp_path / "ghost.mp4")  # listed, then gone before it is looked at
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    found = scan(tmp_path)
    assert [e.rel for e in found.files] == [b"ok.mp4"]
    assert dict(found.skipped) == {"locked": "cannot list the folder (Permission denied)",
                                   "ghost.mp4": "vanished during the scan"}


def test_scan_refuses_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        scan(tmp_path / "nope")
    _touch(tmp_path / "f.mp4")
    with pytest.raises(BadInputError, match="is not a folder"):
        scan(tmp_path / "f.mp4")


def test_plan_windows():
    assert [(w.start_s, w.end_s, w.first, w.stop) for w in plan_windows(250, 10.0, 10)] == [
        (0, 10, 0, 100), (10, 20, 100, 200), (20, 25, 200, 250)]
    assert [w.start_s for w in plan_windows(250, 10.0, 10, 5)] == [0, 5, 10, 15]  # 15 + 10 reaches the end
    assert [(w.first, w.stop) for w in plan_windows(40, 10.0, 30)] == [(0, 40)]  # shorter than one window
    assert len(plan_windows(900, 30.0, 10)) == 3  # 30 s x 30 fps: no spurious 4th window from rounding
    with pytest.raises(UsageError, match="window"):
        plan_windows(10, 10.0, 0)


def test_default_index_dir_is_per_folder_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake = types.SimpleNamespace(package=types.SimpleNamespace(manifest_sha256="ab" * 32))
    one, two = default_index_dir(tmp_path / "v1", fake), default_index_dir(tmp_path / "v2", fake)
    assert one.parent == tmp_path / "cache" / "hbi-toolkit" / "index" and one != two
    assert one.name.endswith("-" + "ab" * 6)


def test_writer_refuses_a_folder_that_is_not_an_index(tmp_path):
    _touch(tmp_path / "precious.txt")
    with pytest.raises(UsageError, match="not an index folder"):
        Writer(tmp_path)
    assert os.listdir(tmp_path) == ["precious.txt"]
    with pytest.raises(BadInputError, match="not an index"):
        Index.open(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# with the tiny model


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")} | {
        "dir": Path(folder).stat().st_mtime_ns}


@pytest.mark.slow
def test_incremental_lifecycle(tmp_path, clips, model):
    videos = _folder(tmp_path, clips)
    shutil.copy2(clips["d.mp4"], os.path.join(os.fsencode(videos), NON_UTF8))
    (videos / "broken.mp4").write_bytes(b"not a video\n" * 50)
    index_dir = tmp_path / "index"
    before = _snapshot(videos)
    calls = []
    s = update_index(model, videos, index_dir, workers=2, batch_size=2, dtype="float32",
                     progress=lambda *a: calls.append(a))
    assert (s.new, s.unchanged, s.reindexed, s.removed) == (4, 0, 0, 0)
    assert [f.path for f in s.failed] == ["broken.mp4"] and "not a video" in s.failed[0].reason
    assert s.failed[0].kind == "permanent" and s.failed[0].attempted
    assert calls[0] == (0, 5, None, 0.0) and [c[0] for c in calls[1:]] == [1, 2, 3, 4, 5]
    assert all(c[1] == 5 and c[3] > 0 for c in calls[1:])
    assert _snapshot(videos) == before  # nothing written into the video folder
    _check_consistent(index_dir)

    index = Index.open(index_dir, model.package.manifest_sha256)
    assert sorted(r.display for r in index.rows) == ["a.mp4", "c.webm", "clip-\\xe9\\xff.mp4", "sub/b.mkv"]
    assert index.stats()["videos"] == 4 and index.stats()["failed"] == 1 and index.failed()[0][0] == "broken.mp4"
    # stored sides equal model.encode_videos on the same files (fp32 storage: exactly)
    stored = _stored(index)
    ref = _reference(model, [r.path for r in index.rows], "float32")
    for row, expected in zip(index.rows, ref):
        for got, want in zip(stored[(row.display, 0.0)], expected):
            np.testing.assert_array_equal(got, want)
        assert row.start_s == 0.0 and row.end_s == pytest.approx(row.duration, abs=0.2)
        assert len(row.frames) <= MAX_FRAMES and row.timestamps()[0] == 0.0

    s = update_index(model, videos, index_dir, workers=2, batch_size=2, dtype="float32")
    assert (s.new, s.unchanged, s.reindexed, s.removed) == (0, 4, 0, 0)
    # a permanent failure is not decoded again, but every summary still lists it
    assert [(f.path, f.attempted) for f in s.failed] == [("broken.mp4", False)]

    a = videos / "a.mp4"
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # touched, same content
    shutil.copyfile(clips["other.mp4"], videos / "sub" / "b.mkv")  # replaced: other content
    (videos / "c.webm").unlink()
    shutil.copy2(clips["d.mp4"], videos / "sub" / "new.mp4")
    (videos / "broken.mp4").unlink()
    s = update_index(model, videos, index_dir, workers=2, batch_size=2, dtype="float32")
    assert (s.new, s.unchanged, s.reindexed, s.removed, s.failed) == (1, 2, 1, 2, [])
    _check_consistent(index_dir)
    conn = sqlite3.connect(index_dir / CATALOG)
    assert conn.execute("SELECT mtime_ns FROM videos WHERE rel = ?", (b"a.mp4",)).fetchone()[0] == \
        a.stat().st_mtime_ns
    conn.close()

    index = Index.open(index_dir)
    names = [r.display for r in index.rows]
    assert sorted(names) == ["a.mp4", "clip-\\xe9\\xff.mp4", "sub/b.mkv", "sub/new.mp4"]
    stored = _stored(index)
    ref = _reference(model, [r.path for r in index.rows], "float32")
    for row, expected in zip(index.rows, ref):
        for got, want in zip(stored[(row.display, 0.0)], expected):
            np.testing.assert_array_equal(got, want)

    assert index.stats()["dead_rows"] == 0 and index.stats()["shards"] == 1  # 2 of 4 rows died: compacted

    (videos / "a.mp4").unlink()  # 1 of 4 rows dies: under the 25 % threshold, left in place
    assert update_index(model, videos, index_dir, dtype="float32").removed == 1
    assert Index.open(index_dir).stats()["dead_rows"] == 1
    assert not compact(index_dir)
    assert compact(index_dir, dead_fraction=0.1)
    after = Index.open(index_dir)
    assert after.stats()["dead_rows"] == 0 and len(after) == 3
    for key, arrays in _stored(after).items():  # live rows unchanged by the rewrite
        for got, want in zip(arrays, stored[key]):
            np.testing.assert_array_equal(got, want)
    _check_consistent(index_dir)


@pytest.mark.slow
def test_fp16_storage_within_tolerance(tmp_path, clips, model):
    videos = _folder(tmp_path, clips)
    update_index(model, videos, tmp_path / "index", workers=2, dtype="float16")
    index = Index.open(tmp_path / "index")
    assert index.video_store().dtype == "float16"
    stored = _stored(index)
    ref = _reference(model, [r.path for r in index.rows], "float32")
    for row, expected in zip(index.rows, ref):
        for got, want in zip(stored[(row.display, 0.0)], expected):
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_mismatches_are_refused(tmp_path, clips, model):
    videos = _folder(tmp_path, clips, names=("a.mp4",))
    index_dir = tmp_path / "index"
    update_index(model, videos, index_dir, dtype="float32")
    other = types.SimpleNamespace(package=types.SimpleNamespace(manifest_sha256="0" * 64, dir=Path("other")),
                                  manifest=model.manifest)
    with pytest.raises(MismatchError, match=f"{model.package.manifest_sha256}.*{'0' * 64}") as info:
        update_index(other, videos, index_dir, dtype="float32")
    assert "--rebuild" in info.value.hint
    with pytest.raises(MismatchError, match="was built with model package"):
        Index.open(index_dir, model_sha256="0" * 64)
    with pytest.raises(MismatchError, match="storage dtype"):
        update_index(model, videos, index_dir, dtype="float16")
    with pytest.raises(MismatchError, match="window policy"):
        update_index(model, videos, index_dir, dtype="float32", window=10)
    s = update_index(model, videos, index_dir, dtype="float16", rebuild=True)
    assert s.new == 1 and Index.open(index_dir).video_store().dtype == "float16"
    _check_consistent(index_dir)
    with Writer(index_dir):  # another process updating: refused, not interleaved
        with pytest.raises(UsageError, match="another process"):
            update_index(model, videos, index_dir, dtype="float16")


@pytest.mark.slow
def test_windows(tmp_path, clips, model):
    videos = _folder(tmp_path, clips, names=("a.mp4",))
    shutil.copy2(clips["long.mp4"], videos / "long.mp4")  # 25 s at 10 fps
    s = update_index(model, videos, tmp_path / "w", dtype="float32", window=10, batch_size=2)
    assert (s.new, s.rows) == (2, 4)
    index = Index.open(tmp_path / "w")
    spans = [(r.display, r.start_s, r.end_s) for r in index.rows]
    assert sorted(spans) == [("a.mp4", 0, 2), ("long.mp4", 0, 10), ("long.mp4", 10, 20), ("long.mp4", 20, 25)]
    for row in index.rows:  # sampled at 1 fps inside the window, then uniform to T
        times = row.timestamps()
        assert row.start_s <= times[0] < times[-1] < row.end_s and len(times) <= MAX_FRAMES
    stored = _stored(index)
    (short,) = _reference(model, [str(videos / "a.mp4")], "float32")  # one window = the whole video
    for got, want in zip(stored[("a.mp4", 0.0)], short):
        np.testing.assert_array_equal(got, want)

    s = update_index(model, videos, tmp_path / "s", dtype="float32", window=10, stride=5)
    assert [r.start_s for r in Index.open(tmp_path / "s").rows if r.display == "long.mp4"] == [0, 5, 10, 15]
    assert update_index(model, videos, tmp_path / "w", dtype="float32", window=10).unchanged == 2


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from hbi_runtime.index import catalog, update_index
    from hbi_runtime.model import load

    pkg, videos, marker, mode, index_dir = sys.argv[1:6]
    where, _, count = mode.partition(":")

    def progress(done, total, path, rate):
        if done >= 1:  # tells the parent how many files are committed
            with open(marker + ".tmp", "w") as f:
                f.write(str(done))
            os.replace(marker + ".tmp", marker)
        if where == "progress" and done == int(count):
            os.kill(os.getpid(), signal.SIGKILL)

    add_shard, calls = catalog.Writer.add_shard, []

    def add_shard_then_die(self, shard_id, n_rows, files):  # inside the transaction: shard renamed, not committed
        calls.append(shard_id)
        add_shard(self, shard_id, n_rows, files)
        if where == "add_shard" and len(calls) == int(count):
            os.kill(os.getpid(), signal.SIGKILL)

    catalog.Writer.add_shard = add_shard_then_die

    if __name__ == "__main__":
        with load(pkg) as model:
            update_index(model, videos, index_dir, workers=2, batch_size=1, dtype="float32", progress=progress)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["progress:2", "add_shard:3", "parent"])
def test_crash_safety(tmp_path, clips, model, pkg, mode):
    """Kill the indexer (SIGKILL) right after a commit, between a shard's rename and its commit (inside the
    transaction), and at a moment chosen by the clock; the index stays consistent, and a rerun ends equal to a
    clean run, keeping everything committed before the kill."""
    names = ("a.mp4", "b.mkv", "c.webm", "d.mp4", "other.mp4")
    videos = _folder(tmp_path, clips, names=names)
    for i in range(3):
        shutil.copy2(clips["a.mp4"], videos / f"copy{i}.mp4")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    marker, index_dir = tmp_path / "committed", tmp_path / "index"
    proc = subprocess.Popen([sys.executable, str(script), str(pkg), str(videos), str(marker), mode,
                             str(index_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if mode == "parent":  # at once after the 3rd commit: decoding, encoding, writing a shard or committing
        while proc.poll() is None and int(marker.read_text()) < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.exists(), proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL

    if mode.startswith("add_shard"):  # the killed transaction's shard is on disk, unreferenced
        assert len(list((index_dir / SHARDS).iterdir())) == 3
    crashed = Index.open(index_dir, model.package.manifest_sha256)  # consistent as the kill left it
    assert len(crashed) == 0  # readers see the last published state: the killed run never published
    pending = index_status(index_dir)["pending"]
    assert pending is not None and 1 <= pending["videos"] <= 8  # (8: the run ended before the parent's kill)
    if mode != "parent":
        assert pending["videos"] == 2  # the 3rd shard was on disk but never committed: an orphan, not a row

    s = update_index(model, videos, index_dir, workers=2, batch_size=3, dtype="float32")
    # what the killed run committed is kept, not encoded again
    assert (s.resumed, s.new, s.unchanged, s.failed) == (pending["videos"], 8 - pending["videos"], 0, [])
    assert index_status(index_dir)["pending"] is None
    _check_consistent(index_dir)
    resumed = _stored(Index.open(index_dir))
    update_index(model, videos, tmp_path / "clean", workers=2, batch_size=3, dtype="float32")
    clean = _stored(Index.open(tmp_path / "clean"))
    assert sorted(resumed) == sorted(clean) and len(clean) == 8
    for key in clean:
        for got, want in zip(resumed[key], clean[key]):
            np.testing.assert_array_equal(got, want)
