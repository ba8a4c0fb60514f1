"""data/make_demo.py: layout, counts, determinism, idempotence, and exactly one broken image."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytestmark = pytest.mark.fast

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "make_demo.py"
CLASSES = ["brick", "grass", "gravel", "moon", "stars", "tissue"]
PER_CLASS = 4  # train per class; test gets half
CORRUPT = "train/brick/corrupt_0000.jpg"


def make_demo(out: Path, *args: str) -> str:
    """Run the script as `make demo` does (a fresh interpreter) and return its stdout."""
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--per-class", str(PER_CLASS), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden marker included), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def images(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if not k.startswith(".")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One build shared by the read-only checks: (folder, the script's output)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, make_demo(out)


@pytest.fixture(scope="module")
def module() -> dict[str, Any]:
    """The script's functions, loaded without running main."""
    return runpy.run_path(str(SCRIPT), run_name="make_demo")


def test_layout_and_counts(built: tuple[Path, str]) -> None:
    out, stdout = built
    n_test = PER_CLASS // 2
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == CLASSES
    for cls in CLASSES:
        extra = 1 if cls == "brick" else 0  # the corrupt file
        assert len(list((out / "train" / cls).iterdir())) == PER_CLASS + extra
        assert len(list((out / "test" / cls).iterdir())) == n_test
    new = sorted(p.name for p in (out / "new").iterdir())
    assert new == [f"image_{i:02d}.jpg" for i in range(2 * len(CLASSES))]  # README: new/image_00.jpg
    assert {p.suffix for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")} <= {".jpg", ".png"}
    assert (out / CORRUPT).is_file()
    total_train = len(CLASSES) * PER_CLASS + 1
    assert f"{len(CLASSES)} classes ({', '.join(CLASSES)})" in stdout
    assert f"{total_train} train" in stdout and f"{len(CLASSES) * n_test} test" in stdout and str(out) in stdout


def test_every_image_decodes_except_the_corrupt_one(built: tuple[Path, str]) -> None:
    out, _ = built
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for path in files:
        if path.relative_to(out).as_posix() == CORRUPT:
            continue
        with Image.open(path) as img:
            img.load()
            assert img.mode == "RGB" and min(img.size) >= 128 and max(img.size) <= 256, path
            assert img.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix], path
    with Image.open(out / CORRUPT) as img, pytest.raises(OSError):  # the header parses; the pixels do not
        img.load()


def test_deterministic_and_idempotent(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    first = snapshot(out)
    again = tmp_path / "again"
    make_demo(again)
    assert snapshot(again) == first  # same seed, fresh folder: byte-identical

    (again / "train" / "brick" / "my_photo.jpg").write_bytes(b"user data")
    assert "demo data already in" in make_demo(again)
    assert "demo data in" in make_demo(again, "--force")
    rebuilt = snapshot(again)
    assert rebuilt.pop("train/brick/my_photo.jpg") == b"user data"  # never deletes what it did not write
    assert rebuilt == first

    other = tmp_path / "other"
    make_demo(other, "--seed", "1")
    theirs, ours = images(snapshot(other)), images(first)
    common = theirs.keys() & ours.keys()
    assert common and all(theirs[k] != ours[k] for k in common)  # another seed, other pixels


def test_smaller_rebuild_drops_stale_files_only(tmp_path: Path, module: dict[str, Any]) -> None:
    out = tmp_path / "demo"
    module["main"]([str(out), "--per-class", "6"])
    (out / "test" / "grass" / "notes.txt").write_text("mine")
    module["main"]([str(out), "--per-class", "2"])
    assert len(list((out / "train" / "grass").glob("grass_*"))) == 2
    assert len(list((out / "test" / "grass").glob("grass_*"))) == 1
    assert (out / "test" / "grass" / "notes.txt").read_text() == "mine"


def test_default_plan_mixes_formats_and_shapes(module: dict[str, Any]) -> None:
    items = module["plan"](60, 0)
    labelled = [it for it in items if it.split != "new"]
    assert len(labelled) == len(CLASSES) * 90 and sum(it.split == "new" for it in items) == 2 * len(CLASSES)
    png = sum(it.path.suffix == ".png" for it in labelled) / len(labelled)
    odd = sum(it.size != (160, 160) for it in labelled) / len(labelled)
    assert 0.05 < png < 0.3 and 0.05 < odd < 0.3


def test_train_and_test_crop_disjoint_rows(module: dict[str, Any]) -> None:
    for cls in CLASSES:
        full = module["load_source"](cls)
        train, test = module["source_rows"](cls, "train"), module["source_rows"](cls, "test")
        assert train.shape[0] + test.shape[0] == full.shape[0]
        assert (train == full[: train.shape[0]]).all() and (test == full[train.shape[0]:]).all()
        assert min(test.shape[:2]) > 1.42 * module["WINDOW"][1]  # any rotated crop window fits the test rows
