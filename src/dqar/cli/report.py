"""`dqar report RESULTS.jsonl --out DIR`: Markdown tables and PNG figures from `dqar sweep` rows.

The report needs no model: images come from the samples the sweep saved beside the results file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results file written by dqar sweep (JSON lines)")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNGs (created if missing)")


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_file():
        raise UsageError(f"results file {str(results)!r} does not exist (write it with dqar sweep --out)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={args.out!r} exists and is not a folder")
    from dqar.harness.report import build_report

    path = build_report(results, out)
    print(f"dqar report: wrote {path} and {len(list(out.glob('*.png')))} figure(s)")
    return 0
