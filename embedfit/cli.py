"""The `embedfit` command line: thin typer commands over the library.

Errors are converted here and only here: an `EmbedfitError` or a usage mistake prints one line on stderr
and exits non-zero (2 for usage, 1 for runtime errors, 130 when interrupted); `--debug` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import TextIO

import click
import typer
from rich.console import Console
from rich.table import Table

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.errors import EmbedfitError

app = typer.Typer(
    name="embedfit",
    help="Transfer learning on image folders: pretrained CNN embeddings -> HDF5 store -> scikit-learn models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Piped or logged output has no terminal width: rich would assume 80 columns and cut table cells short ("1.000±…").
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
out = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False)
_DEBUG = {"on": False}


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    # typer >= 0.20 vendors click as typer._click; catch both copies so either version reports cleanly.
    modules = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass
    return tuple({getattr(m, name) for m in modules if hasattr(m, name)})


_NO_ARGS = _click_exceptions("NoArgsIsHelpError")
_USAGE = _click_exceptions("UsageError")
_ABORT = _click_exceptions("Abort")
_EXIT = _click_exceptions("Exit")
_CLICK = _click_exceptions("ClickException")


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class FeatureDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class TTA(str, Enum):
    none = "none"
    flip = "flip"


class Decode(str, Enum):
    pil = "pil"
    device = "device"


class Runtime(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Pool(str, Enum):
    avg = "avg"
    max = "max"


def _fraction_or_count(value: str | None) -> float | None:
    """'10' -> 10 images, '0.2' or '20%' -> a fraction."""
    if value is None:
        return None
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a count (10) or a fraction (0.2, 20%), got '{value}'",
                                 param_hint="--max-failures") from None
    if number < 0 or (value.endswith("%") and number > 1):
        raise typer.BadParameter(f"must be a count >= 1 or a fraction in [0, 1), got '{value}'",
                                 param_hint="--max-failures")
    return number


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


# ---------------------------------------------------------------------------------------------------
# extract / info / backbones


@app.command()
def extract(
    source: Path = typer.Argument(..., help="Image folder (class per subfolder, or flat) or CSV (path,label)."),
    output: Path = typer.Option(..., "-o", "--output", help="HDF5 feature store to create or resume."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone", help="Backbone name or timm:NAME."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    layer: str | None = typer.Option(None, help="Intermediate layer (default: pre-logits)."),
    pool: Pool = typer.Option(Pool.avg, help="Global pooling for --layer."),
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
    max_failures: str | None = typer.Option(None, help="Abort above N failures (10) or a share (0.2); default none."),
    flush_every: int = typer.Option(512, min=1, hidden=True, help="Images per part file (work lost if killed)."),
    engine: Engine = typer.Option(Engine.local, help="local, or ray to fan out over a Ray cluster."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (--engine ray)."),
    ray_workers: int = typer.Option(2, min=1, help="Embedding actors, one model each (--engine ray)."),
    num_gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs per actor (--engine ray)."),
    shard_size: int = typer.Option(256, min=1, help="Images per Ray batch and part file (--engine ray)."),
) -> None:
    """Embed every image under SOURCE into a feature store; re-running resumes."""
    from embedfit.extract import ExtractConfig
    from embedfit.extract import extract as run_extract

    config = ExtractConfig(
        backbone=backbone, weights=str(weights) if weights else None, layer=layer, pool=pool.value,
        device=device, batch_size=batch_size, workers=workers, precision=precision.value, dtype=dtype.value,
        tta=tta.value, decode=decode.value, compile=compile, runtime=runtime.value,
        overwrite=overwrite, retry_failed=retry_failed,
        max_failures=_fraction_or_count(max_failures), progress=err.is_terminal, flush_every=flush_every,
    )
    if engine is Engine.ray:
        from embedfit.distributed import extract_ray

        summary = extract_ray(source, output, config, address=ray_address, num_workers=ray_workers,
                              num_gpus_per_worker=num_gpus_per_worker, shard_size=shard_size)
    else:
        summary = run_extract(source, output, config)
    from embedfit.presentation import print_extract_summary

    print_extract_summary(out, summary)


@app.command()
def info(
    store: Path = typer.Argument(..., help="Feature store (.h5)."),
    failed: bool = typer.Option(False, "--failed", help="List every failed image with its reason."),
) -> None:
    """Show what a feature store holds: backbone, counts per class and status, provenance."""
    from embedfit.presentation import print_store_info
    from embedfit.store import FeatureStore

    print_store_info(out, FeatureStore.open(store), list_failed=failed)


@app.command()
def backbones(
    pattern: str = typer.Argument("*", help="Glob over names, e.g. 'resnet*'."),
) -> None:
    """List backbones: embedding size, input size, and whether weights are on disk (usable offline)."""
    import torch

    from embedfit.backbones import backbone_info, list_backbones

    table = Table("name", "family", "dim", "input", "offline")
    for name in list_backbones(pattern):
        i = backbone_info(name)
        table.add_row(name, i.family, str(i.embedding_dim), f"{i.input_size[0]}x{i.input_size[1]}",
                      "yes" if i.offline else "no")
    out.print(table)
    out.print(f"offline = weights on disk now; torchvision weights are expected in {torch.hub.get_dir()}/checkpoints "
              "(or pass --weights FILE). Any timm model also works as timm:NAME.", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# fit / predict


class Scale(str, Enum):
    standard = "standard"
    l2 = "l2"
    none = "none"


class Backend(str, Enum):
    loky = "loky"
    threading = "threading"
    ray = "ray"
    dask = "dask"


@app.command()
def fit(
    store: Path = typer.Argument(..., help="Training feature store (.h5)."),
    model: list[str] = typer.Option(["logreg"], "-m", "--model", help="svm, linear-svm, logreg, knn, ridge, lda, "
                                    "rf, mlp, or sgd-logreg / sgd-svm (out-of-core, for stores larger than memory; "
                                    "hold-out evaluation); repeat for several."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Run directory (default runs/STORE-MODEL)."),
    scale: Scale = typer.Option(Scale.standard, help="Feature scaling inside the pipeline."),
    pca: str = typer.Option("auto", help="PCA components, 'auto' (256 for svm/knn) or 'none'."),
    cv: int = typer.Option(5, min=2, help="Stratified k-fold folds."),
    repeats: int = typer.Option(1, min=1, help="Repetitions of the k-fold."),
    groups: str | None = typer.Option(None, help="CSV (path,group) or regex on paths: keep groups within folds."),
    test_store: Path | None = typer.Option(None, help="Evaluate on this store instead of CV."),
    test_size: float | None = typer.Option(None, min=0.0, max=1.0, help="Evaluate on a hold-out share instead."),
    search: bool = typer.Option(False, help="Grid-search hyper-parameters (nested CV)."),
    class_weight: str = typer.Option("balanced", help="balanced or none."),
    jobs: int | None = typer.Option(None, help="Parallel folds (default: one per core as memory allows; -1: all)."),
    backend: Backend = typer.Option(Backend.loky, help="joblib backend for the folds."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N; logreg and ridge fit on a GPU (needs "
                               "SCIPY_ARRAY_API=1 in the environment)."),
    seed: int = typer.Option(0, help="Random seed."),
    epochs: int = typer.Option(5, min=1, help="Passes over the data (sgd-logreg, sgd-svm)."),
    batch_rows: int = typer.Option(8192, min=1, help="Rows read per step (sgd-logreg, sgd-svm)."),
) -> None:
    """Cross-validate classifiers on stored embeddings and save each as a run directory."""
    from embedfit.distributed import OOC_MODELS, fit_out_of_core
    from embedfit.fit import check_model_name, resolve_fit_device
    from embedfit.fit import fit as run_fit
    from embedfit.presentation import print_fit_results

    for name in model:
        if name not in OOC_MODELS:
            check_model_name(name)
            resolve_fit_device(device, name)  # refuse before the first model is fitted
    if len(model) > 1 and output is not None:
        raise typer.BadParameter("-o names one run directory; leave it out to fit several models",
                                 param_hint="--output")
    weight = None if class_weight == "none" else class_weight
    results = [fit_out_of_core(store, name, output=output, epochs=epochs, batch_rows=batch_rows,
                               test_size=test_size or 0.2, class_weight=weight, seed=seed) if name in OOC_MODELS else
               run_fit(store, name, output=output, scale=scale.value, pca=_pca(pca), cv=cv, repeats=repeats,
                       groups=groups, test_store=test_store, test_size=test_size, search=search,
                       class_weight=weight, jobs=jobs, backend=backend.value, device=device, seed=seed)
               for name in model]
    print_fit_results(out, results)


def _pca(value: str) -> int | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be a positive integer, 'auto' or 'none', got '{value}'", param_hint="--pca")
    return int(value)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run directory from `embedfit fit` or `embedfit finetune`."),
    inputs: list[Path] = typer.Argument(..., help="Images, folders, or one feature store (.h5)."),
    output: Path = typer.Option(Path("predictions.csv"), "-o", "--output", help="CSV, or JSON by suffix."),
    weights: Path | None = typer.Option(None, help="Backbone weights file, if the model was built with one."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass (default: by device)."),
) -> None:
    """Predict classes for new images with a saved run (re-embedding them exactly as in training)."""
    from embedfit.errors import check_output_file
    from embedfit.predict import predict as run_predict

    check_output_file(output)
    preds = run_predict(run, inputs, weights=str(weights) if weights else None, device=device,
                        batch_size=batch_size)
    path = preds.write(output)
    out.print(f"{len(preds.paths) - preds.n_failed} images predicted, {preds.n_failed} failed -> {path}",
              soft_wrap=True)
    for p, e in zip(preds.paths, preds.errors, strict=True):
        if e:
            out.print(f"  failed: {p}: {e}", markup=False, soft_wrap=True)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to report on and compare."),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="HTML file to write."),
) -> None:
    """Write a self-contained HTML report (metrics, confusion, embedding map, mistakes) and print a leaderboard."""
    from embedfit.presentation import print_leaderboard
    from embedfit.report import build_report, summarize_runs

    path = build_report(runs, output)  # checks the output path first, before any work
    print_leaderboard(out, summarize_runs(runs))
    out.print(f"report: {path}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# The transfer-learning comparison: as-is, fine-tune, scratch, compare


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="Image files, folders or CSV lists."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone", help="Backbone with an ImageNet head."),
    top: int = typer.Option(5, min=1, help="Classes to show per image."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Also write the rows to this CSV."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    device: str = typer.Option("auto"),
) -> None:
    """Classify images with the pretrained ImageNet model as-is (top classes and probabilities)."""
    from embedfit.errors import check_output_file
    from embedfit.finetune import classify as run_classify

    if output:
        check_output_file(output)
    rows = run_classify(images, args_backbone(backbone), top=top, weights=_path_str(weights), device=device)
    table = Table("image", "rank", "class", "probability")
    for r in rows:
        table.add_row(Path(r["path"]).name, str(r["rank"]), r["class"] or r["error"],
                      f"{r['probability']:.3f}" if r["probability"] != "" else "")
    out.print(table)
    if output:
        from embedfit.fit import write_predictions_csv

        write_predictions_csv(output, rows)


def _path_str(path: Path | None) -> str | None:
    return str(path) if path else None


def args_backbone(name: str) -> str:
    from embedfit.backbones import check_backbone_name

    check_backbone_name(name)
    return name


def _train_command(data: Path, output: Path, pretrained: bool, **options: object) -> None:
    from embedfit.finetune import TrainConfig, train

    augment = tuple(a for a in str(options.pop("augment")).split(",") if a and a != "none")
    config = TrainConfig(pretrained=pretrained, augment=augment, progress=err.is_terminal, **options)
    result = train(data, config, output=output)
    table = Table("epoch", "train loss", "val accuracy", "seconds")
    for e in result.epochs:
        loss = "-" if e["epoch"] == 0 else f"{e['train_loss']:.4f}"  # epoch 0: the untrained head
        table.add_row(str(e["epoch"]), loss, f"{e['val_accuracy']:.3f}", f"{e['seconds']:.1f}")
    out.print(table)
    out.print(f"best validation accuracy {result.val_accuracy:.3f} in {result.train_seconds:.1f} s -> "
              f"{result.run_dir}", soft_wrap=True)


@app.command()
def finetune(
    data: Path = typer.Argument(..., help="Labeled image folder (class per sub-folder) or CSV."),
    output: Path = typer.Option(Path("runs/finetune"), "-o", "--output", help="Run directory."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone", help="Pretrained backbone."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    freeze: str = typer.Option("last:2", help="head, last:N (last N blocks trainable) or all."),
    unfreeze_every: int = typer.Option(0, min=0, help="Gradual unfreezing: one more block every N epochs."),
    epochs: int = typer.Option(5, min=1), batch_size: int = typer.Option(16, min=1),
    lr_head: float = typer.Option(1e-3, min=0.0), lr_backbone: float = typer.Option(1e-4, min=0.0),
    weight_decay: float = typer.Option(1e-4, min=0.0), dropout: float = typer.Option(0.2, min=0.0, max=1.0),
    augment: str = typer.Option("flip,crop", help="Comma list of flip, rotate, scale, crop, color (or none)."),
    val_size: float = typer.Option(0.2), patience: int = typer.Option(3, min=1),
    device: str = typer.Option("auto"), seed: int = typer.Option(0),
) -> None:
    """Fine-tune a pretrained backbone with a new head (freeze policy, discriminative learning rates)."""
    _train_command(data, output, True, backbone=args_backbone(backbone), weights=_path_str(weights), freeze=freeze,
                   unfreeze_every=unfreeze_every, epochs=epochs, batch_size=batch_size, lr_head=lr_head,
                   lr_backbone=lr_backbone, weight_decay=weight_decay, dropout=dropout, augment=augment,
                   val_size=val_size, patience=patience, device=device, seed=seed)


@app.command()
def scratch(
    data: Path = typer.Argument(..., help="Labeled image folder (class per sub-folder) or CSV."),
    output: Path = typer.Option(Path("runs/scratch"), "-o", "--output", help="Run directory."),
    arch: str = typer.Option(DEFAULT_BACKBONE, "--arch", help="Architecture, randomly initialised."),
    epochs: int = typer.Option(5, min=1), batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(1e-3, min=0.0), weight_decay: float = typer.Option(1e-4, min=0.0),
    augment: str = typer.Option("flip,crop"), val_size: float = typer.Option(0.2),
    patience: int = typer.Option(3, min=1), device: str = typer.Option("auto"), seed: int = typer.Option(0),
) -> None:
    """Train the same architecture from random initialisation (the baseline transfer learning should beat)."""
    _train_command(data, output, False, backbone=args_backbone(arch), freeze="all", epochs=epochs,
                   batch_size=batch_size, lr_head=lr, lr_backbone=lr, weight_decay=weight_decay, augment=augment,
                   val_size=val_size, patience=patience, device=device, seed=seed)


@app.command()
def compare(
    data: Path = typer.Argument(..., help="Labeled image folder (class per sub-folder) or CSV."),
    output: Path = typer.Option(Path("runs/compare"), "-o", "--output", help="Folder for the results."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone"),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    epochs: int = typer.Option(3, min=1, help="Epochs for fine-tuning and scratch."),
    sizes: str = typer.Option("5,10,25,50,all", help="Learning-curve sizes: images per class."),
    repeats: int = typer.Option(3, min=1, help="Seeded splits; accuracy is mean ± std over them."),
    val_size: float = typer.Option(0.25, min=0.01, max=0.99, help="Validation share of each split."),
    device: str = typer.Option("auto"), seed: int = typer.Option(0),
) -> None:
    """As-is vs linear probe vs fine-tuning vs scratch on identical splits, with a learning curve."""
    from embedfit.compare import compare as run_compare
    from embedfit.compare import to_markdown

    try:
        steps = [None if s == "all" else int(s) for s in sizes.split(",") if s]
    except ValueError:
        raise typer.BadParameter(f"expected numbers or 'all', got '{sizes}'", param_hint="--sizes") from None
    result = run_compare(data, output, backbone=args_backbone(backbone), weights=_path_str(weights), epochs=epochs,
                         sizes=steps, repeats=repeats, val_size=val_size, device=device, seed=seed)
    out.print(to_markdown(result), markup=False, soft_wrap=True)
    out.print(f"results: {output}/compare.json, {output}/compare.md, {output}/learning_curve.png", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, printing errors as one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _DEBUG["on"] = "--debug" in argv
    _show_library_notes()
    try:
        result = app(args=argv, prog_name="embedfit", standalone_mode=False)
        if result == 130:  # typer turns Ctrl-C into this return code: say so, as for every other stop
            _report("interrupted")
        return result if isinstance(result, int) else 0
    except _NO_ARGS as exc:
        out.print(exc.ctx.get_help() if exc.ctx else "")
        return 0
    except _USAGE as exc:
        _report(exc.format_message() + (f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""))
        return 2
    except _ABORT:
        _report("aborted")
        return 130
    except _EXIT as exc:
        return exc.exit_code
    except _CLICK as exc:
        _report(exc.format_message())
        return exc.exit_code
    except EmbedfitError as exc:
        _report(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        _report(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


def _report(message: str) -> None:
    if _DEBUG["on"]:
        traceback.print_exc()
    err.print(f"error: {' '.join(str(message).split())}", markup=False, soft_wrap=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it is swapped by tests and notebooks)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def _show_library_notes() -> None:
    """The library logs what takes a while (e.g. a one-off model export) at INFO; show it on stderr, once."""
    logger = logging.getLogger("embedfit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
