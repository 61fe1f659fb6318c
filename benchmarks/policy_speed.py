"""Wall clock of policy sampling vs plain sampling on the embedded DiT, interleaved, at each threshold.

Every contender samples the same images (`--per-class` per class, seeds 0.., DDIM, CFG, one batch): the plain
model (no hooks), each policy at each threshold (targets attention+MLP, order-2 forecasts, no warmup: the
configuration benchmarks/policy_pareto.py measures quality for) and, with --intervals, the fixed intervals at
the same targets and order. Warm-up runs, then `--rounds` rounds alternating all contenders with a rotating
start (dqar.harness.timing.interleaved_timing). A round's ratio is plain time / contender time from the same
round; reported: the median ratio, its spread (min..max over rounds) and the work share.

    python benchmarks/policy_speed.py --policy v1=shipped --policy v2=src/dqar/digits/assets/policy_digits.safetensors \
        --thresholds 0.3,0.5,0.7,0.9 --intervals 3 --rounds 7 --threads 2 --json out/policy_speed.json
    python benchmarks/policy_speed.py --policy v2ne1=docs/policy/policy_v2_noentropy_err1.safetensors \
        --error-images 1 --thresholds 0.5,0.7 --intervals 3 --per-class 2 --rounds 5 --threads 2
    python benchmarks/policy_speed.py --policy v1=shipped --thresholds 0.5 --per-class 1 --steps 5 --rounds 1 \
        --warmup-runs 0                                          # smoke test

Run it on an idle machine: the ratios are only as good as the machine is quiet.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date

import torch

from dqar import DQARConfig
from dqar.digits.embedded import load_embedded_model
from dqar.harness.timing import dqar_contender, interleaved_timing
from dqar.sampling import sample


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", default=[], help="TAG=FILE or TAG=shipped; repeatable")
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    p.add_argument("--intervals", default="", help="comma list of fixed intervals to time alongside (default none)")
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--error-images", type=int, default=0,
                   help="the policies' forecast error over this many images per branch (0: all, the default)")
    p.add_argument("--targets", default="attn,mlp", help="what the policies and intervals cache (default attn,mlp)")
    p.add_argument("--branch-decisions", default="each", choices=("each", "cond"),
                   help="the policies: each CFG branch decides on its own (each) or cond's plan serves both")
    p.add_argument("--error-targets", default="", help="the policies: measure these targets only (default: all)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.policies = {}
    for item in args.policy:
        tag, sep, path = item.partition("=")
        if not sep or not tag or not path:
            p.error(f"--policy={item!r} is not allowed: TAG=FILE or TAG=shipped")
        args.policies[tag] = None if path == "shipped" else path
    try:
        args.threshold_list = [float(t) for t in args.thresholds.split(",") if t.strip()]
        args.interval_list = [int(t) for t in args.intervals.split(",") if t.strip()]
    except ValueError as exc:
        p.error(f"--thresholds / --intervals: {exc}")
    if not args.policies and not args.interval_list:
        p.error("nothing to time: give --policy TAG=FILE and/or --intervals")
    if not all(0.0 <= t <= 1.0 for t in args.threshold_list):
        p.error(f"--thresholds={args.thresholds!r} is not allowed: numbers in [0, 1]")
    if args.rounds < 1 or args.warmup_runs < 0 or args.per_class < 1 or args.steps < 2 or args.error_images < 0:
        p.error("--rounds >= 1, --warmup-runs >= 0, --per-class >= 1, --steps >= 2 and --error-images >= 0 are "
                "required")
    return args


def configs(args) -> dict:
    out = {}
    targets = tuple(t for t in args.targets.split(",") if t)
    for tag, path in args.policies.items():
        for t in args.threshold_list:
            out[f"policy-{tag}-thr{t:g}"] = DQARConfig(schedule="policy", policy_path=path, policy_threshold=t,
                                                       warmup=0.0, targets=targets,
                                                       forecast_order=args.order, error_images=args.error_images,
                                                       branch_decisions=args.branch_decisions,
                                                       error_targets=tuple(t for t in args.error_targets.split(",")
                                                                           if t) or None)
    for k in args.interval_list:
        out[f"interval{k}"] = DQARConfig(schedule="interval", interval=k, warmup=0.0, targets=targets,
                                         forecast_order=args.order)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_embedded_model()
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(len(labels)))
    summaries: dict[str, dict] = {}

    def run():
        return sample(model, labels, seeds, steps=args.steps, cfg_scale=args.cfg_scale)

    def contender(name, config):
        return dqar_contender(model, config, run, summaries, name)

    contenders = {"plain": run, **{name: contender(name, cfg) for name, cfg in configs(args).items()}}
    results = interleaved_timing(contenders, rounds=args.rounds, warmup_runs=args.warmup_runs, measure_memory=False)
    plain = results["plain"].samples
    rows = []
    for name, res in results.items():
        ratios = [p / s for p, s in zip(plain, res.samples)]
        s = summaries.get(name, {})
        rows.append({"contender": name, "median_s": res.median, "speedup_median": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "reuse_fraction": s.get("reuse_fraction", 0.0), "ideal_speedup": s.get("ideal_speedup"),
                     "samples_s": res.samples})
    where = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"embedded DiT, {len(labels)} images + CFG in one batch, {args.steps} DDIM steps, {args.rounds} rounds "
          f"interleaved after {args.warmup_runs} warm-up run(s); {where}; {date.today()}")
    print("| contender | median s | speedup vs plain (median of per-round ratios) | min..max | reuse fraction "
          "| FLOP bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        bound = f"{r['ideal_speedup']:.3f}" if r["ideal_speedup"] else "-"
        print(f"| {r['contender']} | {r['median_s']:.2f} | {r['speedup_median']:.3f} | {r['speedup_min']:.3f}.."
              f"{r['speedup_max']:.3f} | {r['reuse_fraction']:.3f} | {bound} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows, "date": str(date.today()),
                       "machine": where}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
