"""Weights files: hashing (a file is identified by its SHA-256), loading state dicts with one-line errors,
downloads, and the offline switch."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from embedfit.errors import WeightsUnavailableError


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _load_state_dict(model: nn.Module, path: Path, transform: Callable | None = None) -> None:
    """Load a state dict file (torch or safetensors) into `model`, with a one-line error on mismatch.

    `transform(state, model)`, e.g. timm's `checkpoint_filter_fn`, adapts the state first (position embeddings
    resampled to the model's input size).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own messages for a file that is not a checkpoint can be a bare number
        raise WeightsUnavailableError(f"cannot read weights file {path}: not a PyTorch or safetensors state dict "
                                      f"({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if transform is not None:
        state = transform(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes: a file for another model or head size
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        mismatched = [line for line in lines if line.startswith("size mismatch")]
        detail = f"{len(mismatched)} tensors have other shapes, e.g. {mismatched[0]}" if mismatched else lines[0]
        raise WeightsUnavailableError(f"weights file {path} does not fit this architecture: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"weights file {path} does not fit this architecture: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )


_OFFLINE_WHY = "offline: EMBEDFIT_OFFLINE or HF_HUB_OFFLINE is set"  # why weights were not downloaded


def offline() -> bool:
    """True when embedfit must not try to download weights (EMBEDFIT_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("EMBEDFIT_OFFLINE", "HF_HUB_OFFLINE"))


def unreachable(url: str, timeout: float = 2.0) -> str | None:
    """Why `url` cannot be reached, or None when it answers (any HTTP status): one probe, at most `timeout`
    seconds, name resolution included (which sockets' own timeouts do not bound).

    Asked before a download from a hub whose client retries for a minute or more with no network.
    """
    import threading
    import urllib.error

    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # it answered
            result.append(None)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result.append(f"{url} unreachable: {str(reason).splitlines()[0] if str(reason) else type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{url} unreachable: no answer within {timeout:g} s"


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download to `dest` atomically (a killed download never leaves a truncated weights file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
    os.replace(tmp, dest)


def _check_published_hash(path: Path) -> None:
    """torchvision names its weight files after the start of their SHA-256 ("resnet18-f37072fd.pth"): a file in
    the cache that does not match is corrupt or not the published weights, and must not be labelled as them."""
    match = re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", path.name)
    if match and not _sha256(path).startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path} is not the published weights file (its SHA-256 does not start with {match.group(1)}); "
            "delete it to download it again, or pass `weights` FILE to use it as your own weights"
        )


def _fetch_or_explain(name: str, url: str, dest: Path) -> None:
    why = _OFFLINE_WHY
    if not offline():
        try:
            _download(url, dest)
            return
        except OSError as exc:
            why = f"download failed: {exc}"
    raise WeightsUnavailableError(
        f"weights for {name} are not in the torch hub cache: expected {dest} ({why}); "
        f"download {url} to that path (or set TORCH_HOME), or pass `weights` FILE"
    )


def _hf_cached_file(model: nn.Module) -> Path | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None
