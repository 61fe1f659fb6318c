"""Learned policy vs static schedule on the embedded digits DiT: speed/quality points and the Pareto question.

    python benchmarks/policy_pareto.py [--n-images 100] [--steps 50] [--thresholds 0.3,0.5,0.7,0.9]
        [--policy-warmup 0.2] [--static-warmups 0.2,0.4] [--static-layers 0.33,0.66,1.0]
        [--time-images 5 --time-rounds 2] [--json out/policy_pareto.json] [--threads 2]

Every configuration samples the same `--n-images` (class k % 10, seed k: seeds the policy never saw in
training, which used 10000+) and is scored against the uncached images of the same seeds: FID in the
evaluator's penultimate features (`EvaluatorFeatures`), PSNR, and the ideal speedup from the controller's FLOP
accounting (`summary()["ideal_speedup"]`, combined over batches as total FLOPs / computed FLOPs). With
`--time-rounds > 0` the wall-clock speedup is also measured on `--time-images` images, all configurations and
the baseline interleaved (dqar.harness.timing.interleaved_timing, median of the rounds).
A point is "dominated" when some point of the other family is at least as fast (ideal speedup) and at least as
good (lower FID and higher PSNR), better in one of them.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dqar.method.config import DQARConfig
from dqar.digits.embedded import load_embedded_model, load_evaluator, model_card
from dqar.harness.metrics import EvaluatorFeatures, feature_stats, frechet_distance_from_stats, psnr
from dqar.harness.timing import interleaved_timing
from dqar.method.hooks import apply_dqar, remove_dqar
from dqar.sampling import sample


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the model card's recommended scale")
    p.add_argument("--batch", type=int, default=50, help="images per sampling call (the policy decides per call)")
    p.add_argument("--policy", default=None, help="policy file (default: the shipped one)")
    p.add_argument("--weights", default=None, help="DiT weights file (default: the shipped embedded model)")
    p.add_argument("--evaluator", default=None, help="evaluator weights file (default: the shipped one)")
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    p.add_argument("--policy-warmup", type=float, default=0.2,
                   help="warmup under the policy (every schedule keeps one; default 0.2)")
    p.add_argument("--static-warmups", default="0.2,0.4")
    p.add_argument("--static-layers", default="0.33,0.66,1.0")
    p.add_argument("--time-images", type=int, default=5)
    p.add_argument("--time-rounds", type=int, default=2, help="0 skips the wall-clock timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every point to this JSON file")
    return p.parse_args(argv)


def configs(args) -> dict[str, DQARConfig]:
    out = {}
    for w in floats(args.static_warmups):
        for l in floats(args.static_layers):
            out[f"static w{w:g} l{l:g}"] = DQARConfig(schedule="static", warmup=w, layer_fraction=l)
    for thr in floats(args.thresholds):
        out[f"policy w{args.policy_warmup:g} thr{thr:g}"] = DQARConfig(
            schedule="policy", warmup=args.policy_warmup, policy_threshold=thr, policy_path=args.policy)
    return out


@torch.no_grad()
def generate(model, config, labels, seeds, steps, cfg_scale, batch):
    """Images, and the combined ideal speedup / reuse fraction over the batches (None for the baseline)."""
    chunks, flops_total, flops_computed, reused, decided = [], 0.0, 0.0, 0, 0
    for i in range(0, len(labels), batch):
        ctl = apply_dqar(model, config) if config is not None else None
        try:
            chunks.append(sample(model, labels[i:i + batch], seeds[i:i + batch], steps=steps, cfg_scale=cfg_scale))
            if ctl is not None:
                s = ctl.summary()
                # Every batch has the same FLOP total F; its ideal speedup is F / computed, so summing
                # F / speedup gives the computed FLOPs of the whole run.
                n = len(labels[i:i + batch])
                flops_total += n
                flops_computed += n / s["ideal_speedup"]
                reused += s["reuse_events"]
                decided += s["reuse_events"] + s["compute_events"]
        finally:
            if ctl is not None:
                remove_dqar(model)
    ideal = flops_total / flops_computed if flops_computed else None
    return torch.cat(chunks), ideal, (reused / decided if decided else None)


def dominated(point: dict, others: list[dict]) -> list[str]:
    """Names of the points in `others` that are at least as fast and as good, strictly better in one."""
    out = []
    for o in others:
        ge = (o["ideal_speedup"] >= point["ideal_speedup"] and o["fid"] <= point["fid"]
              and o["psnr"] >= point["psnr"])
        gt = (o["ideal_speedup"] > point["ideal_speedup"] or o["fid"] < point["fid"] or o["psnr"] > point["psnr"])
        if ge and gt:
            out.append(o["name"])
    return out


def time_points(model, cfgs, args, cfg_scale) -> dict[str, float]:
    """Wall-clock speedup of each configuration over the uncached model, all interleaved.

    Each configuration gets its own hooked copy of the model, attached once: attaching profiles the FLOPs
    on the first forward, which the warm-up run absorbs instead of every timed run.
    """
    labels = [k % 10 for k in range(args.time_images)]
    seeds = list(range(args.time_images))
    contenders = {"baseline": lambda: sample(model, labels, seeds, steps=args.steps, cfg_scale=cfg_scale)}
    hooked = []
    for name, cfg in cfgs.items():
        m = copy.deepcopy(model)
        apply_dqar(m, cfg)
        hooked.append(m)
        contenders[name] = lambda m=m: sample(m, labels, seeds, steps=args.steps, cfg_scale=cfg_scale)
    try:
        res = interleaved_timing(contenders, rounds=args.time_rounds, warmup_runs=1, measure_memory=False)
    finally:
        for m in hooked:
            remove_dqar(m)
    base = res["baseline"].median
    return {name: base / r.median for name, r in res.items() if name != "baseline"} | {"_baseline_s": base}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, evaluator = load_embedded_model(args.weights), load_evaluator(args.evaluator)
    if args.cfg_scale is not None:
        cfg_scale = args.cfg_scale
    else:
        card = Path(args.weights).with_name("dit_digits.json") if args.weights else None
        cfg_scale = float(model_card(card).get("recommended_cfg_scale", 1.5))
    labels = [k % 10 for k in range(args.n_images)]
    seeds = list(range(args.n_images))
    extract = EvaluatorFeatures(evaluator)
    start = time.perf_counter()
    ref, _, _ = generate(model, None, labels, seeds, args.steps, cfg_scale, args.batch)
    ref_stats = feature_stats(extract(ref), "uncached features")
    print(f"baseline: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    cfgs = configs(args)
    points = []
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        imgs, ideal, frac = generate(model, cfg, labels, seeds, args.steps, cfg_scale, args.batch)
        fid = frechet_distance_from_stats(feature_stats(extract(imgs), name), ref_stats)
        points.append({"name": name, "family": name.split()[0], "config": cfg.to_dict(), "ideal_speedup": ideal,
                       "reuse_fraction": frac, "fid": fid, "psnr": psnr(imgs, ref)})
        print(f"{name}: ideal {ideal:.3f}x, reuse {frac:.3f}, FID {fid:.3f}, PSNR {points[-1]['psnr']:.2f} dB "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    measured = {}
    if args.time_rounds > 0:
        measured = time_points(model, cfgs, args, cfg_scale)
    for p in points:
        p["measured_speedup"] = measured.get(p["name"])
        p["dominated_by"] = dominated(p, [o for o in points if o["family"] != p["family"]])

    lines = ["| point | ideal speedup | measured speedup | reuse fraction | FID vs uncached | PSNR (dB) | dominated by |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        ms = f"{p['measured_speedup']:.2f}x" if p["measured_speedup"] else "n/a"
        lines.append(f"| {p['name']} | {p['ideal_speedup']:.3f}x | {ms} | {p['reuse_fraction']:.3f} | {p['fid']:.3f} "
                     f"| {p['psnr']:.2f} | {', '.join(p['dominated_by']) or '-'} |")
    table = "\n".join(lines)
    print(table)
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "n_images": args.n_images, "steps": args.steps, "sampler": "ddim", "cfg_scale": cfg_scale,
              "batch": args.batch, "time_images": args.time_images, "time_rounds": args.time_rounds,
              "weights": args.weights or "shipped", "policy": args.policy or "shipped",
              "baseline_time_s": measured.get("_baseline_s"), "points": points,
              "wall_s": time.perf_counter() - start, "command": " ".join(["python benchmarks/policy_pareto.py",
                                                                            *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
