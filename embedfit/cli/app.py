"""The `embedfit` command line: the typer app and the one place errors become output.

An `EmbedfitError` or a usage mistake prints one line on stderr and exits non-zero (2 for usage, 1 for runtime
errors, 130 when interrupted); `--debug` shows tracebacks. Library messages name parameters as Python spells them,
in backticks (`test_size`); `name_flags` shows the command's flag instead (--test-size). The commands live in
`embedfit.cli.extract` (extract, info, backbones), `embedfit.cli.fit` (fit, predict, report) and
`embedfit.cli.train` (classify, finetune, scratch, compare); each is a few lines calling the library, which is
imported inside the command so that `embedfit --help` starts without torch or scikit-learn.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
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
            from embedfit.url import check_cli_urls

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
        _report(name_flags(str(exc), argv))
        return exc.exit_code
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        _report(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


# Library parameters that a command's option stands for under another name (elsewhere the names agree): fit hands
# its --ray-address (FitConfig.ray_address) to `embedfit.extraction.ray.connect(address)`.
_SAME_AS: dict[str, dict[str, str]] = {"fit": {"address": "ray_address"}}


def name_flags(message: str, argv: Sequence[str]) -> str:
    """`message` with each backticked parameter of the command that `argv` runs written as its flag: "`test_size`
    must be ..." -> "--test-size must be ..." for `embedfit fit`. Other backticked text stays as written (the
    parameters of other commands or of the library only, and whole commands such as `embedfit extract ...`)."""
    name = next((a for a in argv if not a.startswith("-")), None)  # the root's only option, --debug, takes no value
    command = getattr(typer.main.get_command(app), "commands", {}).get(name)
    if command is None:
        return message
    flags = {}
    for param in command.params:  # click's metadata: .name is the Python name, .opts its flags (none: an argument)
        longs = [o for o in param.opts if o.startswith("--")] or [o for o in param.opts if o.startswith("-")]
        if longs:
            flags[param.name] = longs[0]
    for alias, same in _SAME_AS.get(name, {}).items():
        if same in flags:
            flags.setdefault(alias, flags[same])
    return _PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


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
