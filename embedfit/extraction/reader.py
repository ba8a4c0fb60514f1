"""Reader: image records -> uint8 tensors in DataLoader workers, with a status per file.

A broken file becomes an error string, never an exception that stops the run. Plain JPEGs are decoded by
libjpeg-turbo through torchvision (or handed over as bytes for decoding on the GPU); the rest go through
`embedfit.images.decode_image`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from embedfit.errors import DecodeError
from embedfit.extraction.settings import cap_workers, prefetch_factor, transfer_batch_size
from embedfit.images import DEFAULT_MAX_PIXELS, ImageRecord, check_regular_file, decode_image
from embedfit.url import is_url, read_bytes

log = logging.getLogger(__name__)


def record_source(record: ImageRecord) -> str | os.PathLike[str] | bytes:
    """What to decode for a record: its path, or for an object on object storage its bytes, read through this
    process's own fsspec filesystem (`embedfit.url.read_bytes`; a failed read is a `DecodeError`).

    A local path is checked to be a regular file first: a FIFO or device named ``x.jpg`` would block the first
    `open` forever (`DecodeError` "not a regular file", without opening it)."""
    path = record.path
    if isinstance(path, str) and is_url(path):
        return read_bytes(path, record.size if record.size > 0 else None)
    check_regular_file(os.fspath(path))
    return path


def read_record(record: ImageRecord) -> tuple[str | os.PathLike[str] | bytes, str]:
    """A record's bytes and their SHA-256 hex digest (what a store keeps as `content_hash`); a file that cannot be
    read (or is empty) comes back as its path with no digest, for the decoder to word the reason.

    Raises:
        DecodeError: An object on object storage cannot be read, or the path is not a regular file.
    """
    source = record_source(record)
    if not isinstance(source, (bytes, bytearray)):
        try:
            data = Path(source).read_bytes()
        except OSError:
            return source, ""
        if not data:
            return source, ""
        source = data
    return source, hashlib.sha256(source).hexdigest()


def file_hashes(records: Sequence[ImageRecord]) -> list[str]:
    """Each record's `content_hash` (the SHA-256 of its file's bytes, as extraction stores it), read without
    decoding; "" where the file cannot be read."""
    hashes = []
    for record in records:
        try:
            hashes.append(read_record(record)[1])
        except DecodeError:
            hashes.append("")
    return hashes


class ImageDataset(Dataset):
    """Records -> (index, uint8 tensor or None, error message, SHA-256 of the file's bytes); decoding errors are
    data, not exceptions. Each file is read once: the bytes are hashed (the store's `content_hash`, which finds
    exact duplicates) and decoded from memory.

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

    def source(self, i: int) -> str | os.PathLike[str] | bytes:
        """What to decode for record `i` (`record_source`)."""
        return record_source(self.records[i])

    def read(self, i: int) -> tuple[str | os.PathLike[str] | bytes, str]:
        """Record `i`'s bytes and their SHA-256 hex digest (`read_record`)."""
        return read_record(self.records[i])

    def decode(self, i: int, source: str | os.PathLike[str] | bytes | None = None) -> tuple[torch.Tensor | None, str]:
        """Decode and preprocess record `i` on the CPU: (uint8 tensor, "") or (None, reason).

        Plain JPEGs that JPEG draft would not shrink are decoded by libjpeg-turbo through torchvision (the same
        pixels as PIL's, with less overhead); everything else, and anything that decoder balks at, goes through
        `decode_image`, which also words the reasons for failures.
        """
        try:
            if source is None:
                source = self.source(i)
            image = decode_jpeg_cpu(source, self.max_pixels, self.draft)
            if image is None:
                image = decode_image(source, max_pixels=self.max_pixels, draft_size=self.draft)
            return self.preprocess(image), ""
        except DecodeError as exc:
            return None, str(exc)
        except Exception as exc:  # a preprocessing failure must not stop the run either
            return None, f"{type(exc).__name__}: {exc}"

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str]:
        try:
            source, digest = self.read(i)
        except DecodeError as exc:
            return i, None, str(exc), ""
        if self.raw_jpeg:
            data = plain_jpeg_bytes(source, self.max_pixels)
            if data is not None:
                return i, data, "", digest
        return (i, *self.decode(i, source), digest)


def plain_jpeg_bytes(path: str | os.PathLike | bytes,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """The file's bytes as a 1-D uint8 tensor if it is a JPEG that a device decoder handles like PIL, else None.

    That means: complete (ends with the EOI marker, so truncation is still reported by PIL), RGB or grayscale,
    no EXIF rotation, within the pixel limit. Only the header is parsed here.
    """
    data = _plain_jpeg(path, max_pixels)
    return None if data is None else torch.frombuffer(data, dtype=torch.uint8)


def decode_jpeg_cpu(path: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
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


def _plain_jpeg(path: str | os.PathLike | bytes, max_pixels: int | None,
                draft_size: tuple[int, int] | None = None) -> bytearray | None:
    """The bytes of a JPEG that decodes to the same pixels outside PIL (and, given `draft_size`, that PIL's
    JPEG draft would not shrink), else None. Files that do not qualify are turned away on their header, unread."""
    from PIL import Image

    try:
        with io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else open(path, "rb") as f:
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
    hashes: list[str] = field(default_factory=list)  # SHA-256 of each file's bytes ("" unknown), per position

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
                         [self.jpegs[r] for r in jpegs], [self.jpeg_pos[r] - start for r in jpegs],
                         self.hashes[start:stop])


def _collate(batch: list[tuple[int, torch.Tensor | None, str, str]]) -> _Batch:
    images = [(p, b[1]) for p, b in enumerate(batch) if b[1] is not None and b[1].dim() == 3]
    jpegs = [(p, b[1]) for p, b in enumerate(batch) if b[1] is not None and b[1].dim() == 1]
    return _Batch([b[0] for b in batch], [b[2] for b in batch],
                  torch.stack([t for _, t in images]) if images else None, [p for p, _ in images],
                  [t for _, t in jpegs], [p for p, _ in jpegs], [b[3] for b in batch])


def image_loader(dataset: ImageDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """The DataLoader that decodes for a model on `device`: `transfer_batch_size` images per handover, worker
    priority from `worker_niceness`, pinned memory for a GPU. Split its batches with `_Batch.split(batch_size)`."""
    transfer = transfer_batch_size(batch_size)
    workers, note = cap_workers(workers, -(-len(dataset) // transfer))
    if note:
        log.info(note)
    remote = workers and any(isinstance(r.path, str) and is_url(r.path) for r in dataset.records)
    return DataLoader(
        dataset, batch_size=transfer, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", multiprocessing_context=_forkserver() if remote else None,
        worker_init_fn=functools.partial(_worker_init, niceness=worker_niceness(device)) if workers else None,
        prefetch_factor=prefetch_factor(transfer) if workers else None, persistent_workers=False,
    )


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the process that started it dies (SIGKILL included).

    DataLoader's own watchdog only looks between items, so a worker stuck in a system call (a read from a hung
    network mount) would otherwise outlive a killed `extract`. Elsewhere, the watchdog is all there is.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


@functools.cache
def _forkserver() -> multiprocessing.context.BaseContext:
    """Workers that read object storage start from a fork server, not a fork of this process.

    Listing a bucket leaves fsspec's event-loop thread and aiobotocore's executor threads running here; a worker
    forked while one of them holds a lock inherits it held, and hung for good in its first read (seen in the test
    suite: the worker's new loop thread waited forever while loading botocore's data). The fork server is a clean
    single-threaded process with this module (and torch) imported once, so workers still start in milliseconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["embedfit.extraction.reader"])
    return context


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
    _die_with_parent()
    torch.set_num_threads(1)
    if niceness and hasattr(os, "nice"):  # POSIX only
        with contextlib.suppress(OSError):
            os.nice(niceness)
