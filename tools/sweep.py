#!/usr/bin/env python
"""Sweep head retention: extract + validate at several retentions, so H1 is answered with a curve.

Example: python tools/sweep.py reports/demo/profile --retentions 0.9,0.8,0.7,0.6,0.5 --seeds 4 --out reports/demo/sweep
Then:    frag report --run reports/demo --sweep reports/demo/sweep   (plots quality_vs_retention.png)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="profile folder (frag profile)")
    ap.add_argument("--retentions", default="0.9,0.8,0.7,0.6,0.5", help="comma-separated head retentions")
    ap.add_argument("--seeds", default="4", help="validation seeds (frag's --seeds syntax)")
    ap.add_argument("--score", default="composite")
    ap.add_argument("--thresholds", type=Path, default=None)
    ap.add_argument("--paraphrases", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True, help="sweep folder; one h<NN>/ sub-folder per retention")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from fragcli.cli.app import app
    from fragcli.console import err

    try:
        retentions = [float(x) for x in args.retentions.split(",") if x.strip()]
    except ValueError:
        err.print(f"error: bad --retentions {args.retentions!r} -- pass numbers such as 0.9,0.7,0.5")
        return 2
    for r in retentions:
        point = args.out / f"h{round(r * 100):02d}"
        ow = ["--overwrite"] if args.overwrite else []
        steps = [
            ["extract", str(args.profile), "--head-retention", str(r), "--score", args.score, "--out",
             str(point / "fragment"), *ow],
            ["validate", str(point / "fragment"), "--seeds", args.seeds, "--out", str(point / "validate"),
             *ow, *(["--thresholds", str(args.thresholds)] if args.thresholds else []),
             *(["--paraphrases", str(args.paraphrases)] if args.paraphrases else [])],
        ]
        for cmd in steps:
            err.print(f"[bold]sweep h={r:.2f}[/]: frag {cmd[0]}")
            code = app(cmd, standalone_mode=False, prog_name="frag")
            if code not in (None, 0):
                return int(code)
    print(f"sweep written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
