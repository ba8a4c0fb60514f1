"""Commands over feature stores: extract, info, collect, backbones."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from embedfit.backbones.spec import DEFAULT_BACKBONE
from embedfit.cli.app import app, out
from embedfit.cli.options import (
    TTA,
    Decode,
    Engine,
    FeatureDtype,
    Pool,
    Precision,
    Runtime,
    _max_failures,
)


@app.command()
def extract(
    # str, not Path: Path would collapse the '//' of an s3:// URL into a local path (embedfit.url)
    source: str = typer.Argument(..., help="Image folder (class per subfolder, or flat) or CSV (path,label); "
                                 "a local path or a URL such as s3://bucket/prefix."),
    output: str = typer.Option(..., "-o", "--output", help="HDF5 feature store to create or resume "
                               "(a local path or a URL such as s3://bucket/feats.h5)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone", help="Backbone name or timm:NAME."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    layer: str | None = typer.Option(None, help="Intermediate layer (default: pre-logits); transformers: a block, "
                                     "blocks.8 or -4 (4th from the end)."),
    pool: Pool | None = typer.Option(None, help="avg/max over a feature map; transformers: cls, mean (patch tokens), "
                                     "cls+mean, head (default: the backbone's own, e.g. cls+mean for DINOv2)."),
    resolution: int | None = typer.Option(None, min=16, help="Input size instead of the backbone's default "
                                          "(e.g. 518 for DINOv2)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass (default: 8 on CPU, 128 on GPU)."),
    workers: int | None = typer.Option(None, min=0, help="Decoding processes (default: by device/cores)."),
    precision: Precision = typer.Option(Precision.fp32, help="Compute precision (fp16 needs a GPU)."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float32, help="Stored feature dtype."),
    tta: TTA = typer.Option(TTA.none, help="Test-time augmentation: flip averages an image and its mirror."),
    decode: Decode = typer.Option(Decode.pil, help="pil: decode in CPU worker processes; device: JPEGs on the GPU."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (long GPU runs)."),
    runtime: Runtime = typer.Option(Runtime.auto, help="auto: ONNX Runtime for fp32 on CPU if installed; torch; onnx."),
    overwrite: bool = typer.Option(False, help="Start the store afresh instead of resuming."),
    retry_failed: bool = typer.Option(False, help="Retry images that failed in an earlier run."),
    max_failures: str | None = typer.Option(None, help="Abort when more than N images fail (10), or more than a "
                                            "share of those to embed (0.2 or 20%); default none."),
    flush_every: int = typer.Option(512, min=1, hidden=True, help="Images per part file (work lost if killed)."),
    engine: Engine = typer.Option("local", help="local, or ray to fan out over a Ray cluster."),
    # named as RayEngine names them, so that its errors show these flags; given only when set
    address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (--engine ray)."),
    num_workers: int | None = typer.Option(None, "--ray-workers", min=1,
                                           help="Embedding actors, one model each (--engine ray; default 2)."),
    num_gpus_per_worker: float | None = typer.Option(None, min=0.0, help="GPUs per actor (--engine ray; default 0)."),
    cpus_per_worker: int | None = typer.Option(None, min=1, help="CPUs per actor, = its model's threads "
                                               "(--engine ray; default 1)."),
    shard_size: int | None = typer.Option(None, min=1, help="Write a sharded store: a manifest plus one HDF5 file "
                                          "per N images (default: one file; 1024 with --engine ray)."),
    keep_warm: float | None = typer.Option(None, "--ray-keep-warm", min=0.0, help="Seconds the actors stay idle after "
                                           "the run for the next one with the same settings (--engine ray with "
                                           "--ray-address; default 600; 0 stops them with the run)."),
) -> None:
    """Embed every image under SOURCE into a feature store; re-running resumes."""
    from embedfit.errors import check_output_not_input
    from embedfit.extraction.engines import create_engine
    from embedfit.extraction.local import extract as run_extract
    from embedfit.extraction.settings import ExtractConfig

    check_output_not_input(output, [source, *([weights] if weights else [])])
    config = ExtractConfig(
        backbone=backbone, weights=str(weights) if weights else None, layer=layer,
        pool=pool.value if pool else None, resolution=resolution,
        device=device, batch_size=batch_size, workers=workers, precision=precision.value, dtype=dtype.value,
        tta=tta.value, decode=decode.value, compile=compile, runtime=runtime.value,
        overwrite=overwrite, retry_failed=retry_failed,
        max_failures=_max_failures(max_failures), progress=True, flush_every=flush_every,
        shard_size=shard_size,
    )
    engine_options = {k: v for k, v in dict(address=address, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                                            num_gpus_per_worker=num_gpus_per_worker, keep_warm=keep_warm).items()
                      if v is not None}
    summary = run_extract(source, output, config, engine=create_engine(engine.value, **engine_options))
    from embedfit.cli.presentation import print_extract_summary

    print_extract_summary(out, summary)


@app.command()
def info(
    store: str = typer.Argument(..., help="Feature store (.h5) or collection (.json), a local path or a URL."),
    failed: bool = typer.Option(False, "--failed", help="List every failed image with its reason."),
    verify: bool = typer.Option(False, "--verify", help="Read the whole store: every checksum, every shard's keys."),
) -> None:
    """Show what a feature store holds: backbone, counts per class and status, provenance."""
    from embedfit.cli.presentation import print_store_info
    from embedfit.storage import FeatureStore

    opened = FeatureStore.open(store)
    if verify:
        out.print(f"verified: {opened.verify()} rows, every checksum and key")
    print_store_info(out, opened, list_failed=failed)


@app.command()
def collect(
    output: str = typer.Argument(..., help="Collection file to write (.json), a local path or a URL."),
    members: list[str] = typer.Argument(..., help="Member stores (.h5), local paths or URLs, in row order."),
) -> None:
    """Combine stores into one collection, read as one store by every command (same backbone and settings)."""
    from embedfit.storage import collect as run_collect

    collection = run_collect(output, members)
    out.print(f"{output}: {len(collection.members)} member stores, {len(collection)} images ({collection.n_ok} ok), "
              f"{len(collection.class_names)} classes, {collection.settings.describe()}", soft_wrap=True, markup=False)


@app.command()
def backbones(
    pattern: str = typer.Argument("*", help="Glob over names, e.g. 'resnet*'."),
) -> None:
    """List backbones: licence, embedding size, input size, pooling, and whether weights are on disk (offline)."""
    from embedfit.backbones.catalogue import list_infos, torch_hub_dir

    table = Table("name", "family", "licence", "params", "dim", "input", "pool", "offline")
    for i in list_infos(pattern):
        table.add_row(i.name, i.family, i.licence or "?", f"{i.params / 1e6:.1f}M" if i.params else "?",
                      str(i.embedding_dim), f"{i.input_size[0]}x{i.input_size[1]}", i.pool,
                      "yes" if i.offline else "no")
    out.print(table)
    out.print(f"offline = weights on disk now; torchvision weights are expected in {torch_hub_dir()}/checkpoints, "
              "foundation backbones (DINOv2, CLIP, SigLIP, EVA-02, ConvNeXt V2) in the Hugging Face cache "
              "(or pass --weights FILE). Any timm model also works as timm:NAME.", soft_wrap=True)
