"""Extraction: image files -> embeddings -> a resumable feature store.

Stages, each usable alone:
    settings  `ExtractConfig` (one field per CLI option), `ExtractSummary`, device-dependent defaults
    reader    `ImageDataset`: decode + preprocess in DataLoader workers, a status per file
    encoder   `Encoder` (batched model on a device) and `iter_embeddings`, the one loop that runs images
              through a network (extraction, prediction, classification); `embed_decoded`, the same for
              images already decoded in memory (fine-tuning's evaluation, compare)
    writer    `FeatureWriter`: buffers results into crash-safe parts and commits the store; every engine uses it
    engines   the engine registry (`register_engine`, `create_engine`) and `ExtractJob`, what an engine gets
    local     `extract()`, every engine's entry point; `LocalEngine`: this machine
    ray       `RayEngine`: the same on a Ray cluster (`extract_ray()` for short)
    parts     the input listed and planned part by part where the data is (the Ray engine's listing files)
    onnx      ONNX Runtime as a faster CPU engine for a backbone

Loaded lazily: `import embedfit.extraction` does not import torch.
"""

from __future__ import annotations

from embedfit._lazy import attach

_LAZY = {
    "ExtractConfig": "settings", "ExtractSummary": "settings", "resolve_device": "settings",
    "ImageDataset": "reader",
    "Encoder": "encoder", "BatchResult": "encoder", "iter_embeddings": "encoder", "embed_decoded": "encoder",
    "embed_images": "encoder",
    "FeatureWriter": "writer",
    "ExtractJob": "engines", "create_engine": "engines", "register_engine": "engines",
    "extract": "local", "LocalEngine": "local",
    "extract_ray": "ray", "RayEngine": "ray",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
