"""Fitting on a GPU: scikit-learn's array API with torch tensors, and the context every fit runs in."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import UsageError
from embedfit.fitting.registry import array_api_names


def array_api_ready() -> bool:
    """Whether SciPy was imported in array-API mode, which scikit-learn's dispatch to torch needs.

    SciPy reads SCIPY_ARRAY_API=1 once, at import, so it must be in the environment before anything imports
    scipy (set it in the shell for the CLI, or in a notebook's first cell).
    """
    try:
        from scipy._lib import _array_api

        return bool(_array_api.SCIPY_ARRAY_API)
    except (ImportError, AttributeError):  # a SciPy that keeps it elsewhere: trust the environment
        return os.environ.get("SCIPY_ARRAY_API") == "1"


def _on_tensors(model: str) -> bool:
    """A registered classifier whose pipeline runs on torch tensors (a user's estimator, named by its class: no)."""
    return model in array_api_names()


def resolve_fit_device(device: str, model: str) -> tuple[str, str | None]:
    """Where to fit `model`: ("cpu", note) or a CUDA device ("cuda", "cuda:1", None).

    "auto" picks the GPU when there is one, the model runs on tensors (its record's `array_api`) and SciPy is in
    array-API mode, else the CPU (with a note saying why, when a GPU was there). An explicit "cuda" that cannot
    be honoured is an error.
    """
    if device == "cpu":
        return "cpu", None
    if device != "auto" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UsageError(f"unknown fit device '{device}'; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        if not _on_tensors(model):
            return "cpu", None
        if not array_api_ready():  # the GPU cannot be used; say so only when there is one
            note = "fitted on the CPU: fitting on the GPU needs SCIPY_ARRAY_API=1 in the environment"
            return "cpu", note if _cuda_present() else None
        import torch

        return ("cuda", None) if torch.cuda.is_available() else ("cpu", None)
    if not _on_tensors(model):
        raise UsageError(f"{model} cannot be fitted on a GPU (models that can: {', '.join(array_api_names())}); "
                         "use `device` cpu")
    from embedfit.extraction.settings import resolve_device

    resolve_device(device)  # the same checks as extraction's: CUDA is there, and so is device N
    if not array_api_ready():
        raise UsageError(f"`device` {device} needs SciPy's array API: run with SCIPY_ARRAY_API=1 in the "
                         "environment (a notebook: set os.environ['SCIPY_ARRAY_API'] = '1' before any import)")
    return device, None


def on_device(X: np.ndarray, y: np.ndarray, model: str, device: str) -> tuple[Any, Any]:
    """X and y as torch tensors on `device`, copied once for every fold; y stays a NumPy array for a classifier
    whose record says `labels_on_host` (scikit-learn moves what it needs)."""
    import torch

    from embedfit.fitting.registry import get_classifier

    labels = y if get_classifier(model).labels_on_host else torch.as_tensor(y, device=device)
    return torch.as_tensor(X, device=device), labels


def _cuda_present() -> bool:
    """Whether a CUDA GPU is there, without importing torch (seconds) unless something already has."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


@contextlib.contextmanager
def _fitting(X: Any) -> Iterator[None]:
    """Around a fit on X: scikit-learn's array-API dispatch when X is a torch tensor, and its UserWarnings
    (e.g. convergence on small folds) silenced.

    Ctrl-C stops every model: scikit-learn's MLP instead catches it, warns and returns the half-trained network,
    which would then be scored and saved as if it were finished.
    """
    with contextlib.ExitStack() as stack:
        if not isinstance(X, np.ndarray):
            from sklearn import config_context

            stack.enter_context(config_context(array_api_dispatch=True))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", category=UserWarning)
        # Shown (not ignored) so that the hook below sees it; the hook raises KeyboardInterrupt itself, which
        # nothing in scikit-learn catches (an error raised from the warning would be swallowed by a grid search,
        # which scores a failed candidate as NaN and goes on).
        warnings.filterwarnings("always", message="Training interrupted by user", category=UserWarning)
        shown = warnings.showwarning

        def interrupt_or_show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, UserWarning) and "Training interrupted by user" in str(message):
                raise KeyboardInterrupt
            shown(message, category, *args, **kwargs)

        warnings.showwarning = interrupt_or_show  # restored by catch_warnings on exit
        yield


def _numpy(obj: Any) -> Any:
    """Tensors inside `obj` (an array, a fitted estimator, or containers of them) as NumPy arrays, in place."""
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):  # a tensor, possibly on a GPU
        return obj.detach().cpu().numpy() if hasattr(obj, "detach") else np.asarray(obj)
    from sklearn.base import BaseEstimator

    if isinstance(obj, BaseEstimator):
        for name, value in vars(obj).items():
            setattr(obj, name, _numpy(value))
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(_numpy(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    return obj
