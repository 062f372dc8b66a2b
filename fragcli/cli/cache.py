"""`frag cache list|show|rm|prune|verify`: the fragment library (``fragcli.library``) that --fragment auto searches."""

from __future__ import annotations

from typing import Annotated

import typer

from fragcli.cli import options as o

app = typer.Typer(
    name="cache",
    help="The fragment library: every fragment frag extract built, searched by prompt similarity "
    "(frag generate --fragment auto), evicted least-recently-used under a size cap.\n\n"
    "Example: frag cache list",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

Ref = Annotated[str, typer.Argument(help="A fragment's name or folder (see frag cache list).", show_default=False)]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _rate(c: dict) -> str:
    total = c["hits"] + c["misses"]
    return f"{c['hits']} hits, {c['misses']} misses" + (f" (hit rate {c['hits'] / total:.0%})" if total else "")


@app.command("list")
def list_(json_out: o.Json = False):
    """Every fragment in the library, most recently used first, with its size, uses and the hit/miss counts.

    Example: frag cache list --json
    """
    from fragcli import library
    from fragcli.console import print_json

    found = sorted(library.entries(), key=lambda e: e.last_used or e.created, reverse=True)
    counts = library.counters()
    total = sum(e.size_bytes for e in found)
    if json_out:
        print_json({"fragments": [e.summary() for e in found], "total_bytes": total, **counts})
        return
    for e in found:
        used = (e.last_used or "never")[:19]
        typer.echo(f"{e.name:40.40}  {e.model_name:10.10}  {_size(e.size_bytes):>10}  {e.use_count:>4} uses  "
                   f"last {used:19}  {e.prompt[:50]!r}")
    typer.echo(f"{len(found)} fragments, {_size(total)}; lookups: {_rate(counts)}")


@app.command()
def show(ref: Ref, json_out: o.Json = False):
    """One fragment's library entry: folder, base model, prompt, techniques, size, quality, uses.

    Example: frag cache show fragments/tiny-a-red-circle-h60
    """
    from fragcli import library
    from fragcli.console import print_json

    e = library.get(ref)
    if json_out:
        print_json(e.summary())
        return
    for key, value in e.summary().items():
        typer.echo(f"{key:16} {value}")


@app.command()
def rm(refs: Annotated[list[str], typer.Argument(help="Fragment names or folders.", show_default=False)],
       json_out: o.Json = False):
    """Delete fragments and their library entries. Only a folder frag wrote, unchanged, is deleted (anything
    else in it is yours: refused in one line, nothing deleted).

    Example: frag cache rm tiny-a-red-circle-h60
    """
    from fragcli import library_disk as disk
    from fragcli.console import print_json

    removed = [disk.remove(ref).folder for ref in refs]
    if json_out:
        print_json({"removed": removed})
        return
    for folder in removed:
        typer.echo(f"removed {folder}")


@app.command()
def prune(
    max_size: Annotated[str | None, typer.Option("--max-size", help="Size cap, e.g. 500MiB or 2GB (default: "
                                                 "max_size in $FRAG_HOME/config.yaml).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    json_out: o.Json = False,
):
    """Evict the least-recently-used fragments until the library fits under the size cap. Entries whose folder is
    gone are dropped; a folder frag did not write (or that was edited) is kept, with a warning.

    Example: frag cache prune --max-size 500MiB
    """
    from fragcli import library_disk as disk
    from fragcli.console import print_json, warn
    from fragcli.errors import FragError

    cap = max_size if max_size is not None else disk.load_config().max_size
    if cap is None:
        raise FragError("no size cap: --max-size is not given and config.yaml sets no max_size",
                        f"pass --max-size 500MiB, or write 'max_size: 500MiB' into {disk.config_path()}")
    result = disk.prune(disk.parse_size(cap), warn=warn, dry_run=dry_run)
    if json_out:
        print_json(result)
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(result['removed'])} fragments ({', '.join(result['removed']) or 'none'}); "
               f"{len(result['kept'])} kept, {_size(result['total_bytes'])} of {_size(result['max_bytes'])}")


@app.command()
def verify(
    quick: Annotated[bool, typer.Option("--quick", help="Check presence and sizes only, not every hash.")] = False,
    json_out: o.Json = False,
):
    """Re-check every fragment's manifest and artifact hashes; drop entries whose folder was moved, deleted,
    replaced or corrupted (with a warning), and register finished fragments under fragments/ it does not know.

    Example: frag cache verify --json
    """
    from fragcli import library_disk as disk
    from fragcli.console import print_json, warn

    result = disk.scan(full=not quick, warn=warn)
    if json_out:
        print_json(result)
        return
    typer.echo(f"{len(result['ok'])} ok, {len(result['dropped'])} dropped, {len(result['added'])} registered")
