"""`embedfit sweep`: every backbone x every model on identical splits, ranked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from embedfit.cli.app import app, out
from embedfit.cli.options import EXCLUDE, GROUP_DUPLICATES, Pool
from embedfit.progress import StderrSink


@app.command()
def sweep(
    data: Path = typer.Argument(..., help="Labeled image folder (class per sub-folder) or CSV."),
    output: Path = typer.Option(Path("runs/sweep"), "-o", "--output", help="Sweep folder (re-running resumes)."),
    backbones: list[str] = typer.Option([], "-b", "--backbone", help="Backbone to try; repeat for several "
                                        "(default: every one with weights on disk, smallest first)."),
    models: list[str] = typer.Option(["logreg"], "-m", "--model", help="Classifier to fit on each; repeat."),
    test: Path | None = typer.Option(None, help="Labeled test folder: evaluate on it instead of CV."),
    layers: list[str] = typer.Option([], "--layer", help="Layer to embed from, on every backbone; repeat to "
                                     "sweep layers (transformers: a block, blocks.8 or -4)."),
    pool: Pool | None = typer.Option(None, help="Pooling (default: each backbone's own)."),
    resolution: int | None = typer.Option(None, min=16, help="Input size for every backbone (default: each one's)."),
    metric: str = typer.Option("accuracy", help="accuracy, balanced_accuracy or f1_macro: what ranks them."),
    cv: int = typer.Option(5, min=2, help="Stratified k-fold folds (the same folds for every entry)."),
    repeats: int = typer.Option(1, min=1, help="Repetitions of the k-fold (more pairs, a surer ranking)."),
    device: str = typer.Option("auto", help="Extraction device: auto, cpu, cuda, cuda:N or mps."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass (default: by device)."),
    seed: int = typer.Option(0, help="Random seed of the folds and models."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", min=0.01,
                                             help="Budget: backbones estimated not to fit are skipped and named."),
    group_duplicates: bool = GROUP_DUPLICATES,
    exclude: Path | None = EXCLUDE,
) -> None:
    """Extract each backbone once, fit every model on identical folds, and rank them with a paired interval."""
    from embedfit.errors import check_inputs_exist

    # before torch: a wrong path is refused at once
    check_inputs_exist([data, *([test] if test else []), *([exclude] if exclude else [])])
    from embedfit.sweep import SweepConfig, read_sweep
    from embedfit.sweep import sweep as run_sweep

    config = SweepConfig(backbones=tuple(backbones), models=tuple(models), layers=tuple(layers) or (None,),
                         pool=pool.value if pool else None, resolution=resolution, test=test, metric=metric, cv=cv,
                         repeats=repeats, seed=seed, device=device, batch_size=batch_size,
                         max_minutes=max_minutes, group_duplicates=group_duplicates, exclude=exclude)
    with StderrSink() as sink:
        result = run_sweep(data, output, config, on_progress=sink)
    print_sweep(out, read_sweep(output))
    out.print(f"sweep: {output}/leaderboard.md, {output}/sweep.json ({result.seconds:.0f} s); "
              f"embedfit report {output} draws it", soft_wrap=True)


def print_sweep(console: Console, state: dict[str, Any]) -> None:
    """The leaderboard, best first, then the verdict and any backbone that failed."""
    from embedfit.sweep import LEADERBOARD_HEADER, _cells, recommendation, verdict

    table = Table(*LEADERBOARD_HEADER)
    for e in state["entries"]:
        table.add_row(*_cells(e))
    console.print(table)
    console.print(verdict(state["entries"], state["comparisons"]), markup=False, soft_wrap=True)
    console.print(f"Recommendation: {recommendation(state['entries'], state['comparisons'])}", markup=False,
                  soft_wrap=True)
    for f in state.get("failures", []):
        console.print(f"  failed: {f['backbone']}: {f['error']}", markup=False, soft_wrap=True)
    for k in state.get("skipped", []):
        console.print(f"  skipped: {k['backbone']}: {k['reason']}", markup=False, soft_wrap=True)
