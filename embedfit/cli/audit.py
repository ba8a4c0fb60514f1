"""`embedfit audit`: duplicates, conflicting labels, leaks, label issues and outliers in a store."""

from __future__ import annotations

from pathlib import Path

import typer

from embedfit.cli.app import app, out


@app.command()
def audit(
    store: str = typer.Argument(..., help="Feature store (.h5) or collection (.json) to audit, a local path or "
                                "a URL."),
    output: Path = typer.Option(Path("audit"), "-o", "--output", help="Folder for audit.csv and audit.json."),
    test_store: str | None = typer.Option(None, help="Hold-out store to check for images leaked from STORE."),
    run: Path | None = typer.Option(None, help="A CV run of `embedfit fit` on STORE: use its out-of-fold "
                                    "probabilities for label issues."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Cosine similarity from which two images "
                                           "are near-duplicates (default: calibrated, 0.95)."),
    neighbors: int = typer.Option(10, min=1, help="Nearest neighbours looked at per image."),
    imagenet: bool = typer.Option(True, help="Use the backbone's ImageNet head as label evidence where the class "
                                  "names map onto ImageNet."),
) -> None:
    """Find exact and near-duplicates, conflicting labels, train/test leaks, label issues and outliers."""
    from embedfit.auditing import KINDS, NEAR_DUPLICATE_THRESHOLD
    from embedfit.auditing import audit as run_audit
    from embedfit.errors import check_output_not_input

    check_output_not_input(output, [store, *([test_store] if test_store else [])], run_dirs=[run] if run else [])
    result = run_audit(store, output, test_store=test_store, run=run, neighbors=neighbors,
                       threshold=NEAR_DUPLICATE_THRESHOLD if threshold is None else threshold,
                       imagenet="auto" if imagenet else "off")
    for note in result.notes:
        out.print(f"note: {note}", markup=False, soft_wrap=True)
    out.print(f"{result.settings['images']} images audited:", soft_wrap=True)
    for kind in KINDS:
        top = result.of_kind(kind)[:3]
        example = f"  e.g. {top[0]['path']}" + (f" ~ {top[0]['other']}" if top and top[0]["other"] else "") if top \
            else ""
        out.print(f"  {kind:<19} {result.counts[kind]:>6}{example}", markup=False, soft_wrap=True)
    out.print(f"-> {result.output / 'audit.csv'}, audit.json; `embedfit report {result.output}` shows them",
              markup=False, soft_wrap=True)
