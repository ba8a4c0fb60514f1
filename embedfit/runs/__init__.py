"""Run directories: every read and write of what `embedfit fit`, fine-tuning and `compare` leave on disk.

`record` is the contract (`write_run`, `read_run`, `Sidecar`, `Evaluation`, identities); `trusted` is what a
saved scikit-learn model may contain and the checks of a loaded one; `files` commits outputs whole.
"""

from embedfit.runs.files import atomic_write, json_default, replace_dir, staged_dir
from embedfit.runs.record import (
    METRICS,
    MODEL_FILES,
    PREDICTIONS,
    SAVED_MODEL,
    SIDECAR,
    Evaluation,
    Run,
    Sidecar,
    check_model_file,
    check_replace,
    class_positions,
    file_sha256,
    identity_of,
    is_run,
    load_model,
    model_binding,
    model_file,
    read_run,
    read_sidecar,
    recorded_identity,
    save_run,
    write_predictions_csv,
    write_run,
)
from embedfit.runs.trusted import check_fitted, skops_io, untrusted_types

__all__ = [
    "METRICS", "MODEL_FILES", "PREDICTIONS", "SAVED_MODEL", "SIDECAR", "Evaluation", "Run",
    "Sidecar", "atomic_write", "check_fitted", "check_model_file", "check_replace", "class_positions",
    "file_sha256", "identity_of", "is_run", "json_default", "load_model", "model_binding", "model_file",
    "read_run", "read_sidecar", "recorded_identity", "replace_dir", "save_run", "skops_io", "staged_dir",
    "untrusted_types", "write_predictions_csv", "write_run",
]
