"""The `embedfit` command line: thin typer commands over the library.

Errors are converted here and only here: an `EmbedfitError` or a usage mistake prints one line on stderr
and exits non-zero (2 for usage, 1 for runtime errors, 130 when interrupted); `--debug` shows tracebacks.
"""

from __future__ import annotations

import sys
import traceback
from enum import Enum
from pathlib import Path

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
out = Console(highlight=False)
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
        raise typer.BadParameter(f"expected a count (10) or a fraction (0.2, 20%), got '{value}'") from None
    if number < 0 or (value.endswith("%") and number > 1):
        raise typer.BadParameter(f"must be a count >= 1 or a fraction in [0, 1), got '{value}'")
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
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    workers: int | None = typer.Option(None, min=0, help="Decoding processes (default: by device/cores)."),
    precision: Precision = typer.Option(Precision.fp32, help="Compute precision (fp16 needs a GPU)."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.float32, help="Stored feature dtype."),
    tta: TTA = typer.Option(TTA.none, help="Test-time augmentation: flip averages an image and its mirror."),
    overwrite: bool = typer.Option(False, help="Start the store afresh instead of resuming."),
    retry_failed: bool = typer.Option(False, help="Retry images that failed in an earlier run."),
    max_failures: str | None = typer.Option(None, help="Abort above this many (10) or this share (0.2) of failures."),
) -> None:
    """Embed every image under SOURCE into a feature store; re-running resumes."""
    from embedfit.extract import ExtractConfig
    from embedfit.extract import extract as run_extract

    config = ExtractConfig(
        backbone=backbone, weights=str(weights) if weights else None, layer=layer, pool=pool.value,
        device=device, batch_size=batch_size, workers=workers, precision=precision.value, dtype=dtype.value,
        tta=tta.value, overwrite=overwrite, retry_failed=retry_failed,
        max_failures=_fraction_or_count(max_failures), progress=err.is_terminal,
    )
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
    from embedfit.backbones import backbone_info, list_backbones

    import torch

    table = Table("name", "family", "dim", "input", "offline")
    for name in list_backbones(pattern):
        i = backbone_info(name)
        table.add_row(name, i.family, str(i.embedding_dim), f"{i.input_size[0]}x{i.input_size[1]}",
                      "yes" if i.offline else "no")
    out.print(table)
    out.print(f"offline = weights on disk now; torchvision weights are expected in {torch.hub.get_dir()}/checkpoints "
              "(or pass --weights FILE). Any timm model also works as timm:NAME.", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, printing errors as one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _DEBUG["on"] = "--debug" in argv
    try:
        result = app(args=argv, prog_name="embedfit", standalone_mode=False)
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


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
