"""`dqar generate`: class-conditional samples to PNGs and a grid, under DQAR unless --schedule none."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import add_model_options, parse_classes, resolve_model, setup_torch
from .dqar_options import add_dqar_options, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--classes", default=None, help="comma-separated class labels (default: every class)")
    parser.add_argument("--n", type=int, default=1, help="images per class (default 1)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--sampler", default="ddim", help="ddim | dpm (DPM-Solver++ multistep)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the model card's, else 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    parser.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_dqar_options(parser)


def run(args: argparse.Namespace) -> int:
    from dqar.cli import UsageError
    from dqar.sampling import validate_sampling_args

    cfg_scale = args.cfg_scale
    config = config_from_args(args)
    device = setup_torch(args)
    if args.n < 1:
        raise UsageError(f"--n={args.n} is not allowed: must be >= 1")
    if cfg_scale is None:
        cfg_scale = default_cfg_scale(args.model)
    validate_sampling_args(args.sampler, args.steps, cfg_scale)
    model, described = resolve_model(args.model)
    labels_once = parse_classes(args.classes, model.config.num_classes, args.n)
    labels = [c for c in labels_once for _ in range(args.n)]
    seeds = [args.seed + k for k in range(len(labels))]

    import torch

    from dqar.method.hooks import apply_dqar, remove_dqar
    from dqar.sampling import make_scheduler, sample

    model = model.to(device)
    make_scheduler(args.sampler)   # imports diffusers now, so its seconds of import stay out of ms/step
    # schedule "none" is the plain model, unless statistics were asked for (traces, entropy curves).
    hooked = config.schedule != "none" or config.trace or config.record_entropy
    ctl = apply_dqar(model, config) if hooked else None
    try:
        start = time.perf_counter()
        images = sample(model, labels, seeds, steps=args.steps, sampler=args.sampler, cfg_scale=cfg_scale,
                        device=device, progress=not args.json)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        summary = _summary_for_json(ctl)
        trace_rows = list(ctl.trace_rows) if ctl is not None else []
    finally:
        if ctl is not None:
            remove_dqar(model)
    paths, grid = write_images(images, labels, seeds, Path(args.out))
    traces = write_traces(trace_rows, Path(args.out)) if config.trace else None
    result = {
        "model": described, "images": [str(p) for p in paths], "grid": str(grid), "seconds": seconds,
        "ms_per_step": 1000.0 * seconds / args.steps, "steps": args.steps, "sampler": args.sampler,
        "cfg_scale": cfg_scale, "classes": labels, "seeds": seeds, "config": config.to_dict(),
        "dqar": summary, "traces": str(traces) if traces else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        s = result["dqar"]
        reuse = ""
        if s:
            ideal = f"{s['ideal_speedup']:.3f}x" if s["ideal_speedup"] else "n/a"
            reuse = (f"; reused {s['reuse_events']} of {s['reuse_events'] + s['compute_events']} module calls, "
                     f"cache {s['cache_mb']:.3f} MB, ideal speedup {ideal}")
        print(f"wrote {len(paths)} images to {args.out} and the grid {grid}; "
              f"{result['ms_per_step']:.1f} ms/step{reuse}", file=sys.stderr)
    return 0


def _summary_for_json(ctl) -> dict | None:
    if ctl is None:
        return None
    s = ctl.summary()
    s["cache_mb"] = s["cache_bytes"] / 2**20
    s["peak_cache_mb"] = s["peak_cache_bytes"] / 2**20
    return s


def write_traces(rows, out: Path) -> Path:
    """--trace: one JSON line per traced (step, layer, branch) of the whole batch, features named."""
    from dqar.harness.policy_training import write_jsonl
    from dqar.method.stats import POLICY_FEATURE_NAMES

    named = ({**r, "features": dict(zip(POLICY_FEATURE_NAMES, r["features"]))} for r in rows)
    return write_jsonl(out / "traces.jsonl", named)


def default_cfg_scale(model_spec: str) -> float:
    """The embedded model card's recommended guidance scale; 1.5 (DiT's FID setting) otherwise."""
    if model_spec == "embedded":
        from dqar.digits.embedded import model_card

        # A missing or corrupt card is an error naming the file (raised by model_card), never a silent 1.5.
        return float(model_card().get("recommended_cfg_scale", 1.5))
    return 1.5


def write_images(images, labels, seeds, out: Path):
    """Per-image PNGs named by index, class and seed, and a grid with one row per class."""
    from PIL import Image

    from dqar.sampling import to_uint8

    out.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).numpy()                                     # (N, H, W, C)
    paths = []
    for k, (img, label, seed) in enumerate(zip(arr, labels, seeds)):
        p = out / f"{k:05d}_class{label}_seed{seed}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
        paths.append(p)
    grid_path = out / "grid.png"
    Image.fromarray(make_grid(arr, labels)).save(grid_path)
    return paths, grid_path


def make_grid(arr, labels, pad: int = 2):
    """(N, H, W, C) uint8 -> one image, a row per distinct class in first-seen order."""
    import numpy as np

    rows: dict[int, list] = {}
    for img, label in zip(arr, labels):
        rows.setdefault(label, []).append(img)
    h, w, c = arr.shape[1:]
    ncols = max(len(v) for v in rows.values())
    grid = np.zeros((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for r, imgs in enumerate(rows.values()):
        for col, img in enumerate(imgs):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = img
    if ncols == 1 and len(rows) > 1:
        # One image per class reads better as a single row.
        grid = np.concatenate([grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad:pad + w]
                               for r in range(len(rows))], axis=1)
    return grid[..., 0] if c == 1 else grid
