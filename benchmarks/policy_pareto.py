"""Policy v1 vs policy v2 vs fixed intervals on the shipped embedded DiT, with forecast_pareto's protocol.

Each policy point is `forecast_pareto.run_one` on the same 100 images (10 per class, seeds 0-99, DDIM 50, CFG
1.5, one batch): work = executed share of attention+MLP calls (`count_module_calls`), PSNR and FID vs the
uncached images of the same seeds. Both policies run with the same reuse machinery: targets attention+MLP,
order-2 forecasts (a planned layer forecasts from its history instead of copying), no warmup. Rows are
appended to --rows as they finish (a rerun skips finished names); the table puts them next to the
fixed-interval rows of --fixed (read only) and marks the (lower work, higher PSNR) front.

    python benchmarks/policy_pareto.py --policy v1=shipped --thresholds 0.3,0.5,0.7,0.9
    python benchmarks/policy_pareto.py --policy v2=runs/policy_v2/policy_digits.safetensors --thresholds 0.3,0.5,0.7,0.9
    python benchmarks/policy_pareto.py --table-only          # the table from the rows already measured

Quality only (no timing; see benchmarks/policy_speed.py), so it may share the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def contenders(policies: dict, thresholds: list, order: int, warmup: float, targets=("attn", "mlp"),
               entropy_images: int = 0, error_images: int = 0, branch_decisions: str = "each",
               error_targets: tuple | None = None) -> list:
    out = []      # (row name, config kwargs, tag)
    # The cheaper statistics get a name suffix; the exact ones keep the names of the rows measured before them.
    cheap = ((f"-e{entropy_images}" if entropy_images else "") + (f"-err{error_images}" if error_images else "")
             + ("-bcond" if branch_decisions == "cond" else "")
             + (f"-et{'+'.join(error_targets)}" if error_targets else ""))
    for tag, path in policies.items():
        for t in thresholds:
            out.append((f"policy-{tag}-thr{t:g}-{'+'.join(targets)}-o{order}-w{warmup:g}{cheap}",
                        dict(schedule="policy", policy_path=None if path == "shipped" else path, policy_threshold=t,
                             warmup=warmup, targets=tuple(targets), forecast_order=order,
                             entropy_images=entropy_images, error_images=error_images,
                             branch_decisions=branch_decisions, error_targets=error_targets), tag))
    return out


def read_rows(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def table(policy_rows: list, fixed_rows: list) -> str:
    """Markdown: every policy row and the fixed-interval rows, by work; * = on the joint front."""
    rows = policy_rows + [r for r in fixed_rows if r["name"].startswith("interval")]
    best, front = -float("inf"), set()
    for r in sorted(rows, key=lambda r: (r["work"], -r["psnr_db"])):
        if r["psnr_db"] > best:
            front.add(r["name"])
            best = r["psnr_db"]
    lines = ["| contender | work | PSNR dB | FID vs uncached |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["work"]):
        lines.append(f"| {r['name']}{' *' if r['name'] in front else ''} | {r['work']:.3f} | {r['psnr_db']:.2f} | "
                     f"{r['fid_vs_uncached']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", default=[],
                   help="TAG=FILE (or TAG=shipped for the package's policy); repeatable")
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    p.add_argument("--order", type=int, default=2, help="forecast order of a planned layer (default 2)")
    p.add_argument("--warmup", type=float, default=0.0, help="warmup under the policy (default 0)")
    p.add_argument("--targets", default="attn,mlp", help="comma list of targets (default attn,mlp)")
    p.add_argument("--entropy-images", type=int, default=0, help="entropy over this many images per branch (0: all)")
    p.add_argument("--error-images", type=int, default=0,
                   help="forecast error over this many images per branch (0: all)")
    p.add_argument("--branch-decisions", default="each", choices=("each", "cond"),
                   help="each CFG branch decides on its own (each, default) or cond's plan serves both")
    p.add_argument("--error-targets", default="", help="measure the error of these targets only (default: all)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--rows", type=Path, default=ROOT / "docs/policy/v2_rows.jsonl")
    p.add_argument("--fixed", type=Path, default=ROOT / "docs/forecast/rows.jsonl",
                   help="forecast_pareto's rows (read only): the fixed-interval contenders")
    p.add_argument("--reference-cache", type=Path, default=None,
                   help="safetensors file holding the uncached images (written if missing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    policies = {}
    for item in args.policy:
        tag, sep, path = item.partition("=")
        if not sep or not tag or not path:
            p.error(f"--policy={item!r} is not allowed: TAG=FILE or TAG=shipped")
        policies[tag] = path
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not all(0.0 <= t <= 1.0 for t in thresholds):
        p.error(f"--thresholds={args.thresholds!r} is not allowed: numbers in [0, 1]")
    if not args.table_only:
        measure(args, policies, thresholds)
    print(table(read_rows(args.rows), read_rows(args.fixed)))
    return 0


def measure(args, policies: dict, thresholds: list) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE))
    from forecast_pareto import run_one

    from dqar.digits.embedded import load_embedded_model, load_evaluator
    from dqar.harness.metrics import EvaluatorFeatures
    from dqar.sampling import sample

    torch.set_num_threads(args.threads)
    model = load_embedded_model()
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(len(labels)))
    features = EvaluatorFeatures(load_evaluator())
    done = {r["name"] for r in read_rows(args.rows)}
    targets = tuple(t for t in args.targets.split(",") if t)
    todo = [c for c in contenders(policies, thresholds, args.order, args.warmup, targets, args.entropy_images,
                                   args.error_images, args.branch_decisions,
                                   tuple(t for t in args.error_targets.split(",") if t) or None)
            if c[0] not in done]
    if not todo:
        return
    cache = args.reference_cache
    if cache is not None and cache.exists():
        reference = load_file(str(cache))["images"]
    else:
        reference = sample(model, labels, seeds, steps=args.steps, cfg_scale=args.cfg_scale)
        if cache is not None:
            save_file({"images": reference.contiguous()}, str(cache))
    args.rows.parent.mkdir(parents=True, exist_ok=True)
    for spec in todo:
        row = run_one(model, labels, seeds, args.steps, args.cfg_scale, reference, features, "dqar", spec[:2], "cpu")
        row["policy_file"] = policies[spec[2]]
        with args.rows.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: work {row['work']:.3f} PSNR {row['psnr_db']:.2f} dB FID {row['fid_vs_uncached']:.4f} "
              f"({row['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
