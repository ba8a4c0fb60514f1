"""One exception hierarchy for the library; the CLI turns these into one-line messages.

Library code raises these with a message a user can act on (what, where, what to do); it never
prints or exits. `embedfit.cli` maps them to exit codes: usage errors 2, everything else 1. A message names a
parameter as Python spells it, in backticks ("`test_size` must be a fraction between 0 and 1"); the CLI shows the
flag of the command being run in its place (`--test-size`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class EmbedfitError(Exception):
    """Base class of every error embedfit reports to a user."""

    exit_code: int = 1


class UsageError(EmbedfitError, ValueError):
    """Bad arguments or options (exit code 2), e.g. an unknown backbone name or batch size 0."""

    exit_code = 2


class InputError(EmbedfitError):
    """The input images or folder cannot be used (missing, empty, unreadable CSV...)."""


class DecodeError(EmbedfitError):
    """One image could not be decoded; extraction records it and continues."""


class WeightsUnavailableError(EmbedfitError):
    """Pretrained weights are not on disk and cannot be fetched."""


class StoreError(EmbedfitError):
    """A feature store is missing, unreadable, incomplete or cannot be written."""


class StoreMismatchError(StoreError):
    """A store or model was made with a different backbone, preprocessing, dtype or class set."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class ExtractionInterrupted(EmbedfitError):
    """Extraction stopped by Ctrl-C or by `max_failures`; what was done is saved."""

    exit_code = 130


class ModelFileError(EmbedfitError):
    """A model file is missing, untrusted or does not match its sidecar."""


class OutputError(EmbedfitError):
    """An output file cannot be written where it was asked for."""


def check_output_file(path: str | os.PathLike, param: str = "output") -> Path:
    """Refuse an output path that cannot be written, before the work that would fill it rather than after.

    `param` is the name of the parameter that gave `path`, as messages name it (the CLI shows its flag).

    Raises:
        UsageError: `path` is a folder, or it is (or links to) an existing feature store, model file or image
            (`artifact_kind`), which an output of another kind must never clobber.
        OutputError: Its folder exists but is not writable, or a file stands where a folder would be made.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"`{param}` {path} is a folder; give a file name")
    artifact = artifact_kind(path)
    if artifact and (artifact != "image" or path.is_symlink()):  # a plot may replace its own earlier image
        shown = path if path.resolve() == path.absolute() else f"{path} (a link to {path.resolve()})"
        raise UsageError(f"`{param}` {shown} is an existing {artifact}; write to another file so it is not "
                         "overwritten")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
    problem = _cannot_write_in(existing)
    if problem:
        raise OutputError(f"cannot write {path}: {problem} in {existing}")
    return path


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_COLLECTION_MARK = b'"format": "embedfit-collection"'  # the first key `collect` writes


def artifact_kind(path: str | os.PathLike) -> str:
    """What embedfit artifact `path` is, symlinks followed: "feature store", "store collection", "model file", "run
    directory" or "image", else "" (also when nothing is there). Told by content and layout, not by the link's own
    name, so an output such as ``-o link.csv`` that points at a store is caught."""
    from embedfit.images import has_image_extension

    target = Path(path).resolve()
    if target.is_dir():
        return "run directory" if (target / "model.json").is_file() else ""
    if not target.is_file():
        return ""
    try:
        with open(target, "rb") as f:  # a regular file (is_file): opening it cannot block
            head = f.read(256)
    except OSError:
        return ""
    if head[:8] == _HDF5_MAGIC:
        return "feature store"
    if head.lstrip().startswith(b"{") and _COLLECTION_MARK in head:  # `embedfit.storage.collection`
        return "store collection"
    if (target.parent / "model.json").is_file() and target.name in ("model.skops", "model.pt", "model.json",
                                                                      "metrics.json"):
        return "model file"
    return "image" if has_image_extension(target.name) else ""


def check_output_dir(path: str | os.PathLike, what: str = "run directory") -> Path:
    """Refuse an output folder that cannot be created or written, before the work that would fill it.

    Raises:
        UsageError: A file stands at `path` or above it.
        OutputError: The folder, or the nearest existing folder above it, is not writable.
    """
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} {path}: {existing} is a file")
    problem = _cannot_write_in(existing)
    if problem:
        raise OutputError(f"cannot write {what} {path}: {problem} in {existing}")
    return path


def check_output_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                           run_dirs: Iterable[str | os.PathLike] = (), param: str = "output") -> Path:
    """Refuse an output that would overwrite what the command reads, compared by resolved path.

    Symlinks, `..` and relative paths are resolved first, so `-o ./x/../store.h5` is the same file as `store.h5`.
    Refused: the output is one of `inputs` (a file, or the input folder itself); it lies inside one of `run_dirs`
    (the model files a command loads); or it lies inside an input folder and has an image suffix (it would
    replace, or later be read as, one of the images). An output store or CSV inside an image folder is allowed.
    `param` names the parameter that gave `output`, as in `check_output_file`.

    Raises:
        UsageError: The output is, or would overwrite, one of the command's inputs.
    """
    from embedfit.images import has_image_extension

    target = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise UsageError(f"`{param}` {output} is also an input of this command ({given}); "
                             "choose another output so the input is not overwritten")
        if source.is_dir() and target.is_relative_to(source) and has_image_extension(target.name):
            raise UsageError(f"`{param}` {output} is an image file inside the input folder {given}; "
                             "choose another output so no input image is overwritten")
    for run in run_dirs:
        if target.is_relative_to(Path(run).resolve()):
            raise UsageError(f"`{param}` {output} lies inside the run directory {run}, which this command reads; "
                             "write it elsewhere so the run is not damaged")
    return Path(output)


def check_inputs_exist(inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse a local input path that does not exist, as a command's first check, before any model library is
    imported (URLs on object storage are checked where they are read).

    Raises:
        InputError: One of `inputs` does not exist.
    """
    for given in inputs:
        path = Path(given)
        if "://" not in str(given) and not (path.exists() or path.is_symlink()):
            raise InputError(f"{given} does not exist")


def _cannot_write_in(folder: Path) -> str:
    """Why nothing can be created in `folder` ("" when it can): tried, since permission bits do not tell root,
    read-only mounts or special file systems apart."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return "no permission to write"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".embedfit-probe-", dir=folder))
    except OSError as exc:
        return f"cannot create anything ({exc.strerror or type(exc).__name__})"
    return ""


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest folder above it that exists (what creating `path` would write into)."""
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
