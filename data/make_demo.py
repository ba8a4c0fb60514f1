"""Build embedfit's demo dataset from photographs that ship inside scikit-image (nothing is downloaded).

Six texture classes, each made of random crops of one real photograph: brick, grass and gravel (skimage's
texture images), moon (the lunar surface), stars (the Hubble deep field) and tissue (an immunohistochemistry
slide). Each crop takes a random position, scale and rotation, may be mirrored, gets a mild colour, brightness
and contrast jitter and a little sensor noise, and is resampled to the saved size. Train crops come from the
top 65% of each photograph and test crops from the bottom 35%, so the splits share no pixel.

Files are mostly JPEG (varying quality) with some PNG; most are 160x160 but a few have other sizes and aspect
ratios. One deliberately truncated JPEG in train (``train/brick/corrupt_0000.jpg``) shows that a broken file is
reported, not fatal. ``new/`` holds unlabeled crops, in shuffled class order, for ``embedfit predict``.

The output is deterministic for a given ``--per-class`` and ``--seed``. Re-running over a finished folder does
nothing; ``--force`` rewrites the same files. Files the script did not name are never removed.

Usage:
    python data/make_demo.py data/demo [--per-class 60] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

SOURCES: dict[str, str] = {  # class -> the skimage.data function that returns its photograph
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "stars": "hubble_deep_field",
    "tissue": "immunohistochemistry",
}
TRAIN_SHARE = 0.65  # train crops from the top rows of each photograph, test crops from the rest
TEST_RATIO = 0.5  # test images per class = per_class * TEST_RATIO
NEW_PER_CLASS = 2  # unlabeled images in new/, per class
SQUARE_SIZE = 160  # most images are SQUARE_SIZE x SQUARE_SIZE ...
ODD_SIZES = ((224, 160), (160, 224), (256, 192), (128, 128), (200, 200))  # ... a few are (width, height)
ODD_SHARE = 0.15
PNG_SHARE = 0.15
WINDOW = (28, 84)  # side of the cropped source window, in source pixels (before rotation)
CORRUPT = Path("train", next(iter(SOURCES)), "corrupt_0000.jpg")  # train/brick/corrupt_0000.jpg
MARKER = ".complete"


class Item(NamedTuple):
    """One image to write.

    Attributes:
        path: Where it goes, relative to the output folder.
        label: Its class (for new/ too: the class is only hidden by the file name).
        split: "train", "test" or "new"; picks the source rows.
        key: Seeds this image's own random stream, so each file is independent of the others.
        size: (width, height) as saved.
    """

    path: Path
    label: str
    split: str
    key: tuple[int, ...]
    size: tuple[int, int]


def plan(per_class: int, seed: int) -> list[Item]:
    """Every image the dataset holds, in writing order, without rendering any.

    Args:
        per_class: Train images per class; test gets ``per_class * TEST_RATIO`` (at least 1).
        seed: The dataset's seed.

    Returns:
        The items; their paths, formats and sizes depend only on ``per_class`` and ``seed``.
    """
    counts = {"train": per_class, "test": max(1, round(per_class * TEST_RATIO))}
    items = []
    for c, label in enumerate(SOURCES):
        for s, (split, n) in enumerate(counts.items()):
            for i in range(n):
                key = (seed, c, s, i)
                suffix, size = _format(np.random.default_rng(key))
                items.append(Item(Path(split, label, f"{label}_{i:04d}{suffix}"), label, split, key, size))
    hidden = np.random.default_rng((seed, 99)).permutation(list(range(len(SOURCES))) * NEW_PER_CLASS)
    labels = list(SOURCES)
    for j, c in enumerate(hidden):  # all JPEG, square: the README's `classify new/image_00.jpg` relies on it
        items.append(Item(Path("new", f"image_{j:02d}.jpg"), labels[c], "new", (seed, int(c), 2, j),
                          (SQUARE_SIZE, SQUARE_SIZE)))
    return items


def _format(rng: np.random.Generator) -> tuple[str, tuple[int, int]]:
    """A file suffix and (width, height): mostly a square JPEG, sometimes PNG, sometimes another shape."""
    suffix = ".png" if rng.random() < PNG_SHARE else ".jpg"
    odd = rng.random() < ODD_SHARE
    size = ODD_SIZES[int(rng.integers(len(ODD_SIZES)))] if odd else (SQUARE_SIZE, SQUARE_SIZE)
    return suffix, size


@cache
def load_source(label: str) -> np.ndarray:
    """The class's photograph as an RGB uint8 array, from scikit-image's bundled data.

    Args:
        label: A key of ``SOURCES``.

    Returns:
        An (H, W, 3) uint8 array (grey photographs are repeated over the three channels).
    """
    import skimage.data

    loader: Callable[[], np.ndarray] = getattr(skimage.data, SOURCES[label])
    img = np.asarray(loader())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def source_rows(label: str, split: str) -> np.ndarray:
    """The part of the class's photograph a split may crop from: top rows for train, bottom rows otherwise."""
    img = load_source(label)
    cut = int(img.shape[0] * TRAIN_SHARE)
    return img[:cut] if split == "train" else img[cut:]


def render(item: Item, seed_stream: int = 1) -> Image.Image:
    """Crop, rotate, mirror, jitter and resize one image.

    Args:
        item: What to draw; its ``key`` seeds the randomness.
        seed_stream: Extra seed component, so a second image (the corrupt one) can reuse a key.

    Returns:
        An RGB image of ``item.size``.
    """
    rng = np.random.default_rng((*item.key, seed_stream))
    band = source_rows(item.label, item.split)
    width, height = item.size
    side = rng.uniform(*WINDOW)  # the crop's longer side, in source pixels
    w, h = (side, side * height / width) if width >= height else (side * width / height, side)
    reach = math.ceil(math.hypot(w, h)) + 2  # a window that stays filled under any rotation
    reach = min(reach, band.shape[0], band.shape[1])
    y = int(rng.integers(0, band.shape[0] - reach + 1))
    x = int(rng.integers(0, band.shape[1] - reach + 1))
    window = Image.fromarray(band[y:y + reach, x:x + reach])
    rotated = window.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    box = ((reach - w) / 2, (reach - h) / 2, (reach + w) / 2, (reach + h) / 2)
    crop = rotated.resize(item.size, Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return Image.fromarray(jitter(np.asarray(crop), rng))


def jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild photometric changes: brightness, contrast, a colour cast and a little noise.

    Args:
        pixels: (H, W, 3) uint8.
        rng: The image's random stream.

    Returns:
        The changed (H, W, 3) uint8 array.
    """
    x = pixels.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.75, 1.25) + mean * rng.uniform(0.75, 1.25)  # contrast, brightness
    x *= rng.uniform(0.93, 1.07, size=3)  # colour cast
    x += rng.normal(0.0, rng.uniform(0.0, 8.0), size=x.shape)  # sensor noise
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def encode(image: Image.Image, suffix: str, rng: np.random.Generator) -> bytes:
    """The image as JPEG (quality 70–95) or PNG bytes."""
    buffer = io.BytesIO()
    if suffix == ".png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def corrupt_bytes(items: list[Item]) -> bytes:
    """A JPEG of the first class cut in half, as an interrupted copy leaves it (Pillow fails at ``load()``)."""
    first = next(it for it in items if it.split == "train")
    data = encode(render(first, seed_stream=2), ".jpg", np.random.default_rng((*first.key, 3)))
    return data[: len(data) // 2]


def build(out: Path, per_class: int, seed: int) -> dict[str, int]:
    """Write every planned file under ``out`` and drop stale ones from earlier, larger builds.

    Args:
        out: The output folder (created if needed).
        per_class: Train images per class.
        seed: The dataset's seed.

    Returns:
        Image counts per split (the corrupt file included in train).
    """
    items = plan(per_class, seed)
    for item in items:
        path = out / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(render(item), item.path.suffix, np.random.default_rng((*item.key, 4))))
    (out / CORRUPT).write_bytes(corrupt_bytes(items))
    expected = {out / it.path for it in items} | {out / CORRUPT}
    for path in _our_files(out):
        if path not in expected:
            path.unlink()
    counts = {"train": 0, "test": 0, "new": 0}
    for path in expected:
        counts[path.relative_to(out).parts[0]] += 1
    return counts


def _our_files(out: Path) -> Iterator[Path]:
    """Files under ``out`` that follow this script's naming scheme (a user's own files are left alone)."""
    patterns = {out / "new": r"image_\d{2,}\.(?:jpg|png)"}
    for split in ("train", "test"):
        for label in SOURCES:
            patterns[out / split / label] = rf"(?:{label}|corrupt)_\d{{4,}}\.(?:jpg|png)"
    for folder, pattern in patterns.items():
        if folder.is_dir():
            yield from (p for p in sorted(folder.iterdir()) if p.is_file() and re.fullmatch(pattern, p.name))


def is_built(out: Path, per_class: int, seed: int) -> bool:
    """Whether ``out`` already holds this exact build: the marker matches and every planned file exists."""
    marker = out / MARKER
    if not marker.is_file() or marker.read_text() != _marker_text(per_class, seed):
        return False
    return (out / CORRUPT).is_file() and all((out / it.path).is_file() for it in plan(per_class, seed))


def _marker_text(per_class: int, seed: int) -> str:
    """What ``.complete`` holds for a finished build with these settings."""
    return json.dumps({"per_class": per_class, "seed": seed, "classes": list(SOURCES)})


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder, e.g. data/demo")
    parser.add_argument("--per-class", type=int, default=60, help="train images per class (test gets half)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the data is already there")
    args = parser.parse_args(argv)
    if args.per_class < 2:
        parser.error("--per-class must be at least 2")
    if not args.force and is_built(args.out, args.per_class, args.seed):
        print(f"demo data already in {args.out}")
        return 0
    start = time.perf_counter()
    (args.out / MARKER).unlink(missing_ok=True)
    counts = build(args.out, args.per_class, args.seed)
    (args.out / MARKER).write_text(_marker_text(args.per_class, args.seed))
    print(f"demo data in {args.out}: {len(SOURCES)} classes ({', '.join(SOURCES)}); "
          f"{counts['train']} train (1 deliberately corrupt), {counts['test']} test, {counts['new']} unlabeled "
          f"[{time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
