"""`dqar report RESULTS.jsonl [--out DIR]`: Markdown tables and PNG figures from `dqar sweep` rows.

The report needs no model: images come from the samples the sweep saved beside the results file.
Without --out it goes to `<results stem>.report/` beside the results file (results.jsonl -> results.report/).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results file written by dqar sweep (JSON lines)")
    parser.add_argument("--out", default=None,
                        help="folder for report.md and the PNGs, created if missing (default: RESULTS' name with "
                             "'.report' for its suffix, beside it: results.jsonl -> results.report/)")


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_file():
        what = "is a folder" if results.is_dir() else "does not exist"
        raise UsageError(f"results file {str(results)!r} {what} (write it with dqar sweep --out FILE)")
    from dqar.harness.report import build_report, default_out

    out = default_out(results) if args.out is None else Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={str(out)!r} exists and is not a folder")
    path = build_report(results, out)
    print(f"dqar report: wrote {path} and {len(list(out.glob('*.png')))} figure(s)")
    return 0
