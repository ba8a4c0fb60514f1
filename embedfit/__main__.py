"""`python -m embedfit`."""

from embedfit.cli import run

run()
