"""Shared helpers for the benchmarks: generated photo-like JPEGs, hardware description, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Overridable so that the harness can be exercised (tests) without touching the recorded results.
RESULTS = Path(os.environ.get("EMBEDFIT_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = Path(os.environ.get("EMBEDFIT_BENCH_CACHE", Path(__file__).parent / ".cache"))


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradients, a few blobs and sensor-like noise: JPEG-compresses like a photograph."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(a * xx / width * 6 + p) * np.cos(b * yy / height * 6)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _save_shifted(args: tuple[np.ndarray, int, Path]) -> None:
    base, shift, path = args
    Image.fromarray(np.roll(base, shift, axis=1) if shift else base).save(path, quality=90)


def jpeg_folder(n: int, width: int, height: int, seed: int = 0) -> Path:
    """n generated JPEGs (quality 90) of one size, cached between runs; returns the folder."""
    from concurrent.futures import ProcessPoolExecutor

    folder = CACHE / f"jpeg_{width}x{height}_{n}_{seed}"
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = [np.asarray(photo_like(width, height, rng)) for _ in range(min(n, 16))]
    # A few distinct images, re-encoded with a shift so files differ; saved in parallel (JPEG encoding is slow).
    jobs = [(base[i % len(base)], i if i >= len(base) else 0, folder / f"img_{i:05d}.jpg") for i in range(n)]
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_save_shifted, jobs, chunksize=8))
    return folder


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"hardware": hardware(), "when": time.strftime("%Y-%m-%d %H:%M"), **payload},
                               indent=2))
    return path
