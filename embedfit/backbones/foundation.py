"""Foundation backbones by name (DINOv2, CLIP, SigLIP, EVA-02, ConvNeXt V2), through timm, with the preprocessing
and pooling their authors use for linear probes; and the token pooling / block selection of any transformer.

The table (`FOUNDATION`) imports nothing heavy, so that the CLI and `ExtractConfig` can know a backbone's default
pooling without torch; the builders import torch and timm when called.

Weights come from the Hugging Face cache (timm's repositories, `timm/<model>`) or a `weights` file; nothing asks
the hub when the file is cached.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedfit.backbones.registry import register_backbone
from embedfit.backbones.spec import PRE_LOGITS, TOKEN_POOLS, BackboneInfo
from embedfit.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from embedfit.backbones.registry import BuiltBackbone



@dataclass(frozen=True)
class Foundation:
    """One named foundation backbone.

    Attributes:
        name: Registry name.
        arch: timm model name with its pretrained tag (the weights).
        family: What `embedfit backbones` shows as the family.
        pool: Default pooling: what the authors use for linear probes.
        resolution: Default input size (square).
        crop_pct: Input size / resize size of the authors' evaluation transform; None keeps timm's.
        licence: Licence of the weights.
        tokens: A transformer (token pools and block layers apply).
    """

    name: str
    arch: str
    family: str
    pool: str
    resolution: int
    crop_pct: float | None
    licence: str
    tokens: bool = True

    @property
    def hub_id(self) -> str:
        return f"timm/{self.arch}"


FOUNDATION: dict[str, Foundation] = {f.name: f for f in (
    # DINOv2: linear evaluation at 224 (Resize 256 + CenterCrop 224, bicubic) on the class token concatenated with
    # the mean of the patch tokens (timm's default is 518 px, ~5x slower, for dense tasks).
    Foundation("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", "DINOv2", "cls+mean", 224, 0.875, "apache-2.0"),
    Foundation("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", "DINOv2", "cls+mean", 224, 0.875, "apache-2.0"),
    # CLIP: Resize 224 bicubic + CenterCrop 224 (crop 1.0), CLIP's mean/std; the class token after ln_post (the
    # image embedding before CLIP's projection).
    Foundation("clip_vitb16_openai", "vit_base_patch16_clip_224.openai", "CLIP (OpenAI)", "cls", 224, 1.0, "mit"),
    Foundation("clip_vitb16_laion", "vit_base_patch16_clip_224.laion2b", "OpenCLIP (LAION-2B)", "cls", 224, 1.0,
               "mit"),
    # SigLIP has no class token: its own attention-pooling head makes the image embedding.
    Foundation("siglip_vitb16", "vit_base_patch16_siglip_224.webli", "SigLIP", "head", 224, 1.0, "apache-2.0"),
    # EVA-02 (MIM pre-trained on IN-22k): mean of the patch tokens, as its own head does.
    Foundation("eva02_small", "eva02_small_patch14_224.mim_in22k", "EVA-02", "mean", 224, None, "mit"),
    # ConvNeXt V2 (FCMAE, fine-tuned on IN-22k then IN-1k): a CNN, globally averaged.
    Foundation("convnextv2_tiny", "convnextv2_tiny.fcmae_ft_in22k_in1k", "ConvNeXt V2", "avg", 224, None,
               "cc-by-nc-4.0", tokens=False),
)}


def default_pool(name: str) -> str:
    """The pooling a backbone uses when none is asked for (no torch)."""
    entry = FOUNDATION.get(name)
    return entry.pool if entry else "avg"


# ---------------------------------------------------------------------------------------------------
# Token pooling and block selection, for any timm transformer


def is_token_model(model: Any) -> bool:
    """A timm transformer whose features are a token sequence (class/register tokens first, then patches)."""
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks") and hasattr(model, "forward_intermediates")


def block_index(layer: str | None, n_blocks: int) -> int | None:
    """'-4', '8' or 'blocks.8' -> a block index in [0, n_blocks); anything else (a graph node name) -> None."""
    if layer is None or layer == PRE_LOGITS:
        return None
    match = re.fullmatch(r"(?:blocks\.)?(-?\d+)", layer.strip())
    if match is None:
        return None
    i = int(match.group(1))
    if not -n_blocks <= i < n_blocks:
        raise UsageError(f"layer {layer} is out of range: this transformer has {n_blocks} blocks "
                         f"(use 0..{n_blocks - 1}, -1..-{n_blocks} or blocks.N)")
    return i % n_blocks


class TokenPool:
    """Marker base for trunks that expose the full timm model as `.model` (fine-tuning counts its blocks)."""


@functools.cache
def _token_pool_module() -> type:
    import torch
    from torch import nn

    class _TokenPool(nn.Module, TokenPool):
        """A transformer's tokens at the last or a chosen block (final norm applied), pooled to (N, D).

        `head` is the model's own pooling head (timm's pre-logits); `cls` the class token; `mean` the mean of the
        patch tokens (class and register tokens excluded); `cls+mean` both concatenated.
        """

        def __init__(self, model: nn.Module, pool: str, block: int | None) -> None:
            super().__init__()
            self.model = model
            self.pool = pool
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.model
            if self.pool == "head":
                return m.forward_head(m.forward_features(x), pre_logits=True)
            n_prefix = int(m.num_prefix_tokens)
            if self.block is None:
                tokens = m.forward_features(x)
                prefix, patches = tokens[:, :n_prefix], tokens[:, n_prefix:]
            else:
                out = m.forward_intermediates(x, indices=[self.block], norm=True, stop_early=True,
                                              output_fmt="NLC", intermediates_only=True,
                                              return_prefix_tokens=n_prefix > 0)[0]
                patches, prefix = out if n_prefix > 0 else (out, None)
            fc_norm = getattr(m, "fc_norm", None)
            norm = fc_norm if fc_norm is not None and not isinstance(fc_norm, nn.Identity) else (lambda t: t)
            parts = []
            if self.pool in ("cls", "cls+mean"):
                parts.append(norm(prefix[:, 0]))
            if self.pool in ("mean", "cls+mean"):
                parts.append(norm(patches.mean(dim=1)))
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    return _TokenPool


def token_trunk(model: nn.Module, name: str, layer: str | None, pool: str) -> tuple[nn.Module, str, str]:
    """The trunk of a transformer for `layer` and `pool`; returns (trunk, layer as recorded, pool as recorded).

    Raises:
        UsageError: A pooling the model cannot do (class token without one, `head` at an inner block) or a block
            index out of range.
    """
    n_blocks = len(model.blocks)
    block = block_index(layer, n_blocks)
    if pool == "avg":  # a transformer's "average" is the mean of its patch tokens
        pool = "mean" if block is not None else pool
    if pool == "max":
        raise UsageError(f"`pool` max does not apply to transformer tokens; choose {', '.join(TOKEN_POOLS)}")
    if pool in ("cls", "cls+mean") and getattr(model, "cls_token", None) is None:
        raise UsageError(f"{name} has no class token; use `pool` mean" + (" or head" if block is None else ""))
    if pool == "head" and block is not None:
        raise UsageError(f"`pool` head is the model's own pooling after the last block; at layer {layer} choose "
                         f"{', '.join(TOKEN_POOLS)}")
    recorded = PRE_LOGITS if block is None else f"blocks.{block}"
    return _token_pool_module()(model, pool, block), recorded, pool


# ---------------------------------------------------------------------------------------------------
# Builders


def _filter_for(model: nn.Module) -> Any:
    """timm's checkpoint filter for the model's family: resamples position embeddings to another input size."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _create(entry: Foundation, resolution: int, **kwargs: Any) -> nn.Module:
    import timm

    size = {"img_size": resolution} if entry.tokens else {}
    return timm.create_model(entry.arch, **size, **kwargs)


def _preprocess(entry: Foundation, model: nn.Module, resolution: int) -> dict[str, Any]:
    from embedfit.backbones.timm_models import _timm_preprocess

    pre = _timm_preprocess(model)
    crop_pct = entry.crop_pct or (pre["input_size"][0] / pre["resize_size"])
    pre.update(input_size=(resolution, resolution), resize_size=math.floor(resolution / crop_pct + 1e-6))
    return pre


def build_foundation(name: str, *, weights: Path | None, pretrained: bool,
                     resolution: int | None) -> BuiltBackbone:
    """Builder of a named foundation backbone (transformers are built for `resolution`)."""
    from embedfit.backbones.timm_models import _imagenet_names, _timm_from_cache, timm_built
    from embedfit.backbones.weights import _hf_cached_file, _load_state_dict

    entry = FOUNDATION[name]
    res = resolution or entry.resolution
    weights_file: Path | None = None
    if weights is not None or not pretrained:
        model = _create(entry, res, pretrained=False)
        if weights is not None:
            _load_state_dict(model, weights, transform=_filter_for(model))
        weights_id, weights_file = (f"file:{weights.name}", weights) if weights else ("random", None)
    else:
        model = _timm_from_cache(entry.arch, **({"img_size": res} if entry.tokens else {}))
        weights_id, weights_file = entry.hub_id, _hf_cached_file(model)
    class_names = _imagenet_names() if getattr(model, "num_classes", 0) == 1000 else None
    return timm_built(model, architecture=f"timm/{entry.arch}", weights=weights_id, weights_file=weights_file,
                      class_names=class_names, **_preprocess(entry, model, res))


def hf_cache_file(hub_id: str) -> Path | None:
    """The cached weights file of a Hugging Face repository, found without importing huggingface_hub or torch."""
    import os

    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"),
        "hub")
    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = sorted(repo.glob(f"snapshots/*/{filename}"))
        if found:
            return found[0]
    return None


def foundation_info(name: str) -> BackboneInfo:
    """Info of a named foundation backbone from its module tree."""
    import timm

    from embedfit.backbones.factory import skeleton

    entry = FOUNDATION[name]
    size = {"img_size": entry.resolution} if entry.tokens else {}
    model = skeleton(functools.partial(timm.create_model, entry.arch, pretrained=False, **size))
    dim = int(model.num_features) * (2 if entry.pool == "cls+mean" else 1)
    file = hf_cache_file(entry.hub_id)
    return BackboneInfo(name, entry.family, dim, (entry.resolution, entry.resolution), file, file is not None,
                        licence=entry.licence, pool=entry.pool, params=sum(p.numel() for p in model.parameters()),
                        weights_source={"kind": "hf", "repo": entry.hub_id})


for _name in FOUNDATION:  # the table imports nothing heavy: registering loads no torch
    register_backbone(_name, build_foundation, foundation_info)
