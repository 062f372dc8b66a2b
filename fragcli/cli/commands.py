"""The command registry: name -> function (one module per command)."""

from fragcli.cli.bench import bench
from fragcli.cli.extract import extract
from fragcli.cli.generate import generate
from fragcli.cli.profile import profile
from fragcli.cli.report import report
from fragcli.cli.sweep import sweep
from fragcli.cli.validate import validate

COMMANDS = {
    "profile": profile,
    "extract": extract,
    "generate": generate,
    "validate": validate,
    "bench": bench,
    "sweep": sweep,
    "report": report,
}
