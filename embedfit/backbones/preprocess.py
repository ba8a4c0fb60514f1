"""Decoded image -> uint8 tensor (3, H, W): the resize and centre crop a `BackboneSpec` names."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
