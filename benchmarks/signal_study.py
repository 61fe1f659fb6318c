"""Which signal predicts harm (issue 17, part 2): single-position forecasts at cache ages 1-4 on the shipped
embedded model, and Spearman / ROC AUC of every candidate signal against the final-image error.

    python benchmarks/signal_study.py --out docs/policy                 # measure + analyse (~20 min, 1 thread)
    python benchmarks/signal_study.py --out docs/policy --rows-in docs/policy/signal_rows.csv   # re-analyse

Writes OUT/signal_rows.csv (one row per position and seed: the position, every signal, MSE and PSNR vs the
uncached image), OUT/signal_results.json (metadata, per-group Spearman / AUC, fitted coefficients) and
OUT/signal_study.md (the tables). Quality only, no timing: it may share the machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dqar.harness.signal_analysis import (FITS, age_growth, evaluate, fit_coefficients, groups_of, growth_table,
                                          markdown_tables)
from dqar.harness.signal_study import TARGETS, run_study

_TEXT = ("target", "branch")
_INT = ("step", "layer", "order", "seed", "class_label")


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.7g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [{k: (v if k in _TEXT else int(v) if k in _INT else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/policy")
    ap.add_argument("--n-images", type=int, default=3, help="seeds 0..n-1, class k %% 10")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--orders", default="0,2")
    ap.add_argument("--ages", default="1,2,3,4")
    ap.add_argument("--per-group", type=int, default=44, help="positions per (target, order, age)")
    ap.add_argument("--max-batch", type=int, default=24, help="positions resumed together in one batch")
    ap.add_argument("--position-seed", type=int, default=0)
    ap.add_argument("--psnr-threshold", type=float, default=75.0,
                    help="a position is harmful when its single-position PSNR vs uncached is below this (dB)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows-in", default=None, help="analyse these rows instead of measuring")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.rows_in:
        rows = read_rows(Path(args.rows_in))
        meta = json.loads((out / "signal_results.json").read_text())["meta"] \
            if (out / "signal_results.json").exists() else {}
    else:
        from dqar.digits.embedded import load_embedded_model

        model = load_embedded_model().eval()
        seeds = list(range(args.n_images))
        rows, meta = run_study(model, [k % 10 for k in seeds], seeds, steps=args.steps, cfg_scale=args.cfg_scale,
                               targets=args.targets.split(","), orders=ints(args.orders), ages=ints(args.ages),
                               per_group=args.per_group, max_batch=args.max_batch, seed=args.position_seed,
                               progress=lambda d, n: print(f"\r{d}/{n} positions", end="", file=sys.stderr))
        print(file=sys.stderr)
        meta.update({"model": "embedded (dqar.digits.embedded)", "date": date.today().isoformat(),
                     "threads": args.threads, "machine": platform.platform(), "measure_s": round(time.time() - started),
                     "command": "python benchmarks/signal_study.py " + " ".join(argv if argv is not None else sys.argv[1:])})
        write_rows(out / "signal_rows.csv", rows)
    results = evaluate(rows, args.psnr_threshold)
    fits = {g: {name: fit_coefficients(sub, feats) for name, feats in FITS.items()}
            for g, sub in groups_of(rows).items()}
    growth = age_growth(rows)
    meta["psnr_threshold"] = args.psnr_threshold
    (out / "signal_results.json").write_text(json.dumps({"meta": meta, "results": results, "fits": fits,
                                                         "age_growth": growth}, indent=1))
    columns = [c for c in results if c == "all" or " o" in c]
    table = markdown_tables(results, columns) + "\n**Growth of the gated error with cache age** (median of " \
        "now_gated / rate_gated; error control assumes a^(k+1))\n\n" + growth_table(growth)
    head = (f"Signal study: {meta.get('rows')} rows ({meta.get('positions')} positions x {len(meta.get('seeds', []))} "
            f"seeds), harmful = single-position PSNR < {args.psnr_threshold:g} dB vs uncached.\n\n")
    (out / "signal_study.md").write_text(head + table)
    print(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
