"""`embedfit ray ...`: the embedfit actors a Ray cluster keeps between runs."""

from __future__ import annotations

import typer

from embedfit.cli.app import app, out

ray_app = typer.Typer(name="ray", no_args_is_help=True,
                      help="Ray clusters: the warm embedding actors that `extract --engine ray` leaves.")
app.add_typer(ray_app, name="ray")


@ray_app.command("stop-workers")
def stop_workers(
    address: str | None = typer.Option(None, "--ray-address", help="The cluster (HOST:PORT, auto, ray://HOST:10001); "
                                       "default: the one this machine runs."),
) -> None:
    """Stop every warm embedding actor on a running cluster (they also exit by themselves once idle)."""
    from embedfit.extraction.ray import stop_workers as stop

    stopped = stop(address)
    out.print(f"stopped {stopped} warm embedfit actor{'' if stopped == 1 else 's'}")
