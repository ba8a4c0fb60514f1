"""Attacks on the feature store's files: replaced under a reader, flipped bytes, damaged or vanished part files,
killed lock holders with forked children, read-only stores. Real HDF5 files and real processes throughout."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest

from embedfit.cli import main
from embedfit.errors import StoreError, StoreLockedError
from embedfit.extraction.local import extract
from embedfit.storage import OK, FeatureStore, StoreSettings, StoreWriter

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]
CLASSES = ["c0", "c1"]


class Rec(NamedTuple):
    """What `StoreWriter.plan`/`commit` read from a scanned image (embedfit.images.ImageRecord's fields)."""

    key: str
    label: int
    size: int
    mtime_ns: int


def _records(n: int, prefix: str) -> list[Rec]:
    return sorted((Rec(f"c{i % 2}/{prefix}_{i:04d}.png", i % 2, 1000 + i, 10**18 + i) for i in range(n)),
                  key=lambda r: r.key)


def _write_part(writer: StoreWriter, recs: list[Rec], feats: np.ndarray) -> Path:
    return writer.write_part([r.key for r in recs], [CLASSES[r.label] for r in recs], [r.size for r in recs],
                             [r.mtime_ns for r in recs], [OK] * len(recs), [""] * len(recs), feats)


def _make_store(path: Path, settings: StoreSettings, n: int = 600, *, prefix: str = "img",
                seed: int = 0) -> tuple[list[Rec], np.ndarray]:
    """A complete store of n synthetic rows (several 256-row feature chunks); returns its records and features."""
    recs = _records(n, prefix)
    feats = np.random.default_rng(seed).standard_normal((n, settings.spec.embedding_dim)).astype(np.float32)
    with StoreWriter(path, settings, overwrite=True) as writer:
        _write_part(writer, recs, feats)
        assert writer.commit(recs, CLASSES, complete=True).complete
    return recs, feats


def _flip_feature_bytes(path: Path, chunk: int = 1) -> None:
    """Flip a few bytes inside one chunk of the features dataset, where a disk or a copy would corrupt them."""
    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        data = bytearray(fh.read(3))
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0x5A for b in data))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. a reader whose store is replaced ------------------------------------------------------------------


def test_reader_keeps_its_rows_when_the_store_is_replaced(tmp_path: Path, settings: StoreSettings) -> None:
    out = tmp_path / "feats.h5"
    recs, feats = _make_store(out, settings, prefix="old", seed=1)
    other = tmp_path / "other.h5"
    _, other_feats = _make_store(other, settings, prefix="new", seed=2)
    store = FeatureStore.open(out)
    os.replace(other, out)  # what a concurrent `extract` commit does
    np.testing.assert_array_equal(store.features(), feats)
    np.testing.assert_array_equal(store.features([5, 1, 400]), feats[[5, 1, 400]])
    assert list(store.paths) == [r.key for r in recs]
    store.close()
    with pytest.raises(StoreError, match="replaced"):  # closed: reopening the path finds another store
        store.features([0])
    with FeatureStore.open(out) as fresh:
        np.testing.assert_array_equal(fresh.features(), other_feats)


def test_readers_opened_in_a_loop_do_not_leak_file_handles(tmp_path: Path, settings: StoreSettings) -> None:
    out = tmp_path / "feats.h5"
    _, feats = _make_store(out, settings, n=20)
    FeatureStore.open(out).features([0])  # warm-up: h5py opens a few descriptors once per process
    before = _open_fds()
    for _ in range(100):
        np.testing.assert_array_equal(FeatureStore.open(out).features([3]), feats[[3]])  # dropped, never closed
        with FeatureStore.open(out) as store:
            store.load()
    assert _open_fds() <= before + 1


# -- 2. checksums -------------------------------------------------------------------------------------


def test_flipped_feature_bytes_raise_a_store_error(tmp_path: Path, settings: StoreSettings) -> None:
    out = tmp_path / "feats.h5"
    _, feats = _make_store(out, settings)
    _flip_feature_bytes(out, chunk=1)  # rows 256-511
    store = FeatureStore.open(out)
    np.testing.assert_array_equal(store.features(slice(0, 256)), feats[:256])  # other chunks still read
    for read in (store.features, store.load, lambda: store.features([300])):
        with pytest.raises(StoreError) as info:
            read()
        msg = str(info.value)
        assert str(out) in msg and "--overwrite" in msg and "\n" not in msg


def test_flipped_path_bytes_are_caught_by_the_metadata_checksum(tmp_path: Path, settings: StoreSettings) -> None:
    """HDF5 cannot checksum variable-length strings; a changed path must still not pass as another image's row."""
    out = tmp_path / "feats.h5"
    _make_store(out, settings, n=20)
    data = bytearray(out.read_bytes())
    at = data.find(b"c1/img_0007.png")
    assert at > 0
    data[at + 8] = ord("9")  # img_0007 -> img_0009: a valid-looking, wrong key
    out.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"checksum.*--overwrite"):
        FeatureStore.open(out)


def test_resume_of_a_damaged_store_fails_and_overwrite_recovers(image_tree: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A real `extract` resuming a store with a flipped byte must not copy the damaged rows into a new "complete"
    store: one-line error naming the store, store unchanged, `--overwrite` starts afresh."""
    out = tmp_path / "feats.h5"
    first = extract(image_tree, out, workers=0)
    reference = FeatureStore.open(out).features()
    _flip_feature_bytes(out, chunk=0)
    damaged = out.read_bytes()
    argv = ["extract", str(image_tree), "-o", str(out), "--workers", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "HDF5" not in err
    assert str(out) in err and "--overwrite" in err
    assert out.read_bytes() == damaged and not list(tmp_path.glob(".feats.h5.*.tmp"))
    assert main([*argv, "--overwrite"]) == 0
    with FeatureStore.open(out) as store:
        assert store.complete and len(store) == first.total
        np.testing.assert_allclose(store.features(), reference, rtol=1e-5, atol=1e-5)


def test_a_store_without_its_metadata_checksum_is_refused_with_a_hint(tmp_path: Path,
                                                                       settings: StoreSettings) -> None:
    """A store without metadata_sha256 (pre-release embedfit, or the attribute deleted to dodge the check) is not
    trusted: opening and resuming it fail in one line that says how to re-create it."""
    new = tmp_path / "new.h5"
    recs, _ = _make_store(new, settings)
    with h5py.File(new, "a") as f:
        del f.attrs["metadata_sha256"]
    with pytest.raises(StoreError, match=r"no metadata checksum .*re-extract it with `embedfit extract \.\.\. "
                                         r"--overwrite`"):
        FeatureStore.open(new)
    with pytest.raises(StoreError, match="no metadata checksum"), StoreWriter(new, settings) as writer:
        writer.plan(recs)


# -- 3. locks -------------------------------------------------------------------------------------------


def test_forked_child_of_a_killed_writer_does_not_keep_the_lock(tmp_path: Path, settings: StoreSettings) -> None:
    """A DataLoader worker is a forked child: after SIGKILL of the main process it lives on for a while, and must
    not keep a re-run out."""
    out = tmp_path / "feats.h5"
    _make_store(out, settings, n=4)
    script = textwrap.dedent("""
        import os, sys, time
        from embedfit.storage import FeatureStore, StoreWriter
        writer = StoreWriter(sys.argv[1], FeatureStore.open(sys.argv[1]).settings)
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(proc.stdout.readline())
        with pytest.raises(StoreLockedError):  # the lock holds while its owner lives
            StoreWriter(out, settings)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.kill(child, 0)  # the child is still alive
        with StoreWriter(out, settings):
            pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if child:
            os.kill(child, signal.SIGKILL)


def test_closing_a_writer_leaves_the_lock_file_so_two_writers_never_both_lock(tmp_path: Path,
                                                                                 settings: StoreSettings) -> None:
    """A writer that opened the lock file just before the holder closed gets the lock on that file; a third writer
    must then be refused, which it would not be if the closing writer had unlinked the file in between."""
    out = tmp_path / "feats.h5"
    _make_store(out, settings, n=4)
    lock_file = out.with_name(".feats.h5.embedfit-lock")  # hidden, and named for what it is
    holder = StoreWriter(out, settings)
    fd = os.open(lock_file, os.O_RDWR)  # the second writer has opened the lock file (POSIX locks are flocks)...
    try:
        holder.close()
        assert lock_file.exists()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ...and locks it once the holder has gone
        with pytest.raises(StoreLockedError):
            StoreWriter(out, settings)
    finally:
        os.close(fd)
    with StoreWriter(out, settings):  # free again
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["feats.h5"]


# -- 4. part files ----------------------------------------------------------------------------------------


def _killed_run_with_parts(out: Path, settings: StoreSettings) -> tuple[list[Rec], np.ndarray, list[Path]]:
    """What a killed run leaves: no store, two finished parts of 300 rows."""
    recs = _records(600, "img")
    feats = np.random.default_rng(5).standard_normal((600, settings.spec.embedding_dim)).astype(np.float32)
    writer = StoreWriter(out, settings)
    parts = [_write_part(writer, recs[:300], feats[:300]), _write_part(writer, recs[300:], feats[300:])]
    writer.close()
    return recs, feats, parts


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_part_is_skipped_and_its_images_redone(tmp_path: Path, settings: StoreSettings, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "feats.h5"
    recs, feats, (good, bad) = _killed_run_with_parts(out, settings)
    if damage == "truncated":
        os.truncate(bad, bad.stat().st_size // 2)
    else:
        _flip_feature_bytes(bad, chunk=0)
    with caplog.at_level(logging.WARNING, logger="embedfit"), StoreWriter(out, settings) as writer:
        plan = writer.plan(recs)
        assert plan.reused == 300 and [r.key for r in plan.todo] == [r.key for r in recs[300:]]
        assert not bad.exists() and good.exists()
        _write_part(writer, recs[300:], feats[300:])  # redone
        store = writer.commit(recs, CLASSES, complete=True)
        assert store.complete
        np.testing.assert_array_equal(store.features(), feats)
    assert any(bad.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_part_deleted_during_a_run_is_redone_by_the_next_run(tmp_path: Path, settings: StoreSettings,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "feats.h5"
    recs = _records(40, "img")
    feats = np.random.default_rng(6).standard_normal((40, settings.spec.embedding_dim)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="embedfit"), StoreWriter(out, settings) as writer:
        writer.plan(recs)
        _write_part(writer, recs[:20], feats[:20])
        gone = _write_part(writer, recs[20:], feats[20:])
        gone.unlink()  # e.g. a clean-up script
        store = writer.commit(recs, CLASSES, complete=True)
        assert not store.complete and len(store) == 20
    assert any(gone.name in r.getMessage() for r in caplog.records)
    with StoreWriter(out, settings) as writer:
        assert [r.key for r in writer.plan(recs).todo] == [r.key for r in recs[20:]]
        _write_part(writer, recs[20:], feats[20:])
        store = writer.commit(recs, CLASSES, complete=True)
        assert store.complete
        np.testing.assert_array_equal(store.features(), feats)


def test_resuming_an_unreadable_store_says_to_overwrite(tmp_path: Path, settings: StoreSettings) -> None:
    out = tmp_path / "feats.h5"
    recs, feats = _make_store(out, settings, n=20)
    os.truncate(out, out.stat().st_size // 2)
    with pytest.raises(StoreError) as info:
        StoreWriter(out, settings)
    assert str(out) in str(info.value) and "--overwrite" in str(info.value) and "\n" not in str(info.value)
    with StoreWriter(out, settings, overwrite=True) as writer:  # and the lock was released by the failed one
        _write_part(writer, recs, feats)
        assert writer.commit(recs, CLASSES, complete=True).complete


# -- 5. file mode -----------------------------------------------------------------------------------------


def test_resume_keeps_a_read_only_store_read_only(tmp_path: Path, settings: StoreSettings) -> None:
    out = tmp_path / "feats.h5"
    recs, _ = _make_store(out, settings, n=20)
    out.chmod(0o444)
    more = _records(2, "extra")
    with StoreWriter(out, settings) as writer:
        _write_part(writer, more, np.zeros((2, settings.spec.embedding_dim), np.float32))
        assert len(writer.commit(recs + more, CLASSES, complete=True)) == 22
    assert stat.S_IMODE(out.stat().st_mode) == 0o444


# -- 6. disk full -----------------------------------------------------------------------------------------


def test_write_failure_inside_hdf5_during_commit_is_one_store_error(tmp_path: Path,
                                                                     settings: StoreSettings) -> None:
    """The free-space check passes, then a write inside HDF5 fails (here the kernel's file-size limit, EFBIG, as
    deterministic as a disk that another process fills meanwhile): one StoreError, the temporary file removed, the
    old store untouched, no crash and no HDF5 error stack on stderr."""
    out = tmp_path / "feats.h5"
    _make_store(out, settings, n=600)  # ~3 MB
    before = out.read_bytes()
    script = textwrap.dedent("""
        import resource, signal, sys
        from embedfit.errors import StoreError
        from embedfit.storage import FeatureStore, StoreWriter
        out, keys = sys.argv[1], FeatureStore.open(sys.argv[1]).paths
        recs = [type("Rec", (), {"key": k, "label": int(k[1]), "size": 1000 + int(k[-8:-4]),
                                 "mtime_ns": 10**18 + int(k[-8:-4])}) for k in keys]
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        with StoreWriter(out, FeatureStore.open(out).settings) as writer:
            try:
                writer.commit(recs, ["c0", "c1"], complete=True)
            except StoreError as exc:
                print("StoreError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("StoreError: cannot write") and "File too large" in result.stdout
    assert result.stdout.count("\n") == 1 and str(out) in result.stdout
    assert result.stderr.strip() == "", result.stderr[-2000:]
    assert out.read_bytes() == before and not list(tmp_path.glob(".feats.h5.*.tmp"))
