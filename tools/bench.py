#!/usr/bin/env python
"""Benchmark a fragment against its full model, side by side in one process. See fragcli/bench.py."""

import sys

from fragcli.bench import main

if __name__ == "__main__":
    sys.exit(main())
