"""Encoder: uint8 batches -> embeddings on a device (normalisation there, eval, inference_mode, optional AMP,
channels_last, flip TTA), and `iter_embeddings`, the one loop that runs images through a network for
extraction, prediction and classification; `embed_decoded` runs images already decoded in memory through the same
`Encoder.embed` (fine-tuning's evaluation, compare)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.factory import Backbone, create_backbone
from embedfit.errors import UsageError
from embedfit.extraction.onnx import OnnxBackbone, resolve_runtime
from embedfit.extraction.reader import ImageDataset, _Batch, image_loader, worker_niceness
from embedfit.extraction.settings import DECODERS, default_batch_size, default_workers, resolve_device
from embedfit.images import DEFAULT_MAX_PIXELS, ImageRecord
from embedfit.progress import OnProgress, Progress


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
            raise UsageError("fp16 needs a GPU; use `precision` bf16 or fp32 on the CPU")
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
    hashes: list[str] = field(default_factory=list)  # SHA-256 of each file's bytes ("" unknown): `content_hash`

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


def _in_background(items: Iterator[Any], depth: int, niceness: int = 0) -> Iterator[Any]:
    """Run an iterator in a thread, `depth` items ahead; errors re-raise here; closing stops the thread.

    `niceness` lowers that thread's CPU priority (Linux nices threads one by one), as `worker_niceness` does for
    decoding processes."""
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
        if niceness and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
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
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, decode: str = "pil",
                    decode_thread: bool = False) -> Iterator[BatchResult]:
    """Embed records in order, batch by batch; the core loop shared by extraction and prediction.

    One batch stays in flight: batch i+1 is queued on the device before batch i's embeddings are copied back,
    so a GPU never waits for the host between batches. With `workers=0` and `decode_thread`, a thread (at the
    decoding workers' priority) decodes the next batches while this one is embedded: the Ray engine's actors,
    where forking decoding processes is not safe.
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
        return BatchResult([dataset.records[i] for i in batch.index], feats, batch.errors, batch.hashes)

    prepared: Iterator[tuple[_Batch, torch.Tensor | None, list[int]]] = (
        (batch, *_device_batch(batch, encoder, dataset)) for loaded in loader for batch in loaded.split(batch_size))
    if decode == "device" and encoder.device.type == "cuda":
        # nvJPEG does part of its work on the host: a thread decodes the next batches while this one runs.
        prepared = _in_background(prepared, depth=2)
    elif decode_thread and not workers:
        prepared = _in_background(prepared, depth=2, niceness=worker_niceness(encoder.device))
    in_flight: tuple[_Batch, torch.Tensor | None, list[int]] | None = None
    for batch, images, pos in prepared:
        out = encoder.embed(images) if images is not None else None
        if in_flight is not None:
            yield result(*in_flight)
        in_flight = (batch, out, pos)
    if in_flight is not None:
        yield result(*in_flight)


@torch.inference_mode()
def embed_decoded(images: Sequence[Any], encoder: Encoder, *, batch_size: int = 32,
                  head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  preprocess: Callable[[Any], torch.Tensor] | None = None,
                  on_progress: OnProgress | None = None) -> np.ndarray:
    """Images already decoded in memory (PIL images or uint8 tensors (3, H, W)) -> float32 outputs (N, D).

    The in-memory counterpart of `iter_embeddings`, for images decoded once and used many times (fine-tuning's
    validation images): each batch is preprocessed on the host and goes through `encoder.embed`,
    one batch in flight. `head` runs on each batch's embeddings on the device (a trained classifier head);
    `preprocess` replaces the encoder's spec preprocessing; `on_progress` hears of each batch (`embedfit.progress`).
    """
    pre = encoder.spec.preprocess() if preprocess is None else preprocess
    progress = Progress("embedding", len(images), unit="images", on_progress=on_progress)
    out: list[np.ndarray] = []
    in_flight: torch.Tensor | None = None
    for start in range(0, len(images), batch_size):
        y = encoder.embed(torch.stack([pre(im) for im in images[start:start + batch_size]]))
        if head is not None:
            y = head(y).float()
        if in_flight is not None:
            out.append(in_flight.cpu().numpy())
            progress.advance(len(out[-1]))
        in_flight = y
    if in_flight is not None:
        out.append(in_flight.cpu().numpy())
        progress.advance(len(out[-1]))
    progress.close()
    return np.concatenate(out) if out else np.zeros((0, 0 if head else encoder.spec.embedding_dim), np.float32)


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
