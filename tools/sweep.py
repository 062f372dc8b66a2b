#!/usr/bin/env python
"""Kept for old scripts: the same as `frag sweep` (see `frag sweep --help`); --retentions is read as --values."""

import sys

from fragcli.cli.app import app

if __name__ == "__main__":
    args = ["--values" if a == "--retentions" else a for a in sys.argv[1:]]
    sys.exit(app(["sweep", *args], prog_name="frag"))
