"""Quality vs work for every contender on the same weights and seeds: DQAR's fixed schedules at forecast orders
0-2 (attention+MLP and whole-block targets), the adaptive schedule, the seeds' schedules, and diffusers' caches.

Each contender samples the same images (n per class, DDIM, CFG) as the uncached run; its place is the share
of attention / MLP / block calls it actually executed (counted by `count_module_calls`, not taken from its
config) against PSNR and FID vs the uncached images (the embedded evaluator's features). Rows go to a JSONL
file as they finish (a rerun skips finished contenders), then a Markdown table and a plot are written.

    python benchmarks/forecast_pareto.py --out docs/forecast            # about 1-2 min per contender on 1 core
    python benchmarks/forecast_pareto.py --out docs/forecast --only quant   # the history-quantization rows

Quality only: no timing here (see `dqar bench` for interleaved speed), so it may share the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.digits.embedded import load_embedded_model, load_evaluator, model_card
from dqar.harness.baselines import make_baseline
from dqar.harness.metrics import EvaluatorFeatures, fid_vs_baseline, psnr
from dqar.harness.peers import count_module_calls, sampling_observers
from dqar.sampling import sample


def dqar_contenders(group: str) -> list[tuple[str, dict]]:
    out = []
    if group in ("all", "fixed"):
        for targets in (("attn", "mlp"), ("block",)):
            for order, intervals in ((0, (2, 3, 4)), (1, (3,)), (2, (2, 3, 4, 5))):
                for interval in intervals:
                    name = f"interval{interval}-{'+'.join(targets)}-o{order}"
                    out.append((name, dict(schedule="interval", interval=interval, warmup=0.1, targets=targets,
                                           forecast_order=order)))
        out.append(("static-seed", dict(schedule="static", warmup=0.4, layer_fraction=0.33)))
        out.append(("depth-seed", dict(schedule="depth", warmup=0.4)))
    if group in ("all", "grid"):
        # Every fixed interval 2-6 at orders 0-2 without warmup: what issue 17's adaptive schedule must beat.
        for targets in (("attn", "mlp"), ("block",)):
            for order in (0, 1, 2):
                for interval in (2, 3, 4, 5, 6):
                    name = f"interval{interval}-{'+'.join(targets)}-o{order}-w0"
                    out.append((name, dict(schedule="interval", interval=interval, warmup=0.0, targets=targets,
                                           forecast_order=order)))
    if group in ("all", "grid"):
        # Fixed intervals with a warmup land between the no-warmup ones (work 0.44-0.66), where the adaptive
        # schedule's middle tolerances fall.
        for targets in (("attn", "mlp"), ("block",)):
            for interval, warmup in ((3, 0.2), (2, 0.2), (2, 0.3)):
                out.append((f"interval{interval}-{'+'.join(targets)}-o2-w{warmup:g}",
                            dict(schedule="interval", interval=interval, warmup=warmup, targets=targets,
                                 forecast_order=2)))
    if group in ("all", "adaptive"):
        # Step-wide error control (one decision per step from the summed effects), no warmup, max age 6.
        sweeps = ((("block",), 2, (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)),
                  (("attn", "mlp"), 2, (0.1, 0.15, 0.2, 0.3, 0.4, 0.6)), (("block",), 1, (0.1, 0.3)))
        for targets, order, tolerances in sweeps:
            for tol in tolerances:
                out.append((f"adaptive-step{tol:g}-{'+'.join(targets)}-o{order}",
                            dict(schedule="adaptive", tolerance=tol, max_age=6, warmup=0.0, targets=targets,
                                 forecast_order=order)))
    if group in ("all", "stack"):
        # One residual for the whole stack: intervals as the block target (same images up to rounding), and
        # the adaptive schedule on the stack's own error (its effect relative to the stack input).
        for interval in (3, 4):
            out.append((f"interval{interval}-stack-o2-w0", dict(schedule="interval", interval=interval, warmup=0.0,
                                                               targets=("stack",), forecast_order=2)))
        for tol in (0.05, 0.1, 0.2, 0.3, 0.5):
            out.append((f"adaptive-step{tol:g}-stack-o2", dict(schedule="adaptive", tolerance=tol, max_age=6,
                                                               warmup=0.0, targets=("stack",), forecast_order=2)))
        out.append(("adaptive-step0.1-stack-o2-F8D4", dict(schedule="adaptive", tolerance=0.1, max_age=6, warmup=0.0,
                                                           targets=("stack",), forecast_order=2, cache_bits=8,
                                                           diff_bits=4, quant_granularity="channel")))
    if group in ("all", "seed"):
        # The seed's claim "the gate beats static at equal speed", re-tested: the gate (defaults, and forecasting)
        # next to static schedules of similar work, all on attention as the seeds cache it.
        for order in (0, 2):
            out.append((f"gate-seed-o{order}", dict(schedule="gate", forecast_order=order)))
            for warmup, fraction in ((0.4, 0.33), (0.4, 0.66)):
                out.append((f"static-w{warmup:g}-l{fraction:g}-o{order}",
                            dict(schedule="static", warmup=warmup, layer_fraction=fraction, forecast_order=order)))
    if group == "entropy-images":
        # The cheaper entropy (entropy_images: the first 2 or 4 images of each branch) against the exact one.
        for images in (0, 2, 4):
            out.append((f"gate-seed-o0-e{images}", dict(schedule="gate", forecast_order=0, entropy_images=images)))
    if group == "error-images":
        # The cheaper error measurement (error_images: the first 1 or 2 images of each branch) at the adaptive
        # points that beat the fixed schedules with every image measured.
        for targets, tolerances in ((("attn", "mlp"), (0.4, 0.3, 0.15, 0.1)), (("block",), (0.4, 0.15))):
            for tol in tolerances:
                for images in (1, 2):
                    out.append((f"adaptive-step{tol:g}-{'+'.join(targets)}-o2-err{images}",
                                dict(schedule="adaptive", tolerance=tol, max_age=6, warmup=0.0, targets=targets,
                                     forecast_order=2, error_images=images)))
    if group == "branch-decisions":
        # One decision for both CFG branches from the conditional branch's errors (every image), at the same
        # adaptive points: half the measurements; the step's summed effect then has half the terms.
        for targets, tolerances in ((("attn", "mlp"), (0.4, 0.3, 0.15, 0.1)), (("block",), (0.4, 0.15))):
            for tol in tolerances:
                out.append((f"adaptive-step{tol:g}-{'+'.join(targets)}-o2-bcond",
                            dict(schedule="adaptive", tolerance=tol, max_age=6, warmup=0.0, targets=targets,
                                 forecast_order=2, branch_decisions="cond")))
    if group in ("all", "quant"):
        for targets in (("attn", "mlp"), ("block",)):
            for bits, diff_bits in ((8, 8), (4, 4), (8, 4)):
                out.append((f"interval3-{'+'.join(targets)}-o2-F{bits}D{diff_bits}",
                            dict(schedule="interval", interval=3, warmup=0.1, targets=targets, forecast_order=2,
                                 cache_bits=bits, diff_bits=diff_bits, quant_granularity="channel")))
    return out


PEER_CONTENDERS = ["pab", "taylorseer", "seacache", "fastercache", "fbc", "magcache"]


def share_of_work(calls: dict, targets) -> float:
    """One number per contender: the executed share of attention+MLP calls (a skipped block skips both)."""
    return (calls["attn"] + calls["mlp"]) / 2


def run_one(model, labels, seeds, steps, cfg, reference, features, kind, spec, device):
    row = {"name": spec[0] if kind == "dqar" else spec, "kind": kind}
    start = time.perf_counter()
    if kind == "dqar":
        config = DQARConfig(**spec[1])
        ctl = apply_dqar(model, config)
        try:
            with count_module_calls(model) as calls:
                images = sample(model, labels, seeds, steps=steps, cfg_scale=cfg, device=device)
            summary = ctl.summary()
        finally:
            remove_dqar(model)
        row.update(config=config.to_dict(), ideal_speedup=summary["ideal_speedup"],
                   peak_cache_bytes=summary["peak_cache_bytes"], short_history=summary["short_history"])
    else:
        peer = make_baseline(spec, model, device, {"calibration_steps": steps} if spec == "magcache" else None)
        with count_module_calls(peer) as calls:
            images = sample(peer, labels, seeds, steps=steps, cfg_scale=cfg, device=device,
                            observers=sampling_observers(peer))
        stats = peer.reuse_stats() if hasattr(peer, "reuse_stats") else {}
        row.update(settings={k: v for k, v in getattr(peer, "settings", {}).items() if k != "mag_ratios"},
                   peak_cache_bytes=stats.get("cache_bytes"))
    row["calls"] = dict(calls)
    row["work"] = share_of_work(calls, None)
    row["psnr_db"] = psnr(images.clamp(-1, 1), reference.clamp(-1, 1))
    row["fid_vs_uncached"] = fid_vs_baseline(images, reference, features)
    row["wall_s"] = time.perf_counter() - start
    return row


def pareto(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (lower work, higher PSNR)."""
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["work"], -r["psnr_db"])):
        if r["psnr_db"] > best:
            front.append(r)
            best = r["psnr_db"]
    return front


def is_fixed(row: dict) -> bool:
    """A DQAR schedule that does not look at the run: interval, static, depth (issue 17's yardstick)."""
    return row["kind"] == "dqar" and (row.get("config") or {}).get("schedule") in ("interval", "static", "depth")


def dynamic_vs_fixed(rows: list[dict], window: float = 0.03) -> list[str]:
    """Markdown rows: each adaptive/gate/policy contender against the best fixed schedule (by PSNR, and
    the lowest FID) within +-window of its work share; '-' where no fixed schedule is that close."""
    fixed = [r for r in rows if is_fixed(r) and math.isfinite(r["psnr_db"])]
    lines = ["| dynamic contender | work | PSNR dB | FID | best fixed by PSNR within +-0.03 | its PSNR | "
             "lowest FID of a fixed one there | higher PSNR and lower FID |", "|---|---|---|---|---|---|---|---|"]
    dynamic = [r for r in rows if r["kind"] == "dqar" and not is_fixed(r) and math.isfinite(r["psnr_db"])]
    for r in sorted(dynamic, key=lambda r: (r["name"].split("-")[0], r["work"])):
        near = [f for f in fixed if abs(f["work"] - r["work"]) <= window + 1e-9]
        if not near:
            lines.append(f"| {r['name']} | {r['work']:.3f} | {r['psnr_db']:.2f} | {r['fid_vs_uncached']:.3f} | - | - | - | "
                         "no fixed schedule this close |")
            continue
        best = max(near, key=lambda f: f["psnr_db"])
        fid = min(f["fid_vs_uncached"] for f in near)
        wins = r["psnr_db"] > best["psnr_db"] and r["fid_vs_uncached"] < fid
        lines.append(f"| {r['name']} | {r['work']:.3f} | {r['psnr_db']:.2f} | {r['fid_vs_uncached']:.3f} | "
                     f"{best['name']} ({best['work']:.3f}) | {best['psnr_db']:.2f} | {fid:.3f} | "
                     f"{'**yes**' if wins else 'no'} |")
    return lines


def write_report(rows: list[dict], out: Path, meta: dict) -> None:
    front = {r["name"] for r in pareto(rows)}
    lines = [f"# Quality vs work on the same weights ({meta['images']} images, DDIM {meta['steps']}, "
             f"CFG {meta['cfg_scale']}, measured {meta['date']})", "",
             "work = share of attention+MLP calls executed (counted); PSNR and FID vs the uncached images of "
             "the same seeds; * = on the Pareto front (lower work, higher PSNR).", "",
             "| contender | kind | work (attn, mlp, block) | PSNR dB | FID vs uncached | FLOP bound | cache MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["work"]):
        c = r["calls"]
        cache = r.get("peak_cache_bytes")
        lines.append(f"| {r['name']}{' *' if r['name'] in front else ''} | {r['kind']} | {r['work']:.3f} "
                     f"({c['attn']:.2f}, {c['mlp']:.2f}, {c['block']:.2f}) | {r['psnr_db']:.2f} | "
                     f"{r['fid_vs_uncached']:.3f} | {r.get('ideal_speedup') or float('nan'):.2f} | "
                     f"{cache / 2**20 if cache else float('nan'):.1f} |")
    lines += ["", "## Dynamic schedules against the fixed ones at equal work (issue 17)", ""] + dynamic_vs_fixed(rows)
    (out / "pareto.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, marker in (("dqar", "o"), ("peer", "s")):
        pts = [r for r in rows if r["kind"] == kind and math.isfinite(r["psnr_db"])]
        ax.scatter([r["work"] for r in pts], [r["psnr_db"] for r in pts], marker=marker, label=kind, alpha=0.7)
        for r in pts:
            if r["kind"] == "peer" or r["name"] in front:
                ax.annotate(r["name"], (r["work"], r["psnr_db"]), fontsize=6)
    ax.set_xlabel("work: executed share of attention+MLP calls")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{meta['images']} images, DDIM {meta['steps']}, CFG {meta['cfg_scale']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "pareto.png", dpi=130, bbox_inches="tight")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/forecast"), help="output folder (default docs/forecast)")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the model card's recommended scale")
    p.add_argument("--only", choices=("all", "fixed", "grid", "adaptive", "stack", "seed", "quant", "peers", "entropy-images",
                                      "error-images", "branch-decisions"), default="all")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_embedded_model()
    cfg = args.cfg_scale if args.cfg_scale is not None else model_card()["recommended_cfg_scale"]
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(len(labels)))
    features = EvaluatorFeatures(load_evaluator())
    rows_path = args.out / "rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    reference = sample(model, labels, seeds, steps=args.steps, cfg_scale=cfg)
    todo = [("dqar", c) for c in dqar_contenders("all" if args.only in ("all",) else args.only)
            if args.only != "peers"]
    if args.only in ("all", "peers"):
        todo += [("peer", name) for name in PEER_CONTENDERS]
    for kind, spec in todo:
        name = spec[0] if kind == "dqar" else spec
        if name in done:
            continue
        row = run_one(model, labels, seeds, args.steps, cfg, reference, features, kind, spec, "cpu")
        done[name] = row
        with rows_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: work {row['work']:.3f} PSNR {row['psnr_db']:.2f} dB FID {row['fid_vs_uncached']:.3f} "
              f"({row['wall_s']:.0f} s)", flush=True)
    meta = {"images": len(labels), "steps": args.steps, "cfg_scale": cfg, "date": time.strftime("%Y-%m-%d")}
    write_report(list(done.values()), args.out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
