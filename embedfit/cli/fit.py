"""Commands over fitted runs: fit, predict, report."""

from __future__ import annotations

from pathlib import Path

import typer

from embedfit.cli.app import app, err, out
from embedfit.cli.options import (
    EXCLUDE,
    GROUP_DUPLICATES,
    Backend,
    Scale,
    _pca,
)
from embedfit.fitting.registry import classifier_names
from embedfit.progress import StderrSink


@app.command()
def fit(
    store: str = typer.Argument(..., help="Training feature store (.h5) or collection (.json), a local path or a "
                                "URL."),
    model: list[str] = typer.Option(["logreg"], "-m", "--model",
                                    help=f"{', '.join(classifier_names(streaming=False))}, or "
                                    f"{' / '.join(classifier_names(streaming=True))} (out-of-core, for stores larger "
                                    "than memory; hold-out evaluation), or any scikit-learn classifier as "
                                    "pkg.module:Class (default arguments, e.g. "
                                    "sklearn.ensemble:HistGradientBoostingClassifier); repeat for several."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Run directory (default runs/STORE-MODEL)."),
    scale: Scale = typer.Option(Scale.standard, help="Feature scaling inside the pipeline."),
    pca: str = typer.Option("auto", help="PCA components, 'auto' (256 for svm/knn) or 'none'."),
    cv: int = typer.Option(5, min=2, help="Stratified k-fold folds."),
    repeats: int = typer.Option(1, min=1, max=100, help="Repetitions of the k-fold (at most 100)."),
    groups: str | None = typer.Option(None, help="CSV (path,group) or regex on paths: keep groups within folds."),
    group_duplicates: bool = GROUP_DUPLICATES,
    exclude: Path | None = EXCLUDE,
    test_store: str | None = typer.Option(None, help="Evaluate on this store instead of CV."),
    test_size: float | None = typer.Option(None, min=0.0, max=1.0, help="Evaluate on a hold-out share instead."),
    search: bool = typer.Option(False, help="Grid-search hyper-parameters (nested CV)."),
    class_weight: str = typer.Option("balanced", help="balanced or none."),
    jobs: int | None = typer.Option(None, help="Parallel folds (default: one per core as memory allows; -1: all)."),
    backend: Backend = typer.Option(Backend.loky, help="joblib backend for the folds."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (--backend ray): auto, HOST:PORT or "
                                           "ray://HOST:10001."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N; logreg and ridge fit on a GPU (needs "
                               "SCIPY_ARRAY_API=1 in the environment)."),
    seed: int = typer.Option(0, help="Random seed."),
    epochs: int = typer.Option(5, min=1, help="Passes over the data (out-of-core models)."),
    batch_rows: int = typer.Option(8192, min=1, help="Rows read per step (out-of-core models)."),
) -> None:
    """Cross-validate classifiers on stored embeddings and save each as a run directory."""
    # The checks below import neither torch nor scikit-learn (for a zoo name): a mistake is refused at once.
    from embedfit.cli.presentation import print_fit_results
    from embedfit.errors import check_output_not_input
    from embedfit.fitting.device import resolve_fit_device
    from embedfit.fitting.evaluate import fit as run_fit
    from embedfit.fitting.models import model_label, resolve_model

    streaming = classifier_names(streaming=True)  # the registry's streaming records go to fit_out_of_core
    chosen = {name: resolve_model(name) for name in model if name not in streaming}  # refused before any fit
    for name in chosen.values():
        resolve_fit_device(device, name if isinstance(name, str) else model_label(name))
    if len(model) > 1 and output is not None:
        raise typer.BadParameter("-o names one run directory; leave it out to fit several models",
                                 param_hint="--output")
    if output is not None:
        check_output_not_input(output, [store, *([test_store] if test_store else []), *([groups] if groups else []),
                                        *([exclude] if exclude else [])])
    weight = None if class_weight == "none" else class_weight
    if backend is Backend.ray:
        from embedfit.extraction.ray import connect

        connect(ray_address)  # fails in seconds on an address that does not answer
    elif ray_address:
        raise typer.BadParameter("--ray-address needs --backend ray", param_hint="--ray-address")
    if any(name in streaming for name in model):
        from embedfit.fitting.out_of_core import fit_out_of_core
    results = [fit_out_of_core(store, name, output=output, epochs=epochs, batch_rows=batch_rows,
                               test_size=test_size or 0.2, class_weight=weight, seed=seed) if name in streaming else
               run_fit(store, chosen[name], output=output, scale=scale.value, pca=_pca(pca), cv=cv, repeats=repeats,
                       groups=groups, group_duplicates=group_duplicates, exclude=exclude, test_store=test_store,
                       test_size=test_size, search=search,
                       class_weight=weight, jobs=jobs, backend=backend.value, ray_address=ray_address,
                       device=device, seed=seed, progress=True)
               for name in model]
    print_fit_results(out, results)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run directory from `embedfit fit` or `embedfit finetune`."),
    inputs: list[str] = typer.Argument(..., help="Images, folders, CSV lists, or one feature store (.h5) or "
                                       "collection (.json); local paths or URLs such as s3://bucket/new/."),
    output: Path = typer.Option(Path("predictions.csv"), "-o", "--output", help="CSV, or JSON by suffix."),
    weights: Path | None = typer.Option(None, help="Backbone weights file, if the model was built with one."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass (default: by device)."),
) -> None:
    """Predict classes for new images with a saved run (re-embedding them exactly as in training)."""
    from embedfit.errors import check_output_file, check_output_not_input
    from embedfit.prediction import predict as run_predict

    check_output_file(output)
    check_output_not_input(output, [*inputs, *([weights] if weights else [])], run_dirs=[run])
    preds = run_predict(run, inputs, weights=str(weights) if weights else None, device=device,
                        batch_size=batch_size)
    path = preds.write(output)
    out.print(f"{len(preds.paths) - preds.n_failed} images predicted, {preds.n_failed} failed -> {path}",
              soft_wrap=True)
    for p, e in zip(preds.paths, preds.errors, strict=True):
        if e:
            out.print(f"  failed: {p}: {e}", markup=False, soft_wrap=True)
    check = preds.check()  # labelled inputs: their scores, or why the predictions cannot be right
    if check is not None and (check.warning or check.n_scored):
        (err if check.warning else out).print(check.summary(), markup=False, soft_wrap=True)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to report on and compare, one sweep folder, or "
                                      "one audit folder."),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="HTML file to write."),
) -> None:
    """Write a self-contained HTML report (metrics, confusion, embedding map, mistakes) and print a leaderboard;
    given a sweep folder, its leaderboard and accuracy against extraction cost; given an audit folder, its findings
    with thumbnails and a fixes CSV to hand back to `fit --exclude`."""
    from embedfit.auditing import build_audit_report, is_audit_folder
    from embedfit.cli.presentation import print_leaderboard
    from embedfit.report import build_report, summarize_runs
    from embedfit.sweep import is_sweep_folder

    if len(runs) == 1 and is_audit_folder(runs[0]):
        path = build_audit_report(runs[0], output)
        out.print(f"report: {path}; default fixes: {runs[0] / 'fixes.csv'}", soft_wrap=True)
        return

    if len(runs) == 1 and is_sweep_folder(runs[0]):  # a sweep folder: its leaderboard and cost plot
        from embedfit.cli.sweep import print_sweep
        from embedfit.sweep import read_sweep

        path = build_report(runs, output)
        print_sweep(out, read_sweep(runs[0]))
        out.print(f"report: {path}", soft_wrap=True)
        return
    with StderrSink() as sink:
        path = build_report(runs, output, on_progress=sink)  # checks the output path first, before any work
    print_leaderboard(out, summarize_runs(runs))
    out.print(f"report: {path}", soft_wrap=True)
