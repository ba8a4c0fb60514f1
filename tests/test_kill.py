"""Killed and concurrent runs: the store always opens, nothing is lost or duplicated, nothing is mixed up.

Each test runs `python -m embedfit extract` as a real subprocess and kills or interrupts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree

from embedfit.errors import StoreError
from embedfit.extract import extract
from embedfit.store import FeatureStore

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("kill") / "images", per_class=14, seed=7)  # 42 images


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


@pytest.mark.parametrize("moment", ["first-part", "mid-run", "during-commit"])
def test_sigkill_then_rerun_completes_identically(folder: Path, reference: FeatureStore, tmp_path: Path,
                                                  moment: str) -> None:
    out = tmp_path / "feats.h5"
    if moment == "during-commit":  # a finished store exists; a second run adds images and is killed in its commit
        extract(folder, out, workers=0, batch_size=4)
        extra = folder.parent / "extra"
        extra.mkdir(exist_ok=True)
    proc = _start(folder, out)
    try:
        if moment == "first-part":
            assert _wait_for(lambda: any(p.name.startswith("part-") for p in _parts(out)))
        elif moment == "mid-run":
            assert _wait_for(lambda: len([p for p in _parts(out) if p.name.startswith("part-")]) >= 6)
        else:
            # kill the moment the new store's temporary file appears (or at the end of the run)
            _wait_for(lambda: any(p.name.endswith(".tmp") for p in out.parent.iterdir()) or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    if out.exists():
        FeatureStore.open(out)  # whatever happened, an existing store opens
    else:
        with pytest.raises(StoreError, match="re-run the same"):
            FeatureStore.open(out)
    rerun = subprocess.run(_cmd(folder, out), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    _assert_equals_reference(out, reference)
    assert not [p for p in _parts(out) if p.name.startswith("part-")]


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
    assert not store.complete and 0 < len(store) < 42
    assert subprocess.run(_cmd(folder, out), capture_output=True, timeout=240).returncode == 0
    _assert_equals_reference(out, reference)


def test_second_writer_is_refused_while_readers_read(folder: Path, reference: FeatureStore, tmp_path: Path) -> None:
    """This process holds the store's writer lock; an `embedfit extract` in another process must be refused."""
    from embedfit.store import StoreWriter

    out = tmp_path / "feats.h5"
    extract(folder, out, workers=0, batch_size=8)
    with StoreWriter(out, reference.settings):
        second = subprocess.run(_cmd(folder, out), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert "being written by another embedfit process" in second.stderr
        assert FeatureStore.open(out).complete  # readers are never blocked
    assert subprocess.run(_cmd(folder, out), capture_output=True, timeout=120).returncode == 0


def test_unwritable_output_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = subprocess.run(_cmd(folder, blocker / "feats.h5"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cannot write" in result.stderr and "Traceback" not in result.stderr


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


def test_disk_full_leaves_the_existing_store_unchanged(folder: Path, tmp_path: Path, small_disk) -> None:
    import shutil

    first = tmp_path / "first.h5"
    extract(folder, first, workers=0, batch_size=8)
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
