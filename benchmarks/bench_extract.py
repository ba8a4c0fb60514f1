"""Extraction speed, side by side on the same images in one run.

1. naive: the tutorial loop (PIL open -> torchvision transform -> model, one image at a time, fp32, NCHW);
2. embedfit: `embedfit.extract` end to end from files on disk (steady state: setup measured separately);
3. compute ceiling: the same model on pre-decoded, pre-resized uint8 tensors, same batch/precision/layout;
4. input ceiling: decode + resize alone with the same number of worker processes.

Usage:
    python benchmarks/bench_extract.py --images 200 --size 500x375 --size 3000x2000
    python benchmarks/bench_extract.py --device cuda --precision bf16 --backbone resnet50 --images 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from _common import hardware, jpeg_folder, save
from torch.utils.data import DataLoader

from embedfit.backbones import create_backbone
from embedfit.extract import (
    Encoder,
    ExtractConfig,
    ImageDataset,
    _collate,
    default_batch_size,
    default_workers,
    extract,
    resolve_device,
)
from embedfit.images import scan_images


def naive(paths: list[Path], backbone, device: torch.device) -> float:
    from PIL import Image
    from torchvision import transforms

    spec = backbone.spec
    tf = transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=transforms.InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(spec.input_size), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    model = backbone.trunk.to(device).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = tf(Image.open(p).convert("RGB"))[None].to(device)
            model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def end_to_end(folder: Path, config: ExtractConfig) -> tuple[float, float]:
    """Steady-state img/s of `extract`, and its fixed setup time (imports excluded, model load included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "feats.h5"
        start = time.perf_counter()
        summary = extract(folder, out, config)
        total = time.perf_counter() - start
        start = time.perf_counter()
        extract(folder, out, dataclasses.replace(config, overwrite=False))  # all reused: the fixed cost only
        setup = time.perf_counter() - start
    return summary.embedded / max(total - setup, 1e-9), setup


def compute_ceiling(encoder: Encoder, n: int, batch_size: int) -> float:
    size = encoder.spec.input_size
    x = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8)
    encoder(x)  # warm-up (cudnn autotune, allocator)
    batches = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        encoder(x)
    return batches * batch_size / (time.perf_counter() - start)


def input_ceiling(folder: Path, spec, workers: int, batch_size: int) -> float:
    records = scan_images(folder).records
    loader = DataLoader(ImageDataset(records, spec), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    n = sum(len(b[0]) for b in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", action="append", help="WIDTHxHEIGHT, repeatable (default 500x375 and 3000x2000)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embedfit's (8 on CPU, 64 on GPU)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--naive-images", type=int, default=None, help="images for the slow naive loop")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workers = default_workers(device) if args.workers is None else args.workers
    args.batch_size = args.batch_size or default_batch_size(device)
    config = ExtractConfig(backbone=args.backbone, device=args.device, batch_size=args.batch_size, workers=workers,
                           precision=args.precision, overwrite=True)
    backbone = create_backbone(args.backbone)
    encoder = Encoder(create_backbone(args.backbone), device, precision=args.precision)
    print(f"hardware: {hardware()}")
    print(f"{args.backbone}, batch {args.batch_size}, {args.precision}, workers {workers}, device {device}")
    compute = compute_ceiling(encoder, max(args.images, 4 * args.batch_size), args.batch_size)
    rows = []
    for size in args.size or ["500x375", "3000x2000"]:
        w, h = map(int, size.split("x"))
        folder = jpeg_folder(args.images, w, h)
        paths = sorted(folder.glob("*.jpg"))
        n_naive = args.naive_images or min(len(paths), 60 if w * h > 2e6 else 120)
        naive_rate = naive(paths[:n_naive], backbone, device)
        e2e, setup = end_to_end(folder, config)
        inputs = input_ceiling(folder, backbone.spec, workers, args.batch_size)
        row = {"size": size, "images": args.images, "naive": naive_rate, "embedfit": e2e, "compute_ceiling": compute,
               "input_ceiling": inputs, "setup_seconds": setup, "vs_naive": e2e / naive_rate,
               "vs_compute": e2e / compute, "vs_bound": e2e / min(compute, inputs)}
        rows.append(row)
        print(f"{size:>10}: naive {naive_rate:6.1f} | embedfit {e2e:6.1f} | compute ceiling {compute:6.1f} | "
              f"input ceiling {inputs:6.1f} img/s || embedfit/naive {row['vs_naive']:.2f}x, "
              f"/compute {row['vs_compute']:.0%}, /min(compute,input) {row['vs_bound']:.0%} (setup {setup:.1f} s)")
    path = save(f"extract_{args.backbone}_{device.type}_{args.precision}",
                {"backbone": args.backbone, "batch_size": args.batch_size, "precision": args.precision,
                 "workers": workers, "device": str(device), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
