"""DQAR speed on random-weight DiT shapes: hook overhead, measured vs ideal speedup, entropy cost, MLP reuse.

Every configuration is a full sampling run (CFG, one image = batch 2) timed interleaved with the
unhooked baseline in one process (warm-up, then alternating rounds, median), so load on a shared
machine hits all of them alike. Usage:

    python benchmarks/dqar_speed.py --model DiT-B/2 --steps 50 --rounds 3
    python benchmarks/dqar_speed.py --model DiT-B/2 --steps 10 --rounds 9 --only hooked,entropy   # overhead
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date

import torch

from dqar import DQARConfig
from dqar.digits.embedded import load_embedded_model
from dqar.harness.timing import dqar_contender, interleaved_timing
from dqar.models import build_dit
from dqar.sampling import sample

# id (for --only) -> (row label, config)
CONFIGS = {
    "hooked": ("hooked, no reuse", DQARConfig(schedule="none")),
    "entropy": ("entropy only (no reuse)", DQARConfig(schedule="none", record_entropy=True)),
    "static": ("static w=0.3 l=1.0", DQARConfig(warmup=0.3, layer_fraction=1.0)),
    "seed000": ("static w=0.4 l=0.33", DQARConfig(warmup=0.4, layer_fraction=0.33)),
    "mlp": ("static w=0.3 l=1.0 attn+mlp", DQARConfig(warmup=0.3, layer_fraction=1.0, targets=("attn", "mlp"))),
    "modules3o2": ("interval 3 attn+mlp, order 2", DQARConfig(schedule="interval", interval=3, warmup=0.1,
                                                               targets=("attn", "mlp"), forecast_order=2)),
    "block3o2": ("interval 3 block, order 2", DQARConfig(schedule="interval", interval=3, warmup=0.1,
                                                        targets=("block",), forecast_order=2)),
    "block3o2q": ("interval 3 block, order 2, F8/D4", DQARConfig(schedule="interval", interval=3, warmup=0.1,
                                                                targets=("block",), forecast_order=2, cache_bits=8,
                                                                diff_bits=4)),
    "block4o2": ("interval 4 block, order 2", DQARConfig(schedule="interval", interval=4, warmup=0.1,
                                                        targets=("block",), forecast_order=2)),
    "block3o2w0": ("interval 3 block, order 2, no warmup", DQARConfig(schedule="interval", interval=3, warmup=0.0,
                                                                    targets=("block",), forecast_order=2)),
    "stack3o2w0": ("interval 3 stack, order 2, no warmup", DQARConfig(schedule="interval", interval=3, warmup=0.0,
                                                                    targets=("stack",), forecast_order=2)),
    "stack4o2w0": ("interval 4 stack, order 2, no warmup", DQARConfig(schedule="interval", interval=4, warmup=0.0,
                                                                    targets=("stack",), forecast_order=2)),
    "adaptive0.3": ("adaptive (step scope) tolerance 0.3 block, order 2", DQARConfig(
        schedule="adaptive", tolerance=0.3, max_age=6, warmup=0.0, targets=("block",), forecast_order=2)),
    "adaptive0.2": ("adaptive (step scope) tolerance 0.2 block, order 2", DQARConfig(
        schedule="adaptive", tolerance=0.2, max_age=6, warmup=0.0, targets=("block",), forecast_order=2)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-B/2", help="a preset (random weights) or 'embedded' (the shipped model)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-runs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="weights and activations dtype (default float32)")
    ap.add_argument("--only", default=None, help=f"comma list of config ids to run besides the baseline: {','.join(CONFIGS)} (default all)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    wanted = list(CONFIGS) if args.only is None else args.only.split(",")
    unknown = [w for w in wanted if w not in CONFIGS]
    if unknown:
        ap.error(f"--only: unknown config id(s) {unknown}; allowed: {', '.join(CONFIGS)}")

    device = torch.device(args.device)
    if args.model == "embedded":
        model = load_embedded_model().to(device)
    else:
        model = build_dit(args.model).randomize_(0).eval().to(device)
    model = model.to(getattr(torch, args.dtype))
    labels, seeds = [1], [0]
    configs = dict(CONFIGS[w] for w in wanted)
    summaries: dict[str, dict] = {}

    def contender(name, config):
        return dqar_contender(model, config, run, summaries, name)

    def run():
        return sample(model, labels, seeds, steps=args.steps, cfg_scale=1.5, device=device)

    contenders = {"baseline": run}
    contenders.update({name: contender(name, cfg) for name, cfg in configs.items()})
    results = interleaved_timing(contenders, rounds=args.rounds, warmup_runs=args.warmup_runs, device=device,
                                 measure_memory=False)
    base = results["baseline"].median
    rows = []
    for name, res in results.items():
        s = summaries.get(name, {})
        ideal = s.get("ideal_speedup")
        speedup = base / res.median
        spread = (max(res.samples) - min(res.samples)) / res.median
        rows.append({"config": name, "ms_per_step": 1000 * res.median / args.steps, "speedup": speedup,
                     "spread": spread,
                     "ideal_speedup": ideal, "measured_over_ideal": speedup / ideal if ideal else None,
                     "reuse_fraction": s.get("reuse_fraction"), "samples_s": res.samples})
    where = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"{args.model} ({args.dtype}), {args.steps} steps, CFG batch 2, {args.rounds} rounds interleaved, median; "
          f"{device.type} ({where}); {date.today()}")
    print("| config | ms/step | (max-min)/median over rounds | speedup vs baseline | ideal speedup "
          "| measured / ideal | reuse fraction |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ideal = f"{r['ideal_speedup']:.3f}" if r["ideal_speedup"] else "-"
        ratio = f"{r['measured_over_ideal']:.3f}" if r["measured_over_ideal"] else "-"
        frac = f"{r['reuse_fraction']:.3f}" if r["reuse_fraction"] is not None else "-"
        print(f"| {r['config']} | {r['ms_per_step']:.1f} | {r['spread']:.1%} | {r['speedup']:.3f} | {ideal} "
              f"| {ratio} | {frac} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "rounds": args.rounds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
