"""The `frag` command: a thin Typer app. Every FragError is rendered here, once, as one line with exit code 2."""

from __future__ import annotations

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


def _register() -> None:
    from fragcli.cli import commands

    for name, func in commands.COMMANDS.items():
        app.command(name)(func)


_register()


def main() -> None:
    sys.exit(app())  # pragma: no cover
