"""One exception hierarchy for the library; the CLI turns these into one-line messages.

Library code raises these with a message a user can act on (what, where, what to do); it never
prints or exits. `embedfit.cli` maps them to exit codes: usage errors 2, everything else 1.
"""

from __future__ import annotations

import os
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


def check_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """Refuse an output path that cannot be written, before the work that would fill it rather than after.

    Raises:
        UsageError: `path` is a folder.
        OutputError: Its folder exists but is not writable, or a file stands where a folder would be made.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {existing}")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "run directory") -> Path:
    """Refuse an output folder that cannot be created because it, or a folder above it, is a file.

    Raises:
        UsageError: A file stands at `path` or above it.
    """
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} {path}: {existing} is a file")
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest folder above it that exists (what creating `path` would write into)."""
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
