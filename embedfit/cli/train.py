"""The transfer-learning comparison: classify (as-is), finetune, scratch, compare."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from embedfit.backbones.spec import DEFAULT_BACKBONE
from embedfit.cli.app import app, err, out
from embedfit.cli.options import (
    EXCLUDE,
    GROUP_DUPLICATES,
    _path_str,
    args_backbone,
)
from embedfit.progress import StderrSink


@app.command()
def classify(
    images: list[Path] = typer.Argument(..., help="Image files, folders or CSV lists."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "-b", "--backbone", help="Backbone with an ImageNet head."),
    top: int = typer.Option(5, min=1, help="Classes to show per image."),
    classes: str | None = typer.Option(None, "--classes",
                                       help="Choose only among these classes (comma list, e.g. ants,bees), "
                                            "mapped onto ImageNet classes by name."),
    imagenet_map: Path | None = typer.Option(None, "--imagenet-map",
                                             help="CSV of class,imagenet_class rows: the classes to choose among."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the rows to this CSV (no table)."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    device: str = typer.Option("auto"),
) -> None:
    """Classify images with the pretrained ImageNet model as-is (top classes and probabilities)."""
    from embedfit.errors import UsageError, check_inputs_exist, check_output_file, check_output_not_input

    check_inputs_exist([*images, *([imagenet_map] if imagenet_map else [])])
    backbone = args_backbone(backbone)
    from embedfit.training.classify import class_mapping
    from embedfit.training.classify import classify as run_classify

    if output:
        check_output_file(output)
        check_output_not_input(output, [*images, *([weights] if weights else [])])
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    mapping = class_mapping(names, _path_str(imagenet_map))
    if mapping is not None and not mapping.applicable:
        raise UsageError(mapping.reason)
    rows = run_classify(images, backbone, top=top, weights=_path_str(weights), device=device,
                        mapping=mapping)
    if mapping is not None:
        for cls, found, how in zip(mapping.class_names, mapping.imagenet_names, mapping.matched, strict=True):
            err.print(f"{cls}: {', '.join(repr(n.split(', ')[0]) for n in found[:4])}"
                      f"{f' (+{len(found) - 4} more)' if len(found) > 4 else ''} ({how})", markup=False,
                      soft_wrap=True)
    if output:
        from embedfit.runs import write_predictions_csv

        write_predictions_csv(output, rows)
        failed = sum(1 for r in rows if r["error"])
        out.print(f"{len({r['path'] for r in rows})} images classified -> {output}"
                  + (f" ({failed} could not be read)" if failed else ""), soft_wrap=True, markup=False)
        return
    table = Table("image", "rank", "class", "probability")
    for r in rows:
        path = Path(r["path"])
        table.add_row(f"{path.parent.name}/{path.name}" if path.parent.name else path.name, str(r["rank"]),
                      r["class"] or r["error"], f"{r['probability']:.3f}" if r["probability"] != "" else "")
    out.print(table)


def _train_command(data: Path, output: Path, pretrained: bool, **options: object) -> None:
    from embedfit.errors import check_inputs_exist

    check_inputs_exist([data])  # before torch: a wrong path is refused at once
    from embedfit.training.finetune import TrainConfig, train

    augment = tuple(a for a in str(options.pop("augment")).split(",") if a and a != "none")
    config = TrainConfig(pretrained=pretrained, augment=augment, **options)
    with StderrSink() as sink:
        result = train(data, config, output=output, on_progress=sink)
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
    freeze: str = typer.Option("last:2", help="head, last:N (last N blocks trainable) or none (nothing "
                                              "frozen)."),
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
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--arch", help="Architecture, randomly initialised."),
    epochs: int = typer.Option(5, min=1), batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(1e-3, min=0.0), weight_decay: float = typer.Option(1e-4, min=0.0),
    augment: str = typer.Option("flip,crop"), val_size: float = typer.Option(0.2),
    patience: int = typer.Option(3, min=1), device: str = typer.Option("auto"), seed: int = typer.Option(0),
) -> None:
    """Train the same architecture from random initialisation (the baseline transfer learning should beat)."""
    _train_command(data, output, False, backbone=args_backbone(backbone), freeze="none", epochs=epochs,
                   batch_size=batch_size, lr_head=lr, lr_backbone=lr, weight_decay=weight_decay, augment=augment,
                   val_size=val_size, patience=patience, device=device, seed=seed)


@app.command()
def compare(
    data: Path = typer.Argument(..., help="Labeled image folder (class per sub-folder) or CSV."),
    output: Path = typer.Option(Path("runs/compare"), "-o", "--output", help="Folder for the results."),
    test: Path | None = typer.Option(None, "--test", help="Held-out labeled folder or CSV: every arm is scored on it."),
    arms: str = typer.Option("as-is,probe,finetune,scratch", "--arms", help="Arms to run (comma list)."),
    backbone: list[str] = typer.Option([DEFAULT_BACKBONE], "-b", "--backbone",
                                       help="Backbone of every arm; repeat it to add a linear-probe arm per backbone."),
    weights: Path | None = typer.Option(None, help="State-dict file instead of the default weights."),
    epochs: int = typer.Option(3, min=1, help="Epochs for fine-tuning."),
    scratch_epochs: int | None = typer.Option(None, "--scratch-epochs", min=1,
                                              help="Epochs for scratch (default: fine-tuning's optimizer steps, "
                                                   "i.e. the same epochs)."),
    freeze: str = typer.Option("last:2", help="Fine-tune freeze policies, one arm each: head, last:N, none."),
    augment: str = typer.Option("on", help="Fine-tune augmentation, one arm each: on, off or on,off."),
    sizes: str = typer.Option("5,10,25,50,all", help="Learning-curve sizes: images per class."),
    repeats: int = typer.Option(3, min=1, max=100, help="Seeded splits; every arm runs on each."),
    val_size: float = typer.Option(0.25, min=0.01, max=0.99, help="Validation share of each split."),
    imagenet_map: Path | None = typer.Option(None, "--imagenet-map",
                                             help="CSV of class,imagenet_class rows for the as-is arm."),
    device: str = typer.Option("auto"), seed: int = typer.Option(0),
    stores: list[Path] = typer.Option([], "--store", help="Feature store holding some of the training or test "
                                      "images (embedfit extract's): they are not embedded again; repeat for several."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", min=0.01,
                                             help="Budget: the arms estimated to fit run, the others are skipped."),
    group_duplicates: bool = GROUP_DUPLICATES,
    exclude: Path | None = EXCLUDE,
) -> None:
    """As-is vs linear probe vs fine-tuning vs scratch on identical splits, ending in a recommendation."""
    from embedfit.errors import check_inputs_exist

    check_inputs_exist([data, *([test] if test else []), *([imagenet_map] if imagenet_map else []),
                        *([exclude] if exclude else [])])
    names = [args_backbone(b) for b in backbone]  # all before torch: a mistake is refused at once
    parts = [s.strip() for s in sizes.split(",") if s.strip()]
    bad = [s for s in parts if s != "all" and not (s.isdigit() and int(s) > 0)]
    if bad:
        raise typer.BadParameter(f"expected positive numbers of images per class or 'all', got '{bad[0]}'",
                                 param_hint="--sizes")
    steps = [None if s == "all" else int(s) for s in parts]
    switch = {"on": True, "off": False}
    if not augment or any(a.strip() not in switch for a in augment.split(",")):
        raise typer.BadParameter(f"expected on, off or on,off, got '{augment}'", param_hint="--augment")
    from embedfit.training.compare import CompareConfig, parse_arms, to_markdown
    from embedfit.training.compare import compare as run_compare

    config = CompareConfig(backbone=names[0], weights=_path_str(weights), probe_backbones=names[1:], epochs=epochs,
                           scratch_epochs=scratch_epochs, sizes=steps, repeats=repeats, val_size=val_size,
                           device=device, seed=seed, arms=parse_arms(arms),
                           freeze=[f.strip() for f in freeze.split(",") if f.strip()],
                           augment=[switch[a.strip()] for a in augment.split(",")], test=test,
                           imagenet_map=_path_str(imagenet_map), stores=[str(s) for s in stores],
                           max_minutes=max_minutes, group_duplicates=group_duplicates, exclude=exclude)
    with StderrSink() as sink:
        result = run_compare(data, output, config, on_progress=sink)
    out.print(f"results: {', '.join(result['files'])}", soft_wrap=True, markup=False)
    out.print(to_markdown(result), markup=False, soft_wrap=True, end="")

