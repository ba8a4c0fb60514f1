"""What a backbone is: model identity and preprocessing in one frozen dataclass, written into every store.

Imports neither torch nor timm, so that stores and run directories can be read without them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from embedfit.backbones.preprocess import Preprocess


DEFAULT_BACKBONE = "efficientnet_lite0"


POOLS = ("avg", "max", "cls", "mean", "cls+mean", "head")


# Pools of transformer token sequences (ViT, EVA, DeiT...): the class token, the mean of the patch tokens (class and
# register tokens excluded), or both concatenated (DINOv2's linear-evaluation recipe).
TOKEN_POOLS = ("cls", "mean", "cls+mean")


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
        pool: How the layer's output becomes one vector: "avg" (at pre-logits the model's own pooling, at an
            intermediate layer the mean of the feature map), "max", or for transformers "cls", "mean" (patch
            tokens only), "cls+mean" (both, concatenated) and "head" (the model's own pooling head, e.g.
            SigLIP's attention pool).
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
        if self.layer == PRE_LOGITS and self.pool not in ("avg", "head"):
            layer = f", {self.pool}"
        return f"{self.name} ({self.embedding_dim}-d, {self.input_size[0]}x{self.input_size[1]}{layer})"

    def preprocess(self) -> Preprocess:
        from embedfit.backbones.preprocess import Preprocess

        return Preprocess(self.resize_size, self.input_size, self.interpolation)


@dataclass(frozen=True)
class BackboneInfo:
    """What `embedfit backbones` lists, computed without loading weights.

    Attributes:
        licence: Licence of the default weights (SPDX-style, lower case), "" when unknown.
        pool: The pooling used when none is asked for.
        params: Parameters of the network (its size; `embedfit sweep` runs the smallest first).
        weights_source: Where the default weights live, as the shipped catalogue records it (`kind` torch_hub,
            hf or package, with `file`, `repo` or `package`), so that listing finds them without torch; None when
            unknown.
    """

    name: str
    family: str
    embedding_dim: int
    input_size: tuple[int, int]
    weights_file: Path | None
    offline: bool
    licence: str = ""
    pool: str = "avg"
    params: int = 0
    weights_source: dict[str, str] | None = field(default=None, compare=False)
