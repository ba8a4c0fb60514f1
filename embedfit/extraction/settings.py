"""Extraction settings (`ExtractConfig`, one field per CLI option), the run summary, and the defaults that
depend on the device and the cores. Imports no torch at module level."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedfit.backbones.spec import DEFAULT_BACKBONE
from embedfit.errors import UsageError
from embedfit.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "onnx")


PRECISIONS = ("fp32", "fp16", "bf16")


TTAS = ("none", "flip")


DECODERS = ("pil", "device")


@dataclass(frozen=True)
class MaxFailures:
    """When extraction gives up on an input: after more than `count` failed images, or more than `fraction` of
    the images this run embeds.

    The fraction is judged against the images to embed, known before the first one, so it is exact from the
    first image: a run aborts as soon as its share of failures can no longer stay at or below `fraction` (0 and
    0% abort on the first failure; 20% of 1000 images aborts at the 201st, however early it comes).
    """

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, value: int | float | str | MaxFailures | None) -> MaxFailures | None:
        """A count (`10`, `"10"`: integer >= 0), a fraction (`0.2`, `"0.2"`, `"1.0"`: a decimal point, 0 to 1) or
        a percentage (`"20%"`: 0 to 100); None for no limit.

        Raises:
            UsageError: Anything else, e.g. "1.5", "-1", "120%", "ten".
        """
        if value is None or isinstance(value, MaxFailures):
            return value
        if isinstance(value, bool):
            raise UsageError(f"`max_failures` must be a count or a fraction, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise UsageError(f"`max_failures` must be a count of 0 or more, got {value}")
            return cls(count=value)
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise UsageError(f"`max_failures` as a fraction must be between 0 and 1, got {value:g} (write a count "
                                 "as a whole number, e.g. 10)")
            return cls(fraction=value)
        text = str(value).strip()
        if re.fullmatch(r"\d+", text):
            return cls(count=int(text))
        if re.fullmatch(r"\d*\.\d+|\d+\.", text):
            return cls.parse(float(text))
        if re.fullmatch(r"(\d+(\.\d*)?|\.\d+)%", text) and float(text[:-1]) <= 100:
            return cls(fraction=float(text[:-1]) / 100)
        raise UsageError(f"`max_failures` must be a count (10), a fraction with a decimal point between 0 and 1 (0.2) "
                         f"or a percentage up to 100% (20%), got '{value}'")

    def allowed(self, total: int) -> float:
        """Failures tolerated among `total` images to embed."""
        return float(self.count) if self.count is not None else (self.fraction or 0.0) * total

    def exceeded(self, failed: int, total: int) -> bool:
        """True once `failed` images exceed the limit among `total` to embed."""
        return failed > self.allowed(total)

    def describe(self, total: int) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.fraction:.4g} of {total} images"


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of an extraction run (the CLI's options, one field each).

    Attributes:
        backbone: Registered backbone name or `timm:<name>`.
        weights: A state-dict file to use instead of the default pretrained weights.
        layer: Intermediate layer to embed from (default: pre-logits).
        pool: How features become one vector (`embedfit.backbones.POOLS`); None: the backbone's own default.
        resolution: Input size (square) instead of the backbone's default (e.g. DINOv2 at 518).
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
        max_failures: Abort when more images fail than this: a count (int, "10"), a fraction of the images to
            embed (float 0-1, "0.2") or a percentage ("20%"); see `MaxFailures`. Stored parsed, as a `MaxFailures`.
        flush_every: Images per part file (the most work a killed run loses).
        shard_size: Write a sharded store (a manifest plus one HDF5 file per this many images,
            `embedfit.storage.shards`); None keeps one file (an existing sharded store stays sharded).
        progress: Show a progress bar.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    layer: str | None = None
    pool: str | None = None
    resolution: int | None = None
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
    max_failures: int | float | str | MaxFailures | None = None
    flush_every: int = 512
    shard_size: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"`workers` must be 0 or more, got {self.workers}")
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
        object.__setattr__(self, "max_failures", MaxFailures.parse(self.max_failures))
        if self.shard_size is not None and self.shard_size < 1:
            raise UsageError(f"`shard_size` must be at least 1, got {self.shard_size}")
        if self.flush_every < 1:
            raise UsageError(f"`flush_every` must be at least 1, got {self.flush_every}")


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
    startup_seconds: float = 0.0  # of `seconds`, until the model (every Ray actor's) was ready to embed
    # `startup_seconds` by phase, in order ("scan", "model load"; on Ray "store checks", "import ray", "cluster",
    # "actor start", "actor imports"), so that a slow start says where its seconds went
    startup_phases: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    device: str = ""
    runtime: str = ""  # "torch" or "onnx"
    notes: list[str] = field(default_factory=list)  # e.g. why ONNX Runtime was not used
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first ones

    @property
    def images_per_second(self) -> float:
        done = self.embedded + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str = "auto") -> torch.device:
    """Turn "auto" into the best available device and check an explicit one exists."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):  # torch knows "meta", "xla"...: embedfit cannot run there
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} requested but CUDA is not available here; use `device` cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device mps requested but MPS is not available here; use `device` cpu")
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


WORKERS_PER_CORE = 2  # decoding processes beyond this only compete for the cores and hold memory


def cap_workers(workers: int, handovers: int) -> tuple[int, str]:
    """Decoding processes actually started: at most `WORKERS_PER_CORE` per available core and at most one per
    handover of images (a worker with nothing to decode is a process started for nothing).

    Returns:
        The number of workers, and a note when the cores capped it (capping by the work to do changes nothing
        but the processes started, so it goes unsaid).
    """
    limit = WORKERS_PER_CORE * available_cores()
    capped = min(workers, limit, max(1, handovers))
    note = (f"decoding with {capped} workers instead of {workers}: at most {WORKERS_PER_CORE} per core "
            f"({available_cores()} cores here)" if workers > limit else "")
    return capped, note
