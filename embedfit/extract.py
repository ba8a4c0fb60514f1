"""Batched extraction: image files -> embeddings, streamed into a resumable feature store.

Three stages, each usable alone:
- reader: `ImageDataset` decodes and preprocesses in DataLoader workers, returning uint8 tensors plus a
  status per file (a broken file becomes an error string, never an exception that stops the run);
- encoder: `Encoder` moves uint8 batches to the device, normalises there, runs the headless model in
  eval mode under `inference_mode` (optionally AMP, channels_last, flip TTA);
- writer: `extract()` streams results in part files through `StoreWriter` on a background thread, so
  memory stays bounded and a killed run loses at most one part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from embedfit.backbones import DEFAULT_BACKBONE, Backbone, check_backbone_name, create_backbone
from embedfit.errors import DecodeError, EmbedfitError, ExtractionInterrupted, UsageError
from embedfit.images import DEFAULT_MAX_PIXELS, ImageRecord, decode_image, scan_images
from embedfit.onnxrt import RUNTIMES, OnnxBackbone, resolve_runtime
from embedfit.store import FAILED, OK, FeatureStore, StoreSettings, StoreWriter

PRECISIONS = ("fp32", "fp16", "bf16")
TTAS = ("none", "flip")
DECODERS = ("pil", "device")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of an extraction run (the CLI's options, one field each).

    Attributes:
        backbone: Registered backbone name or `timm:<name>`.
        weights: A state-dict file to use instead of the default pretrained weights.
        layer: Intermediate layer to embed from (default: pre-logits).
        pool: Global pooling for `layer`: "avg" or "max".
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        batch_size: Images per forward pass; None picks by device (8 on CPU, where larger batches fall out of
            cache and run slower; 128 on a GPU).
        workers: Decoding processes; None picks from the device and core count, 0 decodes in-process.
        precision: "fp32", "fp16" (GPU) or "bf16" autocast.
        dtype: Stored feature dtype, "float32" or "float16".
        tta: "none" or "flip" (average of the image and its mirror).
        channels_last: NHWC memory format, faster for convnets on CPU and on GPUs with AMP.
        jpeg_draft: Let JPEG decoding downscale in the DCT when the image is much larger than needed.
        decode: "pil" decodes and resizes in the DataLoader workers on the CPU (PIL, or torchvision's
            libjpeg-turbo for plain JPEGs that JPEG draft would not shrink: same pixels, less overhead);
            "device" sends the JPEG bytes to the
            model's device and decodes and resizes them there (nvJPEG on a GPU, for when CPU decoding is the
            bottleneck); other formats and unusual JPEGs (CMYK, EXIF-rotated, truncated) still go through PIL.
        compile: Run the model through `torch.compile` (slow first batch; pays off on long GPU runs).
        runtime: "auto" (ONNX Runtime for fp32 on the CPU when installed, ~2.4x PyTorch there; else PyTorch),
            "torch" or "onnx".
        max_pixels: Decompression-bomb limit per image.
        overwrite: Start the store afresh instead of resuming.
        retry_failed: Re-try images recorded as failed.
        max_failures: Abort when more images fail than this count (>= 1) or fraction (< 1) of those seen.
        flush_every: Images per part file (the most work a killed run loses).
        progress: Show a progress bar.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    layer: str | None = None
    pool: str = "avg"
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    precision: str = "fp32"
    dtype: str = "float32"
    tta: str = "none"
    channels_last: bool = True
    jpeg_draft: bool = True
    decode: str = "pil"
    compile: bool = False
    runtime: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    retry_failed: bool = False
    max_failures: float | None = None
    flush_every: int = 512
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"workers must be 0 or more, got {self.workers}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if self.dtype not in ("float32", "float16"):
            raise UsageError(f"unknown dtype '{self.dtype}'; choose float32 or float16")
        if self.runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime '{self.runtime}'; choose one of {', '.join(RUNTIMES)}")
        if self.decode not in DECODERS:
            raise UsageError(f"unknown decoder '{self.decode}'; choose one of {', '.join(DECODERS)}")
        if self.tta not in TTAS:
            raise UsageError(f"unknown TTA '{self.tta}'; choose one of {', '.join(TTAS)}")
        if self.max_failures is not None and self.max_failures < 0:
            raise UsageError(f"max failures must be a count or a fraction >= 0, got {self.max_failures}")
        if self.flush_every < 1:
            raise UsageError(f"flush_every must be at least 1, got {self.flush_every}")


@dataclass
class ExtractSummary:
    """What a run did; `embedfit extract` prints it."""

    store: Path
    total: int = 0  # images in the input
    embedded: int = 0  # embedded in this run
    failed: int = 0  # failed in this run
    reused: int = 0  # already in the store
    skipped: int = 0  # input entries deliberately not used (e.g. loose files beside class folders)
    skips: list[tuple[str, str]] = field(default_factory=list)  # (entry, why), first ones
    missing: int = 0  # rows of files no longer present
    seconds: float = 0.0
    complete: bool = False
    device: str = ""
    runtime: str = ""  # "torch" or "onnx"
    notes: list[str] = field(default_factory=list)  # e.g. why ONNX Runtime was not used
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first ones

    @property
    def images_per_second(self) -> float:
        done = self.embedded + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Devices


def resolve_device(device: str = "auto") -> torch.device:
    """Turn "auto" into the best available device and check an explicit one exists."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device mps requested but MPS is not available here; use --device cpu")
    return dev


def default_batch_size(device: torch.device) -> int:
    """Measured: on a 2-core CPU (EfficientNet-Lite0) batch 8 runs 75 img/s, 32 runs 54, 64 runs 45; on an
    H100 (bf16) batch 64 leaves the GPU waiting on kernel launches (Lite0 6.9k img/s, ResNet-50 9.8k) where
    256 does not (15.5k, 11.9k); 128 keeps most of that with half the memory in flight."""
    return 8 if device.type == "cpu" else 128


def prefetch_factor(batch_size: int) -> int:
    """Batches queued per worker: enough to hide jitter, few enough that big GPU batches stay in shared memory."""
    return 4 if batch_size < 64 else 2


TRANSFER_IMAGES = 64


def transfer_batch_size(batch_size: int) -> int:
    """Images a decoding worker hands over at once: the model's batch, repeated up to `TRANSFER_IMAGES`.

    Each handover costs the main process work (unpickling, mapping the shared memory) on the cores the model runs
    on; 64-image handovers against 8 measured +3% end to end on 2 cores (`bench_extract.py --ablations`). The
    model still runs `batch_size` images at a time.
    """
    return batch_size * max(1, -(-TRANSFER_IMAGES // batch_size))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device, runtime: str = "torch") -> int:
    """Decoding processes: enough to feed a GPU; on a CPU, decoding and the model share the cores.

    Measured on 2 cores (Lite0, batch 8, benchmarks/bench_extract.py): with ONNX Runtime one worker per core runs
    141 img/s on 500x375 JPEGs and 64 on 3000x2000, against 123 and 41 with one worker; PyTorch's threads compete
    harder, and one worker was best there.
    """
    cores = available_cores()
    if device.type == "cpu":
        if cores < 2:
            return 0
        return min(cores, 8) if runtime == "onnx" else 1
    return max(1, min(16, cores - 1))


# ---------------------------------------------------------------------------------------------------
# Reader


class ImageDataset(Dataset):
    """Records -> (index, uint8 tensor or None, error message); decoding errors are data, not exceptions.

    With `raw_jpeg`, plain JPEG files come back undecoded, as a 1-D uint8 tensor of the file's bytes, for
    decoding on the model's device; everything else is decoded here as usual.
    """

    def __init__(self, records: Sequence[ImageRecord], backbone_spec: Any, *, jpeg_draft: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, raw_jpeg: bool = False) -> None:
        self.records = list(records)
        self.preprocess = backbone_spec.preprocess()
        self.draft = self.preprocess.draft_size if jpeg_draft else None
        self.max_pixels = max_pixels
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.records)

    def decode(self, i: int) -> tuple[torch.Tensor | None, str]:
        """Decode and preprocess record `i` on the CPU: (uint8 tensor, "") or (None, reason).

        Plain JPEGs that JPEG draft would not shrink are decoded by libjpeg-turbo through torchvision (the same
        pixels as PIL's, with less overhead); everything else, and anything that decoder balks at, goes through
        `decode_image`, which also words the reasons for failures.
        """
        try:
            image = decode_jpeg_cpu(self.records[i].path, self.max_pixels, self.draft)
            if image is None:
                image = decode_image(self.records[i].path, max_pixels=self.max_pixels, draft_size=self.draft)
            return self.preprocess(image), ""
        except DecodeError as exc:
            return None, str(exc)
        except Exception as exc:  # a preprocessing failure must not stop the run either
            return None, f"{type(exc).__name__}: {exc}"

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        if self.raw_jpeg:
            data = plain_jpeg_bytes(self.records[i].path, self.max_pixels)
            if data is not None:
                return i, data, ""
        return (i, *self.decode(i))


def plain_jpeg_bytes(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """The file's bytes as a 1-D uint8 tensor if it is a JPEG that a device decoder handles like PIL, else None.

    That means: complete (ends with the EOI marker, so truncation is still reported by PIL), RGB or grayscale,
    no EXIF rotation, within the pixel limit. Only the header is parsed here.
    """
    data = _plain_jpeg(path, max_pixels)
    return None if data is None else torch.frombuffer(data, dtype=torch.uint8)


def decode_jpeg_cpu(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    draft_size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """A plain JPEG (see `plain_jpeg_bytes`) decoded on the CPU by torchvision's libjpeg-turbo, else None.

    Returns (3, H, W) uint8 in channels-last memory, which `Preprocess` resizes without a copy. None when PIL's
    JPEG draft would decode the file at a reduced scale (far cheaper for large photos), and on any error or
    warning from the decoder, so that `decode_image` decodes the file or words why it cannot.
    """
    data = _plain_jpeg(path, max_pixels, draft_size)
    if data is None:
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # libjpeg's "corrupt data" warnings: let PIL judge the file
            # torchvision 0.29 deprecates its decoders for TorchCodec's; when they go, PIL decodes everything.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:
        return None


def _plain_jpeg(path: str | os.PathLike, max_pixels: int | None,
                draft_size: tuple[int, int] | None = None) -> bytearray | None:
    """The bytes of a JPEG that decodes to the same pixels outside PIL (and, given `draft_size`, that PIL's
    JPEG draft would not shrink), else None. Files that do not qualify are turned away on their header, unread."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":
                return None
            f.seek(0)
            with Image.open(f, formats=["JPEG"]) as im:  # parses the header only
                if im.mode not in ("RGB", "L") or (max_pixels and im.width * im.height > max_pixels):
                    return None
                if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation
                    return None
                if draft_size is not None and min(im.width // draft_size[0], im.height // draft_size[1]) >= 2:
                    return None  # the test PIL's JpegImageFile.draft uses to pick a scale of 1/2 or less
            f.seek(0)
            data = bytearray(f.read())
        # Complete (ends with the EOI marker), so that truncation is still reported by PIL.
        return data if data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9" else None
    except Exception:  # anything odd: PIL's path reports it properly
        return None


@dataclass
class _Batch:
    """A collated batch: per position an error (or ""), PIL-decoded images stacked, JPEG bytes listed."""

    index: list[int]
    errors: list[str]
    images: torch.Tensor | None  # (k, 3, H, W) uint8, the positions in `image_pos`
    image_pos: list[int]
    jpegs: list[torch.Tensor]  # raw bytes, the positions in `jpeg_pos`
    jpeg_pos: list[int]

    def pin_memory(self) -> _Batch:  # called by the DataLoader's pinning thread
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self

    def split(self, size: int) -> Iterator[_Batch]:
        """Consecutive batches of at most `size` positions; their images are views of this batch's, not copies."""
        if len(self.index) <= size:
            yield self
            return
        for start in range(0, len(self.index), size):
            stop = start + size
            rows = [r for r, p in enumerate(self.image_pos) if start <= p < stop]  # positions ascend: a row range
            jpegs = [r for r, p in enumerate(self.jpeg_pos) if start <= p < stop]
            yield _Batch(self.index[start:stop], self.errors[start:stop],
                         self.images[rows[0]:rows[-1] + 1] if rows else None,  # type: ignore[index]
                         [self.image_pos[r] - start for r in rows],
                         [self.jpegs[r] for r in jpegs], [self.jpeg_pos[r] - start for r in jpegs])


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> _Batch:
    images = [(p, b[1]) for p, b in enumerate(batch) if b[1] is not None and b[1].dim() == 3]
    jpegs = [(p, b[1]) for p, b in enumerate(batch) if b[1] is not None and b[1].dim() == 1]
    return _Batch([b[0] for b in batch], [b[2] for b in batch],
                  torch.stack([t for _, t in images]) if images else None, [p for p, _ in images],
                  [t for _, t in jpegs], [p for p, _ in jpegs])


def image_loader(dataset: ImageDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """The DataLoader that decodes for a model on `device`: `transfer_batch_size` images per handover, worker
    priority from `worker_niceness`, pinned memory for a GPU. Split its batches with `_Batch.split(batch_size)`."""
    transfer = transfer_batch_size(batch_size)
    return DataLoader(
        dataset, batch_size=transfer, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(_worker_init, niceness=worker_niceness(device)) if workers else None,
        prefetch_factor=prefetch_factor(transfer) if workers else None, persistent_workers=False,
    )


def worker_niceness(device: torch.device) -> int:
    """How far decoding workers lower their CPU priority: to the lowest when the model runs on the CPU.

    There the model's threads and the decoders share the cores, and a decoder that preempts one of the model's
    threads stalls the whole parallel operation until that thread runs again. At the lowest priority the
    decoders run in the gaps the model leaves, and still get every core whenever the model waits for input.
    Measured +3% end to end on 500x375 JPEGs on 2 cores, medians of 6 alternating runs (`bench_extract.py
    --ablations`, benchmarks/README.md).
    """
    return 19 if device.type == "cpu" else 0


def _worker_init(_: int, niceness: int = 0) -> None:
    # Ctrl-C is handled once, by the main process, which then stops the workers cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if niceness and hasattr(os, "nice"):  # POSIX only
        with contextlib.suppress(OSError):
            os.nice(niceness)


# ---------------------------------------------------------------------------------------------------
# Encoder


class Encoder:
    """Runs a `Backbone` on uint8 batches on a device: normalisation on the device, eval, inference_mode.

    Args:
        backbone: The headless model.
        device: Where to run.
        precision: "fp32", "fp16" or "bf16" (autocast).
        tta: "none" or "flip".
        channels_last: Use NHWC memory format.
        compile: Wrap the model in `torch.compile`; batches are padded to one size so it compiles once.
        runtime: "torch", "onnx" (ONNX Runtime, fp32 on the CPU) or "auto" (ONNX Runtime where it applies and
            is installed, checked against PyTorch first; PyTorch otherwise).

    Attributes:
        runtime: The runtime in use, "torch" or "onnx".
        note: Why "auto" fell back to PyTorch, or "".
    """

    def __init__(self, backbone: Backbone, device: torch.device, *, precision: str = "fp32",
                 tta: str = "none", channels_last: bool = True, compile: bool = False,
                 runtime: str = "torch") -> None:
        if precision == "fp16" and device.type == "cpu":
            raise UsageError("fp16 needs a GPU; use --precision bf16 or fp32 on the CPU")
        self.device = device
        self.precision = precision
        self.tta = tta
        self.runtime = resolve_runtime(runtime, device, precision, compile)
        self.note = ""
        self.model = backbone.eval().to(device)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if self.runtime == "onnx":
            try:
                self._forward = OnnxBackbone(self.model)
                channels_last = False  # ONNX Runtime takes plain NCHW arrays
            except RuntimeError as exc:
                if runtime == "onnx":
                    raise UsageError(str(exc)) from exc
                self.runtime, self.note = "torch", f"{exc}; using PyTorch"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.spec = backbone.spec
        self.compiled = compile
        if compile:
            self._forward = torch.compile(self.model, dynamic=False)
        self._pad_to = 0
        self._preprocess = backbone.spec.preprocess()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device -> float32 embeddings (N, D) left on the device.

        On a GPU this returns as soon as the work is queued, so the caller can prepare the next batch.
        """
        n = len(images)
        x = images.to(self.device, non_blocking=True)
        if self.compiled and n < self._pad_to:  # one shape, one compilation: pad the short last batch
            x = torch.cat([x, x.new_zeros((self._pad_to - n, *x.shape[1:]))])
        self._pad_to = max(self._pad_to, n)
        x = x.contiguous(memory_format=self.memory_format)
        with self._autocast():
            out = self._forward(x)
            if self.tta == "flip":
                out = (out + self._forward(x.flip(-1))) / 2
        return out[:n].float()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) -> float32 embeddings (N, D) on the host."""
        return self.embed(images).cpu().numpy()

    @torch.inference_mode()
    def decode_jpegs(self, jpegs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """JPEG bytes -> preprocessed uint8 images (3, H, W) on the device; None where the decoder failed.

        Same steps as the PIL path (resize the shorter side with antialiasing, centre crop), in torch.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        with warnings.catch_warnings():
            # torchvision >= 0.29 points to TorchCodec for decoding; its decode_jpeg still works and is the
            # batched nvJPEG path that ships with torchvision.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            try:
                decoded: list[torch.Tensor | None] = list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB,
                                                                      device=device))
            except RuntimeError:  # one bad file fails the whole batch: retry one by one
                decoded = []
                for data in jpegs:
                    try:
                        decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(None)
        return self._preprocess.tensors(decoded)


@dataclass
class BatchResult:
    """One batch of results, aligned with `records`; failed rows are NaN with a reason in `errors`."""

    records: list[ImageRecord]
    features: np.ndarray
    errors: list[str]

    @property
    def n_failed(self) -> int:
        return sum(1 for e in self.errors if e)


def _device_batch(batch: _Batch, encoder: Encoder, dataset: ImageDataset) -> tuple[torch.Tensor | None, list[int]]:
    """Assemble a batch's images in order: PIL-decoded ones, device-decoded JPEGs, PIL for JPEGs that failed."""
    if not batch.jpegs:
        return batch.images, batch.image_pos
    parts: dict[int, torch.Tensor] = {}
    if batch.images is not None:
        on_device = batch.images.to(encoder.device, non_blocking=True)
        parts.update(zip(batch.image_pos, on_device, strict=True))
    for pos, image in zip(batch.jpeg_pos, encoder.decode_jpegs(batch.jpegs), strict=True):
        if image is None:  # the device decoder refused it: PIL decides (and reports a broken file)
            image, batch.errors[pos] = dataset.decode(batch.index[pos])
        if image is not None:
            parts[pos] = image.to(encoder.device)
    pos = sorted(parts)
    return (torch.stack([parts[p] for p in pos]) if pos else None), pos


def _in_background(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run an iterator in a thread, `depth` items ahead; errors re-raise here; closing stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((False, exc))

    thread = threading.Thread(target=run, name="embedfit-decode", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def iter_embeddings(records: Sequence[ImageRecord], encoder: Encoder, *, batch_size: int | None = None,
                    workers: int | None = None, jpeg_draft: bool = True,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, decode: str = "pil") -> Iterator[BatchResult]:
    """Embed records in order, batch by batch; the core loop shared by extraction and prediction.

    One batch stays in flight: batch i+1 is queued on the device before batch i's embeddings are copied back,
    so a GPU never waits for the host between batches.
    """
    if not records:
        return
    if decode not in DECODERS:
        raise UsageError(f"unknown decoder '{decode}'; choose one of {', '.join(DECODERS)}")
    workers = default_workers(encoder.device, encoder.runtime) if workers is None else workers
    batch_size = default_batch_size(encoder.device) if batch_size is None else batch_size
    dataset = ImageDataset(records, encoder.spec, jpeg_draft=jpeg_draft, max_pixels=max_pixels,
                           raw_jpeg=decode == "device")
    loader = image_loader(dataset, batch_size, workers, encoder.device)
    dim = encoder.spec.embedding_dim

    def result(batch: _Batch, out: torch.Tensor | None, pos: list[int]) -> BatchResult:
        feats = np.full((len(batch.index), dim), np.nan, dtype=np.float32)
        if out is not None:
            feats[pos] = out.cpu().numpy()
        return BatchResult([dataset.records[i] for i in batch.index], feats, batch.errors)

    prepared: Iterator[tuple[_Batch, torch.Tensor | None, list[int]]] = (
        (batch, *_device_batch(batch, encoder, dataset)) for loaded in loader for batch in loaded.split(batch_size))
    if decode == "device" and encoder.device.type == "cuda":
        # nvJPEG does part of its work on the host: a thread decodes the next batches while this one runs.
        prepared = _in_background(prepared, depth=2)
    in_flight: tuple[_Batch, torch.Tensor | None, list[int]] | None = None
    for batch, images, pos in prepared:
        out = encoder.embed(images) if images is not None else None
        if in_flight is not None:
            yield result(*in_flight)
        in_flight = (batch, out, pos)
    if in_flight is not None:
        yield result(*in_flight)


def embed_images(paths: Sequence[str | os.PathLike], backbone: Backbone | str = DEFAULT_BACKBONE, *,
                 device: str = "auto", batch_size: int | None = None, workers: int | None = 0,
                 precision: str = "fp32", tta: str = "none", runtime: str = "auto") -> tuple[np.ndarray, list[str]]:
    """Embed image files in memory: (features (N, D) with NaN rows for failures, error per image)."""
    model = create_backbone(backbone) if isinstance(backbone, str) else backbone
    encoder = Encoder(model, resolve_device(device), precision=precision, tta=tta, runtime=runtime)
    records = [ImageRecord(Path(p), str(p), -1, 0, 0) for p in paths]
    results = list(iter_embeddings(records, encoder, batch_size=batch_size, workers=workers))
    if not results:
        return np.empty((0, encoder.spec.embedding_dim), dtype=np.float32), []
    return (np.concatenate([r.features for r in results]),
            [e for r in results for e in r.errors])


# ---------------------------------------------------------------------------------------------------
# Store extraction with resume


class _Progress:
    """A rich progress bar with images/s and ETA, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))
            self.task = self.bar.add_task("embedding", total=total, rate="")
            self.start = time.perf_counter()
            self.bar.start()

    def advance(self, n: int, done: int) -> None:
        if self.bar is not None:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop after the current batch; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _too_many_failures(limit: float | None, failed: int, seen: int) -> bool:
    if limit is None or failed == 0:
        return False
    if limit >= 1:
        return failed > limit
    return seen >= 20 and failed / seen > limit  # a fraction needs a few images before it means anything


def extract(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None,
            *, class_names: Sequence[str] | None = None, **options: Any) -> ExtractSummary:
    """Embed every image under `source` into the store `output`, resuming whatever is already there.

    Args:
        source: A class-per-subfolder tree, a flat folder, or a CSV with `path` (and `label`) columns.
        output: The HDF5 store to create or complete.
        config: Extraction settings; keyword `options` override its fields (e.g. `batch_size=64`).
        class_names: Use this class list (e.g. the training store's) instead of the folder names.

    Returns:
        An `ExtractSummary`; the store is readable with `FeatureStore.open(output)`.

    Raises:
        InputError, UsageError, WeightsUnavailableError, StoreError: with a message for the user.
        ExtractionInterrupted: Ctrl-C or `max_failures`; finished work is saved and the run can resume.
    """
    config = dataclasses.replace(config or ExtractConfig(), **options)
    start = time.perf_counter()
    check_backbone_name(config.backbone)  # cheap checks first: a typo should not wait for a big folder scan
    images = scan_images(source, class_names=class_names)
    device = resolve_device(config.device)
    backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool)
    settings = StoreSettings(backbone.spec, config.dtype, config.tta, config.precision)
    with StoreWriter(output, settings, overwrite=config.overwrite) as writer:
        plan = writer.plan(images.records, retry_failed=config.retry_failed)
        # After the store checks: a run refused for a mismatching store should not first compile or export a model.
        encoder = Encoder(backbone, device, precision=config.precision, tta=config.tta,
                          channels_last=config.channels_last, compile=config.compile, runtime=config.runtime)
        summary = ExtractSummary(Path(output), total=len(images.records), skipped=len(images.skipped),
                                 skips=images.skipped[:10],
                                 device=str(device), runtime=encoder.runtime,
                                 notes=[encoder.note] if encoder.note else [], reused=plan.reused)
        labels = images.class_names

        pending: list[BatchResult] = []
        futures: list[Future] = []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedfit-writer")

        def flush() -> None:
            if not pending:
                return
            recs = [r for b in pending for r in b.records]
            errs = [e for b in pending for e in b.errors]
            feats = np.concatenate([b.features for b in pending])
            pending.clear()
            while len(futures) >= 2:  # bound memory: at most two parts in flight
                futures.pop(0).result()
            futures.append(pool.submit(
                writer.write_part, [r.key for r in recs],
                [labels[r.label] if r.label >= 0 else "" for r in recs], [r.size for r in recs],
                [r.mtime_ns for r in recs], [FAILED if e else OK for e in errs], errs, feats))

        def commit(complete: bool) -> FeatureStore:
            flush()
            for fut in futures:
                fut.result()
            pool.shutdown()
            summary.seconds = time.perf_counter() - start
            prior = writer._previous.attrs.get("extract_seconds", 0.0) if writer._previous else 0.0
            return writer.commit(images.records, labels, complete=complete, attrs={
                "device": str(device), "decode": config.decode, "runtime": encoder.runtime, "engine": "local",
                "root": str(images.root), "source_kind": images.kind,
                "extract_seconds": float(prior) + summary.seconds})

        progress = _Progress(config.progress, len(plan.todo))
        stop_reason = ""
        try:
            with _StopOnSigint() as sigint:
                buffered = 0
                for batch in iter_embeddings(plan.todo, encoder, batch_size=config.batch_size,
                                             workers=config.workers, jpeg_draft=config.jpeg_draft,
                                             max_pixels=config.max_pixels, decode=config.decode):
                    pending.append(batch)
                    buffered += len(batch.records)
                    summary.failed += batch.n_failed
                    summary.embedded += len(batch.records) - batch.n_failed
                    summary.failures += [(r.key, e) for r, e in zip(batch.records, batch.errors, strict=True)
                                         if e][: max(0, 20 - len(summary.failures))]
                    progress.advance(len(batch.records), summary.embedded + summary.failed)
                    if buffered >= config.flush_every:
                        flush()
                        buffered = 0
                    seen = summary.embedded + summary.failed
                    if _too_many_failures(config.max_failures, summary.failed, seen):
                        stop_reason = (f"aborted: {summary.failed} of {seen} images failed (limit "
                                       f"{config.max_failures:g}); is {source} an image folder?")
                        break
                    if sigint.requested:
                        stop_reason = "interrupted"
                        break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        except EmbedfitError:
            commit(complete=False)  # keep what was done, then report the error
            raise
        finally:
            progress.close()
        # The store decides: complete when every image has a row, so a Ctrl-C that lands after the last batch
        # still leaves a complete store, and no error.
        store = commit(complete=True)
        summary.complete = store.complete
        summary.missing = int((store.status == 2).sum())
        if store.complete and stop_reason == "interrupted":
            stop_reason = ""
        if stop_reason == "interrupted":
            raise ExtractionInterrupted(
                f"{stop_reason}; {store.n_ok} images are saved in {output} (incomplete); re-run the same "
                "command to resume"
            )
        if stop_reason:  # too many failures: a runtime error (exit 1), not an interruption (130)
            aborted = ExtractionInterrupted(
                f"{stop_reason}; {store.n_ok} images are saved in {output}"
                + (" (incomplete); fix the input or raise --max-failures, then re-run to resume" if not store.complete
                   else " (every image was tried)")
            )
            aborted.exit_code = 1
            raise aborted
    return summary
