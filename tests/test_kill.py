"""Killed and concurrent runs: the store always opens, nothing is lost or duplicated, nothing is mixed up.

Each test runs `python -m embedfit extract` as a real subprocess and kills or interrupts it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree

from embedfit.cli import main
from embedfit.errors import StoreError
from embedfit.extraction.local import extract
from embedfit.storage import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("kill") / "images", per_class=10, seed=7)  # 30 images


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract(folder, out, workers=0, batch_size=4)
    return FeatureStore.open(out)


def _cmd(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedfit", "extract", str(folder), "-o", str(out), "--workers", "0",
            "--batch-size", "2", "--flush-every", "2", *extra]


def _start(folder: Path, out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(_cmd(folder, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def _assert_equals_reference(out: Path, reference: FeatureStore) -> None:
    store = FeatureStore.open(out)
    assert store.complete
    assert list(store.paths) == list(reference.paths)  # every image exactly once, same order
    np.testing.assert_allclose(store.features(), reference.features(), rtol=1e-5, atol=1e-5)


def _parts(out: Path) -> list[Path]:
    d = out.with_name(out.name + ".parts")
    return list(d.glob("*")) if d.is_dir() else []


def test_repeated_sigkill_then_rerun_completes_identically(folder: Path, reference: FeatureStore,
                                                            tmp_path: Path) -> None:
    """Killed right after its first part, then its re-run killed mid-way: the third run finishes the job."""
    out = tmp_path / "feats.h5"

    def finished_parts() -> int:
        return len([p for p in _parts(out) if p.name.startswith("part-")])

    for more in (1, 4):  # parts the run must add before the kill
        already = finished_parts()
        proc = _start(folder, out)
        try:
            assert _wait_for(lambda: finished_parts() >= already + more)  # noqa: B023 (used before the loop moves on)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(StoreError, match="re-run the same"):  # never committed: says how to resume
            FeatureStore.open(out)
    rerun = subprocess.run(_cmd(folder, out), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    reused = re.search(r"(\d+)\s+already\s+stored", rerun.stdout)
    assert reused and int(reused.group(1)) > 0, rerun.stdout  # the killed runs' parts were reused
    _assert_equals_reference(out, reference)
    assert not [p for p in _parts(out) if p.name.startswith("part-")]


def _store_temp_files(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*.tmp"))


def test_sigkill_during_the_store_commit_keeps_the_old_store(folder: Path, reference: FeatureStore,
                                                             tmp_path: Path) -> None:
    """A finished store exists; a run re-embeds a few images and is killed while it writes the replacement store:
    the old store must be intact, and a re-run completes and cleans up the half-written file."""
    out = tmp_path / "feats.h5"
    images = tmp_path / "images"
    shutil.copytree(folder, images)  # copy2 keeps the mtimes, so the reference store's rows still match
    for i, stale in enumerate(sorted(images.rglob("*.jpg"))[:4]):  # four images edited since: re-embedded, then
        os.utime(stale, ns=(time.time_ns(), time.time_ns() + i))    # the store is rewritten
    shutil.copy(reference.path, out)
    before = out.read_bytes()
    # The commit lasts tens of milliseconds: the store pauses it half-written (a test hook), so the kill lands there.
    proc = _start(images, out, env={**os.environ, "EMBEDFIT_TEST_COMMIT_PAUSE": "30"})
    try:
        assert _wait_for(lambda p=proc: bool(_store_temp_files(out)) or p.poll() is not None, timeout=240)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert _store_temp_files(out)  # killed with the replacement half-written
    assert out.read_bytes() == before
    assert FeatureStore.open(out).complete
    rerun = subprocess.run(_cmd(images, out), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    _assert_equals_reference(out, reference)
    assert not _store_temp_files(out)  # the killed run's half-written store was removed


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(folder: Path, reference: FeatureStore, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    proc = _start(folder, out)
    assert _wait_for(lambda: len(_parts(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0  # one line
    store = FeatureStore.open(out)
    assert not store.complete and 0 < len(store) < 30
    # resume in another process while this one keeps reading: every open succeeds, and the store never claims to
    # be complete before it holds every image
    resume = _start(folder, out)
    reads = 0
    while resume.poll() is None:
        seen = FeatureStore.open(out)
        assert not seen.complete or len(seen) == 30
        reads += 1
        time.sleep(0.05)
    _, resume_err = resume.communicate(timeout=60)
    assert resume.returncode == 0, resume_err
    assert reads > 0
    _assert_equals_reference(out, reference)


def test_second_writer_is_refused_while_readers_read(folder: Path, reference: FeatureStore, tmp_path: Path) -> None:
    """This process holds the store's writer lock; an `embedfit extract` in another process must be refused."""
    from embedfit.storage import StoreWriter

    out = tmp_path / "feats.h5"
    shutil.copy(reference.path, out)
    with StoreWriter(out, reference.settings):
        second = subprocess.run(_cmd(folder, out), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "being written by another embedfit process" in second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert FeatureStore.open(out).complete  # readers are never blocked


def test_unwritable_output_is_a_clear_error(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(_cmd(folder, blocker / "feats.h5")[3:]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and str(blocker) in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mount sized by the test (a real full disk, ENOSPC); skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def make(size_bytes: int) -> Path:
        target = tmp_path / "disk"
        target.mkdir()
        size_kb = max(64, size_bytes // 1024)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(target)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_leaves_the_existing_store_unchanged(folder: Path, reference: FeatureStore, tmp_path: Path,
                                                       small_disk) -> None:
    first = reference.path
    disk = small_disk(first.stat().st_size + 96 * 1024)  # room for the store and a few parts, not a second store
    out = disk / "feats.h5"
    shutil.copy(first, out)
    before = out.read_bytes()
    work = tmp_path / "images"
    shutil.copytree(folder, work)
    for image in sorted(work.rglob("*.png"))[:4]:  # changed files: re-embedded, so the store must be rewritten
        image.write_bytes(image.read_bytes())
        os.utime(image, ns=(time.time_ns(), time.time_ns()))
    result = subprocess.run(_cmd(work, out), capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert "previous store is unchanged" in result.stderr or "cannot write" in result.stderr
    assert out.read_bytes() == before
    assert FeatureStore.open(out).complete


def test_sigkill_of_a_sharded_run_at_any_moment_then_rerun_completes_identically(folder: Path, reference: FeatureStore,
                                                                                  tmp_path: Path) -> None:
    """`--shard-size`: killed after its first shards, then while the next run writes shards and commits; the third
    run reuses every finished shard and the store equals the single-file reference: no image lost or twice."""
    out = tmp_path / "feats.h5"
    shards = out.with_name(out.name + ".shards")

    def finished() -> int:
        return len(list(shards.glob("shard-*.h5"))) if shards.is_dir() else 0

    for more in (1, 3):
        already = finished()
        proc = subprocess.Popen(_cmd(folder, out, "--shard-size", "3"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert _wait_for(lambda: finished() >= already + more, timeout=240)  # noqa: B023
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(StoreError, match="re-run the same"):
            FeatureStore.open(out)
    kept = {p.name for p in shards.glob("shard-*.h5")}
    rerun = subprocess.run(_cmd(folder, out), capture_output=True, text=True, timeout=240)  # stays sharded
    assert rerun.returncode == 0, rerun.stderr
    reused = re.search(r"(\d+)\s+already\s+stored", rerun.stdout)
    assert reused and int(reused.group(1)) >= 3 * len(kept), rerun.stdout  # finished shards were not redone
    _assert_equals_reference(out, reference)
    store = FeatureStore.open(out)
    assert store.attrs["layout"] == "sharded" and kept <= set(json.loads(store.attrs["shards"]))
    assert not list(shards.glob(".*.tmp"))  # half-copied shards of the killed runs were removed
