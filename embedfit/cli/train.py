"""The transfer-learning comparison: classify (as-is), finetune, scratch, compare."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from embedfit.backbones.spec import DEFAULT_BACKBONE
from embedfit.cli.app import app, err, out
from embedfit.cli.options import (
    _path_str,
    args_backbone,
)


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
    from embedfit.errors import check_output_file, check_output_not_input
    from embedfit.training.classify import classify as run_classify

    if output:
        check_output_file(output)
        check_output_not_input(output, [*images, *([weights] if weights else [])])
    rows = run_classify(images, args_backbone(backbone), top=top, weights=_path_str(weights), device=device)
    table = Table("image", "rank", "class", "probability")
    for r in rows:
        table.add_row(Path(r["path"]).name, str(r["rank"]), r["class"] or r["error"],
                      f"{r['probability']:.3f}" if r["probability"] != "" else "")
    out.print(table)
    if output:
        from embedfit.runs import write_predictions_csv

        write_predictions_csv(output, rows)


def _train_command(data: Path, output: Path, pretrained: bool, **options: object) -> None:
    from embedfit.training.finetune import TrainConfig, train

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
    repeats: int = typer.Option(3, min=1, max=100, help="Seeded splits; accuracy is mean ± std over them."),
    val_size: float = typer.Option(0.25, min=0.01, max=0.99, help="Validation share of each split."),
    device: str = typer.Option("auto"), seed: int = typer.Option(0),
) -> None:
    """As-is vs linear probe vs fine-tuning vs scratch on identical splits, with a learning curve."""
    from embedfit.training.compare import compare as run_compare
    from embedfit.training.compare import to_markdown

    parts = [s.strip() for s in sizes.split(",") if s.strip()]
    bad = [s for s in parts if s != "all" and not (s.isdigit() and int(s) > 0)]
    if bad:
        raise typer.BadParameter(f"expected positive numbers of images per class or 'all', got '{bad[0]}'",
                                 param_hint="--sizes")
    steps = [None if s == "all" else int(s) for s in parts]
    result = run_compare(data, output, backbone=args_backbone(backbone), weights=_path_str(weights), epochs=epochs,
                         sizes=steps, repeats=repeats, val_size=val_size, device=device, seed=seed)
    out.print(to_markdown(result), markup=False, soft_wrap=True)
    out.print(f"results: {output}/compare.json, {output}/compare.md, {output}/learning_curve.png", soft_wrap=True)
