"""One exception hierarchy for the library; the CLI turns these into one-line messages.

Library code raises these with a message a user can act on (what, where, what to do); it never
prints or exits. `embedfit.cli` maps them to exit codes: usage errors 2, everything else 1.
"""

from __future__ import annotations


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
