"""Extraction speed, side by side on the same images in one run.

1. naive: the tutorial loop (PIL open -> torchvision transform -> model on one image at a time, fp32, NCHW);
2. embedfit: `embedfit.extract()` end to end from files on disk (steady state: the marginal rate between a run
   over the first fifth of the images and one over all, so start-up costs cancel; the whole-run rate and the
   fixed cost are reported too),
   once per `--decode` (pil: DataLoader workers decode; device: JPEG bytes decoded on the model's device);
3. compute ceiling: the same model on pre-decoded, pre-resized uint8 tensors, same batch/precision/layout;
4. input ceiling: decode + resize alone with the same number of worker processes (and, for --decode device,
   file reading in the workers plus decode + resize on the device).

`--ablations` adds a table of the compute ceiling with each technique switched off or on (layout, precision,
batch size, torch.compile), so that what each one buys is measured rather than assumed, and per image size the
cost of preparing one image on one thread: Pillow decoding + torchvision's transforms on the PIL image, against
embedfit's decoding and preprocessing; on a CPU also `extract` on the first image size, alternating runs, with the
decoding workers at normal priority against the lowest (the default), and handing over the model's batch of
images at a time against 64 (the default).

Usage:
    python benchmarks/bench_extract.py --images 200 --size 500x375 --size 3000x2000
    python benchmarks/bench_extract.py --device cuda --precision bf16 --backbone resnet50 --random-weights \\
        --images 4000 --decode pil --decode device --ablations
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import hardware, jpeg_folder, save

from embedfit.backbones.factory import create_backbone
from embedfit.extraction.encoder import Encoder, _device_batch
from embedfit.extraction.local import extract
from embedfit.extraction.reader import ImageDataset, image_loader
from embedfit.extraction.settings import (
    TRANSFER_IMAGES,
    ExtractConfig,
    default_batch_size,
    default_workers,
    resolve_device,
)
from embedfit.images import scan_images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(paths: list[Path], backbone, device: torch.device) -> float:
    from PIL import Image
    from torchvision import transforms

    spec = backbone.spec
    tf = transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=transforms.InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(spec.input_size), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    model = backbone.trunk.to(device).eval()
    with torch.inference_mode():
        model(tf(Image.open(paths[0]).convert("RGB"))[None].to(device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for p in paths:
            model(tf(Image.open(p).convert("RGB"))[None].to(device)).cpu()
    return len(paths) / (time.perf_counter() - start)


def end_to_end(folder: Path, config: ExtractConfig, tmp: Path) -> tuple[float, float, float]:
    """`extract` from files on disk: (steady-state img/s, fixed cost in s, whole-run img/s).

    The steady state is the marginal rate between two whole runs, one over the first fifth of the images (a CSV
    list) and one over all of them: (N - N/5) / (T_N - T_N/5). Start-up (model load, worker start, cuDNN
    autotuning, compilation) and the images the workers decode ahead of the model cancel out, which a rate over
    the second part of one run does not do: with workers handing over 64 images at a time, that window would
    start with up to a few hundred images already decoded. The fixed cost is T_N - N / steady.
    """
    paths = sorted(p.name for p in folder.iterdir() if p.suffix == ".jpg")
    head = tmp / "first_fifth.csv"
    head.write_text("path\n" + "".join(f"{folder / name}\n" for name in paths[: max(1, len(paths) // 5)]))
    times, counts = [], []
    for source in (head, folder):
        start = time.perf_counter()
        summary = extract(source, tmp / "feats.h5", config)
        times.append(time.perf_counter() - start)
        counts.append(summary.embedded)
    steady = (counts[1] - counts[0]) / (times[1] - times[0]) if times[1] > times[0] else float("nan")
    return steady, max(times[1] - counts[1] / steady, 0.0), counts[1] / times[1]


def compute_ceiling(encoder: Encoder, n: int, batch_size: int, repeats: int = 3) -> float:
    """The model alone on one pre-made uint8 batch, one batch in flight as in `iter_embeddings`: the best of
    `repeats` timed passes over `n` images (a ceiling, so the best pass, not the mean)."""
    size = encoder.spec.input_size
    x = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8)
    if encoder.device.type == "cuda":
        x = x.pin_memory()
    for _ in range(5):  # warm-up (cudnn autotune, allocator, compilation, thread pools)
        encoder(x)
    batches = max(3, n // batch_size)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        pending = None
        for _ in range(batches):
            out = encoder.embed(x)
            if pending is not None:
                pending.cpu()
            pending = out
        pending.cpu()
        best = max(best, batches * batch_size / (time.perf_counter() - start))
    return best


def input_ceiling(folder: Path, encoder: Encoder, workers: int, batch_size: int, decode: str = "pil") -> float:
    """Decode + resize alone through the same DataLoader set-up; the rate after the first fifth of the images.

    Nothing here waits for the decoders' output, so little is decoded ahead and one run's second part suffices."""
    records = scan_images(folder).records
    dataset = ImageDataset(records, encoder.spec, raw_jpeg=decode == "device")
    n, warm = 0, None
    for loaded in image_loader(dataset, batch_size, workers, encoder.device):
        if decode == "device":
            for batch in loaded.split(batch_size):
                _device_batch(batch, encoder, dataset)
        elif encoder.device.type == "cuda" and loaded.images is not None:
            loaded.images.to(encoder.device, non_blocking=True)  # the copy is part of the input path on a GPU
        n += len(loaded.index)
        if warm is None and n >= len(records) / 5:
            _sync(encoder.device)
            warm = (time.perf_counter(), n)
    _sync(encoder.device)
    return (n - warm[1]) / max(time.perf_counter() - warm[0], 1e-9) if n > warm[1] else float("nan")


def measure(naive_rate: float, e2e: float, whole: float, setup: float, compute: float, inputs: float,
            device: torch.device, workers: int, cores: int) -> dict:
    """One round's figures for one image set, with the bound that applies and the ratios."""
    bound, kind = min((compute, "compute"), (inputs, "input"))
    if device.type == "cpu" and workers:
        # On a CPU the model already uses every core, so decoding cannot run beside it for free: the best is the
        # two phases back to back, decoding spread over all cores.
        bound, kind = 1 / (1 / compute + workers / (cores * inputs)), "shared cores"
    return {"naive": naive_rate, "embedfit": e2e, "embedfit_whole_run": whole, "compute_ceiling": compute,
            "input_ceiling": inputs, "bound_images_per_second": bound, "setup_seconds": setup, "bound": kind,
            "vs_naive": e2e / naive_rate, "vs_compute": e2e / compute, "vs_bound": e2e / bound}


def summarise(rounds: list[dict]) -> dict:
    """Medians over rounds: rates as the median rate, ratios as the median of the rounds' ratios (a ratio of
    medians would pair figures from different moments of a noisy machine)."""
    out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "bound"}
    out["bound"] = rounds[0]["bound"]
    out["embedfit_min"] = min(r["embedfit"] for r in rounds)
    out["embedfit_max"] = max(r["embedfit"] for r in rounds)
    out["rounds"] = rounds
    return out


def line(m: dict) -> str:
    return (f"naive {m['naive']:7.1f} | embedfit {m['embedfit']:7.1f} | compute ceiling {m['compute_ceiling']:7.1f} | "
            f"input ceiling {m['input_ceiling']:7.1f} | bound {m['bound_images_per_second']:7.1f} img/s || "
            f"embedfit/naive {m['vs_naive']:.2f}x, /compute {m['vs_compute']:.0%}, /bound {m['vs_bound']:.0%} "
            f"({m['bound']}-bound; fixed cost {m['setup_seconds']:.1f} s, "
            f"whole run {m['embedfit_whole_run']:.1f} img/s)")


def end_to_end_ablation(folder: Path, config: ExtractConfig, tmp: Path, variants: dict[str, dict[str, object]],
                        repeats: int = 6) -> dict[str, list[float]]:
    """`extract` end to end (steady-state img/s) under each variant of module settings of `embedfit.extraction`
    (a name is patched in whichever of its modules defines it), alternating `repeats` times so that every variant
    sees the same drift of the machine."""
    from embedfit.extraction import reader
    from embedfit.extraction import settings as extraction_settings

    def module_of(name: str) -> object:
        return reader if name in vars(reader) and name not in vars(extraction_settings) else extraction_settings

    rates: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, settings in variants.items():
            saved = {name: getattr(module_of(name), name) for name in settings}
            try:
                for name, value in settings.items():
                    setattr(module_of(name), name, value)
                rates[label].append(end_to_end(folder, config, tmp)[0])
            finally:
                for name, value in saved.items():
                    setattr(module_of(name), name, value)
    return rates


def cpu_ablations(folder: Path, config: ExtractConfig, tmp: Path) -> dict[str, dict[str, list[float]]]:
    """What two CPU settings of the decoding workers buy end to end: their priority, and how many images they
    hand over at once (the model's batch against `TRANSFER_IMAGES`)."""
    batch = config.batch_size or 8
    return {
        "worker priority": end_to_end_ablation(folder, config, tmp, {
            "workers at normal priority": {"worker_niceness": lambda device: 0},
            "workers at the lowest priority (default)": {}}),
        "handover size": end_to_end_ablation(folder, config, tmp, {
            f"workers hand over {batch} images (the model's batch)": {"TRANSFER_IMAGES": batch},
            f"workers hand over {TRANSFER_IMAGES} images (default)": {}}),
    }


def ablations(backbone_name: str, weights: str | None, device: torch.device, n: int) -> list[dict]:
    """Compute ceiling with one technique changed at a time (img/s)."""
    rows = []
    gpu = device.type == "cuda"
    variants = [("PyTorch fp32, NCHW, batch 8", "fp32", False, 8, False),
                ("PyTorch fp32, channels_last, batch 8", "fp32", True, 8, False)]
    if gpu:
        variants = [("fp32, NCHW, batch 64", "fp32", False, 64, False),
                    ("fp32, channels_last, batch 64", "fp32", True, 64, False),
                    ("bf16, NCHW, batch 64", "bf16", False, 64, False),
                    ("bf16, channels_last, batch 64", "bf16", True, 64, False),
                    ("fp16, channels_last, batch 64", "fp16", True, 64, False),
                    ("bf16, channels_last, batch 16", "bf16", True, 16, False),
                    ("bf16, channels_last, batch 256", "bf16", True, 256, False),
                    ("bf16, channels_last, batch 256, torch.compile", "bf16", True, 256, True)]
    else:
        variants += [("PyTorch bf16, channels_last, batch 8", "bf16", True, 8, False),
                     ("PyTorch fp32, channels_last, batch 32", "fp32", True, 32, False),
                     ("ONNX Runtime fp32, batch 1", "fp32", False, 1, "onnx"),
                     ("ONNX Runtime fp32, batch 8", "fp32", False, 8, "onnx"),
                     ("ONNX Runtime fp32, batch 32", "fp32", False, 32, "onnx")]
    for label, precision, channels_last, batch, how in variants:
        start = time.perf_counter()
        try:
            enc = Encoder(create_backbone(backbone_name, weights=weights), device, precision=precision,
                          channels_last=channels_last, compile=how is True,
                          runtime="onnx" if how == "onnx" else "torch")
            rate = compute_ceiling(enc, max(n, 20 * batch), batch)
        except Exception as exc:  # e.g. a compiler missing on this machine: report, keep going
            print(f"  {label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        rows.append({"variant": label, "images_per_second": rate, "seconds_incl_setup": time.perf_counter() - start})
        print(f"  {label:<48} {rate:9.1f} img/s")
    return rows


def input_ms(backbone, paths: list[Path], repeats: int = 3) -> dict[str, float]:
    """Read + decode + resize + centre crop of one image to a uint8 tensor, on one thread (ms, best of `repeats`
    passes, the variants interleaved): Pillow decoding (with JPEG draft, as embedfit uses it) followed by
    torchvision's transforms on the PIL image, against embedfit's `ImageDataset` (plain JPEGs decoded by
    torchvision's libjpeg-turbo, uint8 resize by torch). This per-image cost is what sets the input ceiling."""
    from embedfit.images import decode_image

    dataset = ImageDataset(scan_images(paths[0].parent).records[:len(paths)], backbone.spec)
    pre = dataset.preprocess
    variants = {"PIL decode + torchvision transforms":
                lambda i: pre._transform(decode_image(dataset.records[i].path, draft_size=dataset.draft)),
                "embedfit ImageDataset": dataset.decode}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the decoding workers
    best = dict.fromkeys(variants, float("inf"))
    try:
        for _ in range(repeats):
            for label, fn in variants.items():
                start = time.perf_counter()
                for i in range(len(dataset)):
                    fn(i)
                best[label] = min(best[label], (time.perf_counter() - start) / len(dataset))
    finally:
        torch.set_num_threads(threads)
    return {label: t * 1e3 for label, t in best.items()}


def random_weights(name: str, folder: Path) -> str:
    """A saved random-init state dict of a torchvision model, for speed runs where the pretrained file cannot be
    downloaded (speed does not depend on the weights' values)."""
    import torchvision

    path = folder / f"{name}_random.pt"
    torch.save(torchvision.models.get_model(name).state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--large-images", type=int, default=None, help="images for sizes over 2 MP (default --images)")
    parser.add_argument("--size", action="append", help="WIDTHxHEIGHT, repeatable (default 500x375 and 3000x2000)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true", help="random init (no pretrained file needed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embedfit's (8 on CPU, 128 on GPU)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"])
    parser.add_argument("--decode", action="append", choices=["pil", "device"], help="repeatable (default pil)")
    parser.add_argument("--naive-images", type=int, default=None, help="images for the slow naive loop")
    parser.add_argument("--ablations", action="store_true", help="also time the compute ceiling per technique")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure everything this many times, interleaved; report medians (default 3)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cores = hardware()["cores"]
    args.batch_size = args.batch_size or default_batch_size(device)
    decoders = args.decode or ["pil"]
    tmp = Path(tempfile.mkdtemp())
    weights = random_weights(args.backbone, tmp) if args.random_weights else None
    backbone = create_backbone(args.backbone, weights=weights)
    encoder = Encoder(create_backbone(args.backbone, weights=weights), device, precision=args.precision,
                      runtime=args.runtime)
    workers = default_workers(device, encoder.runtime) if args.workers is None else args.workers
    config = ExtractConfig(backbone=args.backbone, weights=weights, device=args.device, batch_size=args.batch_size,
                           workers=workers, precision=args.precision, runtime=args.runtime, overwrite=True)
    print(f"hardware: {hardware()}")
    print(f"{args.backbone}, batch {args.batch_size}, {args.precision}, workers {workers}, device {device}, "
          f"runtime {encoder.runtime}")
    sets = []  # (size, n, folder, paths, n_naive): made once, measured in every round
    for size in args.size or ["500x375", "3000x2000"]:
        w, h = map(int, size.split("x"))
        n = args.large_images if (args.large_images and w * h > 2e6) else args.images
        folder = jpeg_folder(n, w, h)
        paths = sorted(folder.glob("*.jpg"))
        sets.append((size, n, folder, paths, args.naive_images or min(len(paths), 60 if w * h > 2e6 else 120)))
    rounds: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        # Every quantity once per round, one after the other, so that the ratios of a round share the machine's
        # state of the moment; the medians over rounds are what is reported.
        compute = compute_ceiling(encoder, max(args.images, 20 * args.batch_size), args.batch_size)
        print(f"round {r + 1}/{args.rounds}: compute ceiling {compute:.1f} img/s", flush=True)
        for size, _n, folder, paths, n_naive in sets:
            naive_rate = naive(paths[:n_naive], backbone, device)
            for decode in decoders:
                e2e, setup, whole = end_to_end(folder, dataclasses.replace(config, decode=decode), tmp)
                inputs = input_ceiling(folder, encoder, workers, args.batch_size, decode)
                m = measure(naive_rate, e2e, whole, setup, compute, inputs, device, workers, cores)
                rounds.setdefault((size, decode), []).append(m)
                print(f"{size:>10} {decode:>6}: {line(m)}", flush=True)
    rows = []
    for size, n, _folder, paths, n_naive in sets:
        for decode in decoders:
            row = {"size": size, "images": n, "naive_images": n_naive, "decode": decode,
                   **summarise(rounds[(size, decode)])}
            if args.ablations and decode == "pil":
                row["input_ms"] = input_ms(backbone, paths[:100])
            rows.append(row)
    print(f"median of {args.rounds} round(s), ratios as the median of each round's ratio:")
    for row in rows:
        spread = f" (embedfit {row['embedfit_min']:.1f}-{row['embedfit_max']:.1f})" if args.rounds > 1 else ""
        print(f"{row['size']:>10} {row['decode']:>6}: {line(row)}{spread}")
        for label, ms in row.get("input_ms", {}).items():
            print(f"{'':>18}read + decode + resize + crop per image, one thread: {label} {ms:.2f} ms")
    extra = {}
    if args.ablations and device.type == "cpu" and workers:
        size, _n, folder, _paths, _n_naive = sets[0]
        extra["end_to_end_ablations"] = {"size": size, **cpu_ablations(folder, config, tmp)}
        for name, variants in extra["end_to_end_ablations"].items():
            if name == "size":
                continue
            print(f"end to end on {size}, {name}, img/s (alternating runs):")
            for label, rates in variants.items():
                print(f"  {label:<52} median {statistics.median(rates):6.1f} ({' / '.join(f'{r:.1f}' for r in rates)})")
    if args.ablations:
        print("compute ceiling per technique:")
        extra["ablations"] = ablations(args.backbone, weights, device, max(args.images, 2000 if device.type == "cuda"
                                                                           else 160))
    path = save(f"extract_{args.backbone}_{device.type}_{args.precision}{args.tag}",
                {"backbone": args.backbone, "batch_size": args.batch_size, "precision": args.precision,
                 "workers": workers, "device": str(device), "runtime": encoder.runtime,
                 "random_weights": args.random_weights, "rounds": args.rounds, "rows": rows,
                 **extra})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
