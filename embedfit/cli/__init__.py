"""The `embedfit` command line (typer). `main(argv)` returns the exit code; `run()` is the console script."""

from embedfit.cli import audit, cluster, extract, fit, sweep, train  # noqa: F401  (registers the commands, in --help order)
from embedfit.cli.app import app, main, run

__all__ = ["app", "main", "run"]
