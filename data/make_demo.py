"""Build embedfit's demo dataset from images that ship inside scikit-image (no downloads).

Five texture classes, as random crops of real photographs: brick, grass, gravel (skimage's texture images),
tissue (an immunohistochemistry slide) and stars (the Hubble deep field). Train crops come from the top 65% of
each photograph and test crops from the bottom 35%, so no pixel is shared between the splits. Crops vary in
size, orientation, brightness and format (mostly JPEG, some PNG); one deliberately truncated JPEG in train
shows that broken files are reported, not fatal. `new/` holds unlabeled crops for `embedfit predict`.

Usage:
    python data/make_demo.py data/demo [--per-class 60] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = {  # class -> skimage.data function
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "tissue": "immunohistochemistry",
    "stars": "hubble_deep_field",
}
TRAIN_SHARE = 0.65


def load_source(name: str) -> np.ndarray:
    """An RGB uint8 photograph from scikit-image's bundled data."""
    import skimage.data

    img = getattr(skimage.data, SOURCES[name])()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def random_crop(img: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A small crop from the given row band: randomly sized, rotated, flipped, jittered, blurred and noisy.

    Small, degraded crops keep the task from being trivial, so the demo's confusion matrix has something in it.
    """
    from PIL import ImageFilter

    band = img[rows[0]:rows[1]]
    size = int(rng.integers(32, min(96, band.shape[0], band.shape[1]) + 1))
    y = int(rng.integers(0, band.shape[0] - size + 1))
    x = int(rng.integers(0, band.shape[1] - size + 1))
    crop = np.rot90(band[y:y + size, x:x + size], k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(0.6, 1.4) * rng.uniform(0.85, 1.15, size=3)
    crop = crop.astype(np.float32) * gain + rng.normal(0, rng.uniform(0, 25), size=crop.shape)
    blurred = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0, 2.0)))
    return np.asarray(blurred)


def save(crop: np.ndarray, path_stem: Path, rng: np.random.Generator) -> Path:
    """Mostly JPEG (varying quality), one in five PNG."""
    image = Image.fromarray(np.ascontiguousarray(crop))
    if rng.random() < 0.2:
        path = path_stem.with_suffix(".png")
        image.save(path, optimize=False)
    else:
        path = path_stem.with_suffix(".jpg")
        image.save(path, quality=int(rng.integers(50, 95)))
    return path


def build(out: Path, per_class: int, seed: int) -> dict[str, int]:
    """Write train/, test/ and new/ under `out`; returns image counts per split."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0, "new": 0}
    (out / "new").mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(sorted(SOURCES)):
        img = load_source(name)
        cut = int(img.shape[0] * TRAIN_SHARE)
        for split, rows, n in (("train", (0, cut), per_class), ("test", (cut, img.shape[0]), per_class // 2)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save(random_crop(img, rows, rng), folder / f"{name}_{i:04d}", rng)
                counts[split] += 1
        for i in range(2):  # unlabeled images for `embedfit predict`
            save(random_crop(img, (cut, img.shape[0]), rng), out / "new" / f"image_{label * 2 + i:02d}", rng)
            counts["new"] += 1
    # One broken file: a JPEG cut in half, as a failed copy leaves it.
    good = (out / "train" / "brick" / "brick_0000").with_suffix(".jpg")
    source = good if good.exists() else next((out / "train" / "brick").glob("*.jpg"))
    data = source.read_bytes()
    (out / "train" / "brick" / "corrupt_0000.jpg").write_bytes(data[: len(data) // 2])
    counts["train"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder, e.g. data/demo")
    parser.add_argument("--per-class", type=int, default=60, help="train images per class (test gets half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the data is already there")
    args = parser.parse_args(argv)
    if args.per_class < 2:
        parser.error("--per-class must be at least 2")
    marker = args.out / ".complete"
    if marker.exists() and marker.read_text() == f"{args.per_class} {args.seed}" and not args.force:
        print(f"demo data already in {args.out}")
        return 0
    for split in ("train", "test", "new"):
        shutil.rmtree(args.out / split, ignore_errors=True)
    counts = build(args.out, args.per_class, args.seed)
    marker.write_text(f"{args.per_class} {args.seed}")
    print(f"demo data in {args.out}: {len(SOURCES)} classes ({', '.join(sorted(SOURCES))}); "
          f"{counts['train']} train (1 deliberately corrupt), {counts['test']} test, {counts['new']} unlabeled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
