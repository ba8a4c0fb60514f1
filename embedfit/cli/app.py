"""The `embedfit` command line: the typer app and the one place errors become output.

An `EmbedfitError` or a usage mistake prints one line on stderr and exits non-zero (2 for usage, 1 for runtime
errors, 130 when interrupted); `--debug` shows tracebacks. The commands live in `embedfit.cli.extract`
(extract, info, backbones), `embedfit.cli.fit` (fit, predict, report) and `embedfit.cli.train` (classify,
finetune, scratch, compare); each is a few lines calling the library, which is imported inside the command so
that `embedfit --help` starts without torch or scikit-learn.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import TextIO

import click
import typer
from rich.console import Console

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


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, printing errors as one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _DEBUG["on"] = "--debug" in argv
    _show_library_notes()
    try:
        if any("://" in a for a in argv):  # object-storage URLs: unsupported ones, or where a path is due, fail now
            from embedfit.remote import check_cli_urls

            check_cli_urls(argv, typer.main.get_command(app))
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
