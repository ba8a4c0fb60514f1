"""Find images on disk and decode them safely into RGB.

Two jobs, kept apart so each can be tested alone:

* `scan_images` turns a folder (class-per-subfolder or flat) or a CSV list into a sorted list of
  `ImageRecord`s. It only stats files; it never opens them, so a million-image folder scans quickly.
* `decode_image` turns one file (or bytes) into a fully loaded RGB `PIL.Image.Image` or raises
  `DecodeError`. Extraction records that error against the file's key and moves on.

Decoding follows the reliability rules in the house style: decode fully inside the `try` (Pillow only
notices a truncated JPEG at `load()`), never set `ImageFile.LOAD_TRUNCATED_IMAGES`, check the pixel
count from the header before allocating, apply the EXIF orientation first, and convert every mode to
RGB without clipping 16-bit data or dropping alpha onto its hidden colour.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import os
import re
import stat
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from embedfit.errors import DecodeError, InputError, UsageError

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "ImageSource",
    "decode_image",
    "scan_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File extensions `scan_images` picks up, compared lower-cased (so ``.JPG`` counts)."""

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Images whose header claims more pixels than this are refused before any pixel is allocated."""

DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats `decode_image` tries, sniffed from the bytes (never the extension).

An allowlist rather than every Pillow plugin: a renamed EPS would otherwise run Ghostscript, and
exotic plugins are where most Pillow CVEs live. (Camera JPEGs that Pillow reports as "MPO" come
through the JPEG opener.)
"""

# Composite background for transparent pixels: white is what viewers and browsers show.
_BACKGROUND = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
# The table ImageOps.exif_transpose uses, for EXIF orientations 2..8.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_MAX_REASON_CHARS = 200


# --------------------------------------------------------------------------------------------------
# decoding


def decode_image(
    source: str | os.PathLike[str] | bytes | typing.BinaryIO,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode one image file (or its bytes) into a fully loaded RGB image.

    The format is sniffed from the bytes, so a PNG named ``x.jpg`` decodes. Multi-frame files
    (animated GIF, multi-page TIFF) give their first frame. The EXIF orientation is applied first;
    then the mode is converted to RGB: 16-bit and 32-bit data are rescaled rather than clipped,
    transparency is composited on white, CMYK/YCbCr/LAB/HSV go through Pillow's conversions.

    Args:
        source: A path to a file, the file's bytes (``bytes``, ``bytearray`` or ``memoryview``), or a binary
            file object (e.g. one opened by fsspec on object storage), read whole here: a read error is a
            `DecodeError` like any other broken file.
        max_pixels: Refuse images whose header claims more than this many pixels (width * height),
            checked before any pixel memory is allocated. ``None`` disables this check; Pillow's own
            hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies, as this function never
            changes Pillow's global settings.
        draft_size: For JPEG only, let libjpeg decode at a reduced scale (1/2, 1/4 or 1/8) that
            still gives at least this ``(width, height)`` in the displayed orientation. Much faster
            when the image is going to be resized down anyway. Other formats ignore it.

    Returns:
        A new ``PIL.Image.Image`` in mode ``"RGB"``, already loaded, holding no open file.

    Raises:
        DecodeError: The image cannot be decoded. The message is a short reason (e.g.
            ``"truncated image"``); callers add the file name. Nothing else is raised for bad
            data, whatever Pillow throws.
        UsageError: The arguments themselves are invalid (wrong type, non-positive sizes).

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("RGBA", (4, 3), (255, 0, 0, 0)).save(buf, format="PNG")
        >>> img = decode_image(buf.getvalue())
        >>> img.mode, img.size, img.getpixel((0, 0))
        ('RGB', (4, 3), (255, 255, 255))
    """
    _check_decode_args(max_pixels, draft_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DecodeError("empty data (0 bytes)")
        fp: str | io.BytesIO = io.BytesIO(bytes(source))
    elif hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        try:
            data = source.read()
        except Exception as exc:  # network or disk errors of a remote file: this image fails, not the run
            raise DecodeError(f"cannot read file: {' '.join(str(exc).split())[:160]}") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"decode_image expects a binary file object, got one returning {type(data).__name__}")
        if len(data) == 0:
            raise DecodeError("empty data (0 bytes)")
        fp = io.BytesIO(bytes(data))
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fsdecode(source)
        check_regular_file(fp)
    else:
        raise UsageError(f"decode_image expects a path or bytes (or a binary file object), got {type(source).__name__}")

    try:
        # Pillow warns from MAX_IMAGE_PIXELS up; our own explicit limit replaces that warning.
        # catch_warnings is process-global state, but every thread here only ever adds the same
        # "ignore" filter, so an unlucky interleaving can at worst leave that one filter in place.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_open_formats()) as img:
                return _decode_opened(img, max_pixels, draft_size)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit, hit while parsing (before our check could see the size).
        raise DecodeError(_pillow_bomb_reason(exc, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image (cannot identify format)") from exc
    except MemoryError as exc:
        raise DecodeError("out of memory while decoding") from exc
    except Exception as exc:
        # Corrupt data makes Pillow, zlib and libjpeg raise almost anything (ValueError, SyntaxError,
        # struct.error, IndexError, ...); all of it means "this file cannot be used".
        raise DecodeError(_reason(exc)) from exc


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """`DECODE_FORMATS` that this Pillow build can open (Pillow raises KeyError for unknown names)."""
    Image.init()
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def _check_decode_args(max_pixels: int | None, draft_size: tuple[int, int] | None) -> None:
    """Raise `UsageError` for invalid `decode_image` options (a caller bug, not a bad file)."""
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise UsageError(f"`max_pixels` must be a positive integer or None, got {max_pixels!r}")
    if draft_size is not None and not (
        isinstance(draft_size, (tuple, list))
        and len(draft_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in draft_size)
    ):
        raise UsageError(f"`draft_size` must be a (width, height) pair of positive integers, got {draft_size!r}")


def check_regular_file(path: str) -> None:
    """Turn the common non-image paths into clear reasons (`DecodeError`) before anything opens them.

    Also stops a FIFO, socket or device named ``x.jpg`` from blocking the reader forever: every reader of a local
    image file calls this before its first `open`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError("broken symlink" if os.path.islink(path) else "file not found") from None
    except OSError as exc:
        raise DecodeError(f"cannot access file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError("not a regular file")
    if st.st_size == 0:
        raise DecodeError("empty file (0 bytes)")


def _decode_opened(img: Image.Image, max_pixels: int | None, draft_size: tuple[int, int] | None) -> Image.Image:
    """Check size, decode fully, orient and convert an image Pillow has just opened (header only)."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} pixels exceeds limit {max_pixels}")
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")

    if draft_size is not None and img.format in ("JPEG", "MPO"):
        request = tuple(draft_size)
        # The request is for the displayed image; a 90-degree EXIF rotation swaps the stored axes.
        if _exif_orientation(img) in (5, 6, 7, 8):
            request = request[::-1]
        img.draft("RGB", request)

    img.load()  # the actual decode: truncated or corrupt data fails here, inside the caller's try

    out = img
    method = _EXIF_TRANSPOSE.get(_exif_orientation(img))
    if method is not None:
        # Same table as ImageOps.exif_transpose, minus its re-serialising of the EXIF block,
        # which can fail on malformed metadata of an otherwise fine image.
        out = out.transpose(method)
    out = _to_rgb(out)
    if out is img:
        out = img.copy()  # detach from the file object that the `with` block closes
    return out


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8, or 1 when absent or unreadable (the pixels may still be fine)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer would show it.

    Args:
        img: A loaded image in any mode.

    Returns:
        An RGB image; ``img`` itself when it is already RGB without transparency.

    Raises:
        DecodeError: Pillow has no conversion from this mode to RGB.
    """
    mode = img.mode
    has_key_transparency = "transparency" in img.info
    if mode == "RGB" and not has_key_transparency:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if mode in _ALPHA_MODES or has_key_transparency:
        return _composite_on_white(img)
    try:
        # "1", "L", "P", "CMYK" (Pillow already undoes Adobe's inverted CMYK JPEGs at load),
        # "YCbCr", "LAB", "HSV", "RGBX"...
        return img.convert("RGB")
    except ValueError as exc:
        raise DecodeError(f"unsupported image mode {mode!r}") from exc


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Composite an image with an alpha band or a transparency key over white.

    Everything goes through RGBA first: that is the one conversion that honours palette
    transparency (``P`` + ``transparency``), grey/RGB colour keys, and premultiplied modes alike,
    so a palette PNG and its RGBA twin come out identical.
    """
    if img.mode == "La":
        img = img.convert("LA")  # Pillow has no direct La -> RGBA
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, _BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale a 16-bit, 32-bit integer or float grey image to 8-bit RGB.

    ``convert("RGB")`` clips these to 255 (a 16-bit photo turns white). Instead:

    * ``I;16*``: divide by 65535, the range of the type.
    * ``I`` (32-bit int): by 65535 when the data fits 0..65535 (how 16-bit files usually arrive),
      otherwise stretched from its own min..max.
    * ``F`` (float): by 1 when the data fits 0..1, used as is when it fits 0..255, otherwise
      stretched from its own min..max; NaN becomes black.

    A grey transparency key (e.g. a 16-bit PNG ``tRNS``) becomes white, as for 8-bit images.
    """
    raw = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        gray = (raw.astype(np.uint32) * 255 + 32767) // 65535  # exact integer rounding
    else:
        data = raw.astype(np.float32)
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        elif img.mode == "F" and lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        elif lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
        scaled = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(data)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.clip(np.rint(scaled), 0, 255)
    gray = gray.astype(np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        gray[raw == key] = 255
    return Image.fromarray(gray).convert("RGB")


def _pillow_bomb_reason(exc: Exception, max_pixels: int | None) -> str:
    """Reason for Pillow's own DecompressionBombError, in the same words as our check."""
    match = _PILLOW_BOMB_PIXELS.search(str(exc))
    if match is None:
        return "decompression bomb: image exceeds Pillow's pixel limit"
    pixels = int(match.group(1))
    if max_pixels is not None and pixels > max_pixels:
        return f"decompression bomb: {pixels} pixels exceeds limit {max_pixels}"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"decompression bomb: {pixels} pixels exceeds Pillow's limit {limit} "
        "(raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
    )


def _reason(exc: Exception) -> str:
    """A short, one-line reason for an exception raised while decoding."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "truncat" in lowered or "broken data stream" in lowered:
        return "truncated image"
    if isinstance(exc, OSError) and exc.errno is not None:
        # A real I/O error (permission denied, EIO on a network drive), not bad image data.
        return f"cannot read file: {exc.strerror or text}"
    reason = (
        f"corrupt image data ({type(exc).__name__}: {text})" if text else f"corrupt image data ({type(exc).__name__})"
    )
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 4] + "...)"


# --------------------------------------------------------------------------------------------------
# scanning


@dataclass(frozen=True)
class ImageRecord:
    """One image to extract, as found by `scan_images` (the file is not opened).

    Attributes:
        path: Absolute path to open; always ``source.root / key``. For images on object storage, the URL
            (a ``str``: `pathlib.Path` would collapse its ``//``).
        key: Identity in the store: the path relative to the source root with ``/`` separators,
            or the absolute POSIX path for CSV rows outside the CSV's folder.
        label: Index into ``ImageSource.class_names``; -1 when unlabeled.
        size: File size in bytes (``os.stat``, following symlinks); -1 if stat fails, e.g. for a
            broken symlink, which is kept so that extraction reports it as failed.
        mtime_ns: ``st_mtime_ns``; 0 if stat fails. With ``size``, lets a resumed run notice edits.
    """

    path: Path | str
    key: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class ImageSource:
    """The images found in a folder or CSV list.

    Attributes:
        root: Absolute folder the keys are relative to: the scanned folder, or the CSV's folder (a URL
            string for object storage).
        kind: ``"folder"`` (class per first-level subfolder), ``"flat"`` (unlabeled) or ``"csv"``.
        records: The images, sorted by key (plain string order, the same on every machine).
        class_names: Label names; ``label`` indexes this list. Sorted when found on disk, in the
            given order when passed to `scan_images`; ``[]`` when unlabeled.
        skipped: ``(key, reason)`` for things deliberately not used, e.g. loose files beside class
            folders, hidden or AppleDouble image files, unreadable folders, symlink loops.
    """

    root: Path | str
    kind: str
    records: list[ImageRecord]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def scan_images(source: str | os.PathLike[str], *, class_names: Sequence[str] | None = None,
                labeled: bool = True) -> ImageSource:
    """List the images in a folder or a CSV file, with labels, without opening them.

    A folder whose first-level subfolders contain images (at any depth) is a class tree: each
    first-level subfolder is a class, and image files lying directly in the root are skipped.
    Any other folder is flat and unlabeled. Folders are walked recursively following symlinks
    (loops are detected); names starting with ``.`` (hidden, AppleDouble ``._*``) and
    ``__MACOSX`` are ignored; extensions match case-insensitively; a folder named ``x.jpg`` is
    walked, not taken for an image; broken symlinks with an image extension are kept.

    ``source`` may also be an object-storage URL (``s3://bucket/prefix``, ``gs://``, ``az://``; see
    `embedfit.url`): the same rules apply to the listing, and the resume key of each object is its size
    and last-modified time from the listing.

    A ``.csv`` file needs a header with a ``path`` column and may have a ``label`` column of class
    names (an empty cell means unlabeled). Relative paths are resolved against the CSV's folder (on object
    storage too); a row may be a URL.
    Rows naming files that do not exist are kept, so that extraction reports them.

    Args:
        source: A folder of images or a ``.csv`` file.
        class_names: The label space to use, e.g. the training set's classes when scanning a test
            set; labels index this list in the given order. A class found on disk or in the CSV
            that is not in it is an error. Ignored for unlabeled sources.
        labeled: False reads a folder as flat whatever its layout: every image at any depth, no labels (for
            prediction, where sub-folders are just how the images are filed).

    Returns:
        The records sorted by key, with class names and the skipped entries.

    Raises:
        InputError: The source does not exist, is not a folder or ``.csv`` file, has no images,
            the CSV is unreadable or has no ``path`` column, or a class is not in ``class_names``.
        UsageError: ``class_names`` is empty or has duplicates or non-string entries.

    Example:
        >>> src = scan_images("photos")  # doctest: +SKIP
        >>> src.kind, src.class_names, src.records[0].key  # doctest: +SKIP
        ('folder', ['cat', 'dog'], 'cat/001.jpg')
    """
    from embedfit.url import is_url, local_or_url

    given = _check_class_names(class_names)
    shown = local_or_url(source)
    if is_url(shown):
        return _scan_remote(shown, given, labeled)
    path = Path(os.path.abspath(shown))
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{shown} does not exist (broken symlink)")
        raise InputError(f"{shown} does not exist")
    if path.is_dir():
        return _scan_folder(path, given, labeled)
    if path.suffix.lower() == ".csv":
        return _scan_csv(path, given)
    raise InputError(f"{shown} is not a folder or a .csv file; expected a folder of images or a CSV list")


def _resolve_classes(present: list[str], given: list[str] | None, where: str) -> list[str]:
    """The class list: `given` (every present class must be in it) or, without one, the classes present.

    `where` describes the offending items, with `{}` where their names go.
    """
    if given is None or not present:
        return present
    unknown = [c for c in present if c not in given]
    if unknown:
        raise InputError(f"{where.format(', '.join(map(repr, unknown)))} not in the given class names "
                         f"({', '.join(map(repr, given))})")
    return given


def _check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    """Validate the `class_names` argument; return it as a list."""
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise UsageError("`class_names` must be a sequence of names, not a single string")
    names = list(class_names)
    if not names:
        raise UsageError("`class_names` must not be empty (pass None to take the classes from the data)")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise UsageError(f"`class_names` must be non-empty strings, got {bad[0]!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"class_names has duplicates: {', '.join(map(repr, dupes))}")
    return names


def has_image_extension(name: str) -> bool:
    """Whether a file name has one of `IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """``entry.is_dir()`` following symlinks, False when even that fails (e.g. a symlink loop)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stat_or_missing(path: os.DirEntry[str] | str) -> tuple[int, int]:
    """(size, mtime_ns) following symlinks, or (-1, 0) when the target cannot be stat'ed."""
    try:
        st = path.stat() if isinstance(path, os.DirEntry) else os.stat(path)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns


def _printable(key: str) -> str:
    """A key that encodes as UTF-8: undecodable name bytes shown as backslash escapes."""
    return os.fsencode(key).decode("utf-8", "backslashreplace")


def _utf8_ok(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk(root: Path, skipped: list[tuple[str, str]], start: str = "",
          recurse: bool = True) -> tuple[list[tuple[str, os.DirEntry[str]]], list[str]]:
    """Find image files under `root`.

    Args:
        root: The scanned folder (keys are relative to it).
        skipped: Appended to with what is deliberately left out.
        start: Walk only this first-level subfolder of `root` (one part of the input, `scan_part`).
        recurse: False: only the files in `root` itself (its first-level subfolders are named, not walked).

    Returns:
        ``(key, entry)`` for each image file, and the names of all first-level subfolders walked.
    """
    found: list[tuple[str, os.DirEntry[str]]] = []
    first_level: list[str] = []
    root_stat = root.stat()
    # Iterative walk (no recursion limit on deep trees). Each folder carries the identities of its
    # ancestors: a symlink back to one of them is a loop; two links to the same folder are not.
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (str(root), "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))
    ]
    if start:
        top = (root / start).stat()
        stack = [(str(root / start), start + "/", stack[0][2] | {(top.st_dev, top.st_ino)})]
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if not prefix:
                raise InputError(f"cannot read folder {root}: {exc.strerror or exc}") from exc
            skipped.append((_printable(prefix), f"cannot read folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            name = entry.name
            key = prefix + name
            if name.startswith("."):
                if has_image_extension(name) and not _is_dir(entry):
                    why = "AppleDouble metadata file (._*)" if name.startswith("._") else "hidden file"
                    skipped.append((_printable(key), why))
                continue
            if _is_dir(entry):
                if name == "__MACOSX":
                    skipped.append((_printable(key + "/"), "macOS archive metadata folder"))
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    skipped.append((_printable(key + "/"), f"cannot read folder: {exc.strerror or exc}"))
                    continue
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    skipped.append((_printable(key + "/"), "symlink loop (links to a folder that contains it)"))
                    continue
                if not prefix:
                    first_level.append(name)
                if recurse:
                    stack.append((entry.path, key + "/", ancestors | {ident}))
            elif has_image_extension(name):
                if _utf8_ok(key):
                    found.append((key, entry))
                else:
                    # The store keeps keys as UTF-8 text; a lossy key could name the wrong file.
                    skipped.append((_printable(key), "file name is not valid UTF-8"))
    return found, first_level


def _record(root: Path, key: str, entry: os.DirEntry[str], label: int) -> ImageRecord:
    size, mtime_ns = _stat_or_missing(entry)
    return ImageRecord(path=root / key, key=key, label=label, size=size, mtime_ns=mtime_ns)


def _scan_folder(root: Path, given: list[str] | None, labeled: bool = True) -> ImageSource:
    """Scan a folder as a class tree or, when no subfolder holds images (or not `labeled`), as a flat folder."""
    skipped: list[tuple[str, str]] = []
    found, first_level = _walk(root, skipped)
    return _label_tree(root, [(key, functools.partial(_record, root, key, entry)) for key, entry in found],
                       first_level, skipped, given, labeled)


def _scan_remote(url: str, given: list[str] | None, labeled: bool) -> ImageSource:
    """`_scan_folder` / `_scan_csv` for a URL: one listing of the prefix (`embedfit.url.list_prefix`), with the
    same rules as for local folders: hidden names and ``__MACOSX`` are skipped, extensions match case-insensitively.
    """
    from embedfit import url as remote

    is_file, root, entries = remote.list_prefix(url)
    if is_file:
        if root.lower().endswith(".csv"):
            return _scan_csv(root, given)
        raise InputError(f"{remote.redact(url)} is not a folder or a .csv file; expected a folder of images or a CSV "
                         "list")
    if not entries:
        raise InputError(f"{remote.redact(url)} does not exist (no objects under this prefix)")
    skipped: list[tuple[str, str]] = []
    found, first_level = _remote_found(root, entries, skipped)
    return _label_tree(remote.redact(root), found, sorted(first_level), skipped, given, labeled)


def _remote_found(root: str, entries: list[tuple[str, dict[str, typing.Any]]], skipped: list[tuple[str, str]],
                  prefix: str = "") -> tuple[list[tuple[str, typing.Callable[[int], ImageRecord]]], set[str]]:
    """The image objects of a listing under `root` (keys relative to ``root/prefix``), by `_walk`'s rules, and the
    first-level folders met; what is left out goes to `skipped`."""
    from embedfit import url as remote

    found: list[tuple[str, typing.Callable[[int], ImageRecord]]] = []
    first_level: set[str] = set()

    def make(key: str, size: int, mtime_ns: int, label: int) -> ImageRecord:
        return ImageRecord(path=remote.join(root + "/", key), key=key, label=label, size=size, mtime_ns=mtime_ns)

    for key, info in entries:
        key = prefix + key
        parts = key.split("/")
        if "/" in key and not parts[0].startswith(".") and parts[0] != "__MACOSX":
            first_level.add(parts[0])
        if any(p.startswith(".") for p in parts):
            if has_image_extension(parts[-1]) and parts[-1].startswith("."):
                skipped.append((key, "AppleDouble metadata file (._*)" if parts[-1].startswith("._") else
                                "hidden file"))
            continue
        if "__MACOSX" in parts[:-1]:
            folder = "/".join(parts[:parts.index("__MACOSX") + 1]) + "/"
            if (folder, "macOS archive metadata folder") not in skipped:
                skipped.append((folder, "macOS archive metadata folder"))
            continue
        if has_image_extension(parts[-1]):
            found.append((key, functools.partial(make, key, int(info.get("size") or 0), remote.mtime_ns(info))))
    return found, first_level


def _label_tree(root: Path | str, found: list[tuple[str, typing.Callable[[int], ImageRecord]]],
                first_level: list[str], skipped: list[tuple[str, str]], given: list[str] | None,
                labeled: bool) -> ImageSource:
    """Images found under `root` (key, record for a label) -> a class tree or a flat source.

    A first-level sub-folder holding images is a class; without one (or not `labeled`) the source is flat.
    """
    classes_present = sorted({key.split("/", 1)[0] for key, _ in found if "/" in key}) if labeled else []

    if classes_present:
        kind = "folder"
        if isinstance(root, Path):  # a local tree: a class folder may be a symlink to another
            _check_distinct_classes(root, classes_present)
        names = _resolve_classes(classes_present, given, f"class folder(s) {{}} in {root}")
        index = {name: i for i, name in enumerate(names)}
        records = []
        for key, make in found:
            if "/" in key:
                records.append(make(index[key.split("/", 1)[0]]))
            else:
                skipped.append((key, "loose file in the root of a class-folder tree (not in any class folder)"))
        for name in first_level:
            if name not in index:
                skipped.append((_printable(name + "/"), "folder has no images, so it is not a class"))
    else:
        kind, names = "flat", []
        records = [make(-1) for _, make in found]

    if not records:
        looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
        note = f"; skipped {len(skipped)}, e.g. {skipped[0][0]!r}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"no images found in {root} (looked for {looked_for}{note})")
    records.sort(key=lambda r: r.key)
    skipped.sort()
    return ImageSource(root=root, kind=kind, records=records, class_names=list(names), skipped=skipped)


def _check_distinct_classes(root: Path, classes: list[str]) -> None:
    """Refuse class folders that are the same folder (a symlink to another class) or lie inside one another:
    their images would be counted, and labeled, twice.

    Raises:
        InputError: Naming both folders.
    """
    real = {name: os.path.realpath(root / name) for name in classes}
    for a in classes:
        for b in classes:
            if a != b and ((real[a] == real[b] and a < b) or real[b].startswith(real[a] + os.sep)):
                how = "are the same folder" if real[a] == real[b] else f"overlap ({b} lies inside {a})"
                raise InputError(f"class folders '{a}' and '{b}' in {root} {how} (through a symlink): their images "
                                 "would get two labels; remove the link or copy the images")


def _scan_csv(csv_path: Path | str, given: list[str] | None, byte_range: tuple[int, int] | None = None) -> ImageSource:
    """Read a CSV list of images (``path`` column, optional ``label`` column), local or a URL.

    With `byte_range` (start, stop: line boundaries, `split_input`), only the rows in those bytes (the header is read
    from the file's start); such a part may be empty, and its line numbers count from `start`.
    """
    from embedfit import url as remote

    on_remote = remote.is_url(csv_path)
    base: Path | str = remote.join(str(csv_path), "..") if on_remote else Path(csv_path).parent
    try:
        if byte_range is not None:
            header, rows = _read_csv_range(csv_path, *byte_range)
        else:
            # utf-8-sig: spreadsheet programs put a byte-order mark before the header.
            with (io.StringIO(remote.read_text(str(csv_path)), newline="") if on_remote else
                  open(csv_path, newline="", encoding="utf-8-sig")) as f:
                reader = csv.reader(f)
                header = next(reader, None)
                rows = [(reader.line_num, row) for row in reader]
        csv_name = csv_path.rsplit("/", 1)[-1] if isinstance(csv_path, str) else csv_path.name
        csv_path = remote.redact(csv_path) if isinstance(csv_path, str) else csv_path
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {csv_path}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise InputError(f"cannot read {csv_path}: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc

    if not header:
        raise InputError(f"{csv_path} is empty; expected a header row with a 'path' column")
    columns = [c.strip().lower() for c in header]
    if "path" not in columns:
        raise InputError(
            f"{csv_path} has no 'path' column (columns: {', '.join(map(repr, header))}); "
            "expected a header like 'path,label'"
        )
    path_col = columns.index("path")
    label_col = columns.index("label") if "label" in columns else None

    def cell(row: list[str], col: int | None) -> str:
        return row[col].strip() if col is not None and col < len(row) else ""

    skipped: list[tuple[str, str]] = []
    entries: dict[str, tuple[Path | str, str, int]] = {}  # key -> (path or URL, label name, line)
    for line, row in rows:
        if not any(c.strip() for c in row):
            continue  # blank line
        raw_path = cell(row, path_col)
        if not raw_path:
            skipped.append((f"{csv_name}:{line}", "empty path cell"))
            continue
        path, key = _csv_row_path(base, raw_path)
        label = cell(row, label_col)
        if key in entries:
            _, first_label, first_line = entries[key]
            if first_label != label:
                raise InputError(
                    f"{csv_path}: {key!r} is listed with label {first_label!r} on line {first_line} "
                    f"and {label!r} on line {line}"
                )
            skipped.append((key, f"listed again on line {line} (first on line {first_line})"))
            continue
        entries[key] = (path, label, line)

    if not entries and byte_range is None:
        raise InputError(f"no images listed in {csv_path}")
    present = sorted({label for _, label, _ in entries.values() if label})
    names = _resolve_classes(present, given, f"{csv_path}: label(s) {{}}")
    index = {name: i for i, name in enumerate(names)}
    records = []
    stats = remote.stat_many([p for p, _, _ in entries.values() if isinstance(p, str)])
    for key, (path, label, _) in entries.items():
        size, mtime_ns = stats[path] if isinstance(path, str) else _stat_or_missing(str(path))
        records.append(ImageRecord(path=path, key=key, label=index.get(label, -1), size=size, mtime_ns=mtime_ns))
    records.sort(key=lambda r: r.key)
    skipped.sort()
    return ImageSource(root=remote.redact(base) if on_remote else base, kind="csv", records=records,
                       class_names=list(names), skipped=skipped)


def _read_csv_range(csv_path: Path | str, start: int, stop: int) -> tuple[list[str] | None,
                                                                         list[tuple[int | str, list[str]]]]:
    """The header and the rows in bytes [start, stop) of a CSV (line numbers "N after byte start" past the first
    part, whose lines are not counted)."""
    from embedfit import url as remote

    if remote.is_url(csv_path):
        fs, path = remote.filesystem(str(csv_path))
        opened = fs.open(path, "rb")
    else:
        opened = open(csv_path, "rb")  # noqa: SIM115 (closed by the `with` below, like the remote one)
    with opened as f:
        head = f.readline()
        f.seek(start)
        data = f.read(stop - start)
    header = next(csv.reader([head.decode("utf-8-sig")]), None)
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig" if start == 0 else "utf-8"), newline=""))
    if start == 0:
        next(reader, None)  # the header
    return header, [(reader.line_num if start == 0 else f"{reader.line_num} after byte {start}", row)
                    for row in reader]


# --------------------------------------------------------------------------------------------------
# parts: an input listed piece by piece (the Ray engine's workers list one part each)

CSV_PART_BYTES = 8 << 20  # bytes of a CSV per part (~100k rows)


@dataclass(frozen=True)
class InputPart:
    """A piece of an input that is listed on its own (`scan_part`), wherever the data is.

    Attributes:
        kind: "folder" (a first-level folder or prefix, walked in full), "loose" (the files in the root itself)
            or "csv" (the rows in a byte range of a CSV list).
        name: The folder's name ("folder").
        start: First byte ("csv").
        stop: Byte after the last ("csv").
    """

    kind: str
    name: str = ""
    start: int = 0
    stop: int = 0


@dataclass
class InputSplit:
    """An input cut into parts by `split_input`, from its root alone.

    Attributes:
        source: The folder, CSV or URL to list the parts of (as `scan_part` takes it).
        root: What keys are relative to, as `ImageSource.root`.
        csv: Whether the input is a CSV list.
        parts: The parts, each listed by `scan_part`.
        skipped: What the root's own listing leaves out (e.g. a ``__MACOSX`` folder).
    """

    source: str
    root: Path | str
    csv: bool
    parts: list[InputPart]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def split_input(source: str | os.PathLike[str], *, csv_part_bytes: int = CSV_PART_BYTES) -> InputSplit:
    """Cut an input into parts, reading only its root: one part per first-level folder (or prefix), one for the
    files in the root itself, or byte ranges of `csv_part_bytes` (cut at line ends) of a CSV list.

    `scan_part` lists each part as `scan_images` lists the whole; `combine_parts` applies the rules that need every
    part (class tree or flat, the class list). A CSV's parts are cut at line ends, so a quoted cell that spans lines
    must not straddle a cut.

    Raises:
        InputError: As `scan_images`: the source does not exist, or is not a folder or a ``.csv`` file.
    """
    from embedfit import url as remote

    shown = remote.local_or_url(source)
    if remote.is_url(shown):
        fs, path = remote.filesystem(shown)
        stripped = fs._strip_protocol(path).rstrip("/")
        try:
            fs.invalidate_cache()
            is_file = fs.isfile(stripped)
            listed = [] if is_file else fs.ls(stripped, detail=True)
        except Exception as exc:
            raise InputError(f"cannot list {remote.redact(shown)}: {remote.read_reason('it')(exc)}") from None
        root = fs.unstrip_protocol(stripped)
        if is_file:
            if not stripped.lower().endswith(".csv"):
                raise InputError(f"{remote.redact(shown)} is not a folder or a .csv file; expected a folder of images "
                                 "or a CSV list")
            return InputSplit(root, remote.redact(remote.join(root, "..")), True,
                              _csv_parts(fs.open(stripped, "rb"), int(fs.size(stripped)), csv_part_bytes))
        if not listed:
            raise InputError(f"{remote.redact(shown)} does not exist (no objects under this prefix)")
        folders, loose, skipped = [], False, []
        for info in listed:
            name = fs._strip_protocol(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "directory":
                if name == "__MACOSX":
                    skipped.append((name + "/", "macOS archive metadata folder"))
                elif not name.startswith("."):
                    folders.append(name)
            elif has_image_extension(name):
                loose = True
        parts = [InputPart("folder", n) for n in sorted(folders)] + ([InputPart("loose")] if loose else [])
        return InputSplit(root, remote.redact(root), False, parts, skipped)
    path = Path(os.path.abspath(shown))
    if not path.exists():
        raise InputError(f"{shown} does not exist" + (" (broken symlink)" if path.is_symlink() else ""))
    if path.is_dir():
        skipped: list[tuple[str, str]] = []
        loose, folders = _walk(path, skipped, recurse=False)
        parts = [InputPart("folder", n) for n in sorted(folders)] + ([InputPart("loose")] if loose else [])
        return InputSplit(str(path), path, False, parts, skipped)
    if path.suffix.lower() == ".csv":
        with open(path, "rb") as f:
            return InputSplit(str(path), path.parent, True, _csv_parts(f, path.stat().st_size, csv_part_bytes))
    raise InputError(f"{shown} is not a folder or a .csv file; expected a folder of images or a CSV list")


def _csv_parts(f: typing.BinaryIO, size: int, part_bytes: int) -> list[InputPart]:
    """Byte ranges of about `part_bytes` of an open CSV, each ending after a newline (the file is closed)."""
    cuts = [0]
    with f:
        while cuts[-1] + part_bytes < size:
            f.seek(cuts[-1] + part_bytes)
            f.readline()  # to the end of the line the cut falls in
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    cuts.append(size)
    return [InputPart("csv", start=a, stop=b) for a, b in itertools.pairwise(cuts) if b > a]


def scan_part(split: InputSplit, part: InputPart) -> ImageSource:
    """The images of one part of an input (`split_input`), as `scan_images` would list them, unresolved.

    Returns:
        The part's records sorted by key, labelled by the part's own `class_names`: a "folder" part is the one
        class of its name (kind "folder", also when it holds no image), "loose" files are flat, and a "csv" part has
        the labels its rows name (sorted). Empty when the part has no images (no error).

    Raises:
        InputError: The part cannot be read, or a CSV part repeats a key with another label.
    """
    from embedfit import url as remote

    skipped: list[tuple[str, str]] = []
    if part.kind == "csv":
        return _scan_csv(split.source, None, (part.start, part.stop))
    if part.kind not in ("folder", "loose"):
        raise UsageError(f"unknown input part kind {part.kind!r}")
    if remote.is_url(split.source):
        if part.kind == "folder":
            _, _, entries = remote.list_prefix(remote.join(split.source + "/", part.name))
            found, _ = _remote_found(split.source, entries, skipped, part.name + "/")
        else:
            fs, path = remote.filesystem(split.source)
            listed = [(fs._strip_protocol(i["name"]).rsplit("/", 1)[-1], i) for i in fs.ls(path, detail=True)
                      if i.get("type") != "directory"]
            found, _ = _remote_found(split.source, sorted(listed, key=lambda e: e[0]), skipped)
    else:
        root = Path(split.source)
        entries, _ = _walk(root, skipped, start=part.name if part.kind == "folder" else "",
                           recurse=part.kind == "folder")
        found = [(key, functools.partial(_record, root, key, entry)) for key, entry in entries]
    label = 0 if part.kind == "folder" else -1
    records = sorted((make(label) for _, make in found), key=lambda r: r.key)
    skipped.sort()
    return ImageSource(root=split.root, kind="folder" if part.kind == "folder" else "flat", records=records,
                       class_names=[part.name] if part.kind == "folder" else [], skipped=skipped)


def combine_parts(split: InputSplit, parts: Sequence[tuple[InputPart, int, Sequence[str], Sequence[str]]],
                  given: Sequence[str] | None) -> tuple[str, list[str], list[InputPart], list[tuple[str, str]], int]:
    """`scan_images`' rules over the listed parts: which parts count and the class list.

    Args:
        split: The input.
        parts: Per part: the part, its image count, the labels its rows carry, its first keys (a few).
        given: The class list asked for (`scan_images`' `class_names`), or None.

    Returns:
        The source kind ("folder", "flat" or "csv"), the class names, the parts whose rows are the input (a class
        tree's loose files are not), what the rules skip (loose files, folders without images: the first ones) and
        how many entries that is.

    Raises:
        InputError: No images at all, a class not in `given`, or two class folders that are one.
    """
    given = _check_class_names(given)
    skipped: list[tuple[str, str]] = []
    n_skipped = 0
    listed = [(p, n, labels) for p, n, labels, _ in parts if n]
    if split.csv:
        present = sorted({c for _, _, labels in listed for c in labels if c})
        names = _resolve_classes(present, given, f"{split.source}: label(s) {{}}")
        kind, used = "csv", [p for p, _, _ in listed]
    else:
        classes = sorted(p.name for p, _, _ in listed if p.kind == "folder")
        if classes:
            if isinstance(split.root, Path):
                _check_distinct_classes(split.root, classes)
            names = _resolve_classes(classes, given, f"class folder(s) {{}} in {split.root}")
            kind, used = "folder", [p for p, _, _ in listed if p.kind == "folder"]
            for p, n, _, keys in parts:
                if p.kind == "loose" and n:
                    skipped += [(k, "loose file in the root of a class-folder tree (not in any class folder)")
                                for k in keys]
                    n_skipped += n
                elif p.kind == "folder" and not n:
                    skipped.append((_printable(p.name + "/"), "folder has no images, so it is not a class"))
                    n_skipped += 1
        else:
            kind, names, used = "flat", [], [p for p, _, _ in listed]
    if not used:
        looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"no images found in {split.root if not split.csv else split.source} (looked for "
                         f"{looked_for})")
    return kind, list(names), used, sorted(skipped), n_skipped


def _csv_row_path(base: Path | str, raw_path: str) -> tuple[Path | str, str]:
    """(path or URL to open, key) for one CSV row: relative to the CSV's folder, local or on object storage."""
    from embedfit import url as remote

    if remote.is_url(raw_path):  # a URL row: used as is, keyed without credentials
        url = remote.local_or_url(raw_path)
        if not remote.is_url(url):
            return _csv_row_path(Path("/"), url)
        return url, remote.redact(url)
    if isinstance(base, str) and not raw_path.startswith("/"):
        url = remote.join(base + "/", raw_path)
        prefix = base.rstrip("/") + "/"
        return url, url[len(prefix):] if url.startswith(prefix) else remote.redact(url)
    if isinstance(base, str):
        base = Path("/")  # an absolute local path in a CSV on object storage
    path = Path(os.path.normpath(base / raw_path))  # an absolute raw_path replaces base
    try:
        return path, path.relative_to(base).as_posix() if base != Path("/") else path.as_posix()
    except ValueError:
        return path, path.as_posix()


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[ImageRecord]:
    """Image files, folders (every image at any depth) and CSV lists -> unlabeled records keyed by path.

    Each may be a local path or a URL on object storage (`embedfit.url`).

    Raises:
        InputError: An input does not exist, or there are no images at all.
    """
    from embedfit import url as remote

    records: list[ImageRecord] = []
    for item in inputs:
        item = remote.local_or_url(item)
        if remote.is_url(item):  # a prefix ("folder") or CSV on object storage, else one object
            try:
                records += [ImageRecord(r.path, remote.redact(str(r.path)), -1, r.size, r.mtime_ns)
                            for r in scan_images(item, labeled=False).records]
            except InputError:
                (size, mtime_ns), = remote.stat_many([item]).values()
                if size < 0:
                    raise
                records.append(ImageRecord(item, remote.redact(item), -1, size, mtime_ns))
            continue
        path = Path(item)
        if path.is_dir() or path.suffix.lower() == ".csv":  # every image in it: sub-folders are not classes here
            records += [ImageRecord(r.path, str(r.path), -1, r.size, r.mtime_ns)
                        for r in scan_images(path, labeled=False).records]
        elif path.exists() or path.is_symlink():
            records.append(ImageRecord(path.resolve() if path.exists() else path, str(path), -1, 0, 0))
        else:
            raise InputError(f"{path} does not exist")
    if not records:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} "
                         f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return records
