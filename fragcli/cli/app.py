"""The `frag` command: a thin Typer app. Every FragError is rendered here, once, as one line with exit code 2."""

from __future__ import annotations

import functools
import os
import sys

import click
import typer
from typer.core import TyperGroup

from fragcli import __version__
from fragcli.errors import FragError


class FragGroup(TyperGroup):
    """Renders FragError as ``error: <problem> -- <fix>`` and exits with its code; no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FragError as exc:
            if os.environ.get("FRAG_DEBUG"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.code)
        except KeyboardInterrupt:
            click.echo("error: interrupted -- nothing half-written was left behind; re-run to finish", err=True)
            ctx.exit(130)


app = typer.Typer(
    cls=FragGroup,
    name="frag",
    help="frag: build prompt-specific fragments of text-to-image diffusion models.\n\n"
    "Example: frag profile \"a large red circle in the center on a blue background\" --seeds 4",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"frag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    """frag: build prompt-specific fragments of text-to-image diffusion models."""


def quiet_libraries() -> None:
    """diffusers/transformers to errors only, no library progress bars (frag draws its own), no FutureWarnings."""
    import warnings

    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def set_threads() -> None:
    """``FRAG_THREADS=N`` pins torch's CPU threads (1 is steadiest on a shared machine)."""
    n = os.environ.get("FRAG_THREADS")
    if n:
        try:
            count = max(1, int(n))
        except ValueError:
            raise FragError(f"FRAG_THREADS={n!r} is not a number", "set FRAG_THREADS to a positive integer") from None
        import torch

        torch.set_num_threads(count)


def configure_process() -> None:
    """The process-wide settings of the ``frag`` command, made here only (library calls change none of them)."""
    set_threads()
    quiet_libraries()


def _with_process_setup(func):
    """Run ``configure_process`` when a command starts (after its options parse, so ``--help`` stays fast), and
    release the output locks the command still holds when it ends, however it ends."""

    @functools.wraps(func)
    def command(*args, **kwargs):
        from fragcli.paths import release_held_locks

        try:
            configure_process()
            return func(*args, **kwargs)
        finally:
            release_held_locks()

    return command


def _register() -> None:
    from fragcli.cli import commands

    for name, func in commands.COMMANDS.items():
        app.command(name)(_with_process_setup(func))
    from fragcli.cli import cache

    for info in cache.app.registered_commands:
        info.callback = _with_process_setup(info.callback)
    app.add_typer(cache.app, name="cache")


_register()


def main() -> None:
    sys.exit(app())  # pragma: no cover
