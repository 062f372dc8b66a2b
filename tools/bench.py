#!/usr/bin/env python
"""Kept for old scripts: the same as `frag bench` (see `frag bench --help`; --out is now a folder)."""

import sys

from fragcli.cli.app import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]], prog_name="frag"))
