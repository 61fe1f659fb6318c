"""`dqar generate`: class-conditional samples to PNGs and a grid, under DQAR unless --schedule none."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import (add_cfg_scale_option, add_model_options, check_out_dir, check_seed,
                     default_cfg_scale, parse_classes, resolve_model, setup_torch)
from .dqar_options import add_dqar_options, config_from_args

DEFAULT_BATCH_SIZE = 16
# With no --classes, every class of a model with at most this many (the embedded digits DiT's ten);
# ImageNet models get DiT's sample.py classes; any other model must be given --classes.
MAX_DEFAULT_CLASSES = 16
IMAGENET_CLASSES = 1000
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)   # DiT's sample.py (Peebles & Xie)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--classes", default=None,
                        help="comma-separated class labels (default: every class of a model with at most "
                             f"{MAX_DEFAULT_CLASSES}, e.g. the embedded model's ten digits; for a 1000-class "
                             f"ImageNet model DiT's sample classes {','.join(map(str, IMAGENET_SAMPLE_CLASSES))}; "
                             "any other model needs --classes)")
    parser.add_argument("--n", type=int, default=1, help="images per class (default 1)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--sampler", default="ddim", help="ddim | dpm (DPM-Solver++ multistep) (default ddim)")
    add_cfg_scale_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE}); bounds memory, with CFG "
                             "the model sees twice this many rows")
    parser.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (no progress bar)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dqar_options(parser)


def default_classes(num_classes: int, model_spec: str, n: int) -> tuple[list[int], str | None]:
    """(labels, note) when --classes is not given: a class set that fits the model, or a UsageError."""
    from . import UsageError

    if num_classes <= MAX_DEFAULT_CLASSES:
        return list(range(num_classes)), None
    if num_classes == IMAGENET_CLASSES:
        labels = list(IMAGENET_SAMPLE_CLASSES)
        return labels, (f"no --classes: sampling DiT's sample classes {','.join(map(str, labels))} of the "
                        f"{num_classes}; pass --classes to choose")
    raise UsageError(f"--model {model_spec} has {num_classes} classes: without --classes every class would be "
                     f"sampled, {num_classes * n} images; pass --classes (e.g. --classes 0,1,2,3)")


def run(args: argparse.Namespace) -> int:
    from dqar.cli import UsageError
    from dqar.sampling import validate_sampling_args

    cfg_scale = args.cfg_scale
    config = config_from_args(args)
    device = setup_torch(args)
    if args.n < 1:
        raise UsageError(f"--n={args.n} is not allowed: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is not allowed: must be >= 1")
    check_seed(args.seed)
    out = check_out_dir(args.out)
    if cfg_scale is None:
        cfg_scale = default_cfg_scale(args.model)
    validate_sampling_args(args.sampler, args.steps, cfg_scale)
    model, described = resolve_model(args.model)
    num_classes = model.config.num_classes
    note = None
    if args.classes is None:
        labels_once, note = default_classes(num_classes, args.model, args.n)
    else:
        labels_once = parse_classes(args.classes, num_classes, args.n)
    labels = [c for c in labels_once for _ in range(args.n)]
    check_seed(args.seed, count=len(labels))
    seeds = [args.seed + k for k in range(len(labels))]
    planned = [png_name(k, label, seed) for k, (label, seed) in enumerate(zip(labels, seeds))] + [GRID_NAME]
    if config.trace:
        planned.append(TRACES_NAME)
    for name in planned:
        if (out / name).is_dir():
            raise UsageError(f"--out={args.out!r}: {str(out / name)!r} is a folder, but this run writes a file "
                             "there; move it or pass another --out")
    if note and not args.json:
        print(note, file=sys.stderr)

    import numpy as np

    from dqar.harness.distributed import merge_summaries
    from dqar.method.hooks import apply_dqar, remove_dqar
    from dqar.sampling import make_scheduler

    model = model.to(device)
    make_scheduler(args.sampler)   # imports diffusers now, so its seconds of import stay out of ms/step
    # schedule "none" is the plain model, unless statistics were asked for (traces, entropy curves).
    hooked = config.schedule != "none" or config.trace or config.record_entropy
    ctl = apply_dqar(model, config) if hooked else None
    try:
        arrays, paths, summaries, trace_rows, seconds = _generate_batches(
            model, ctl, labels, seeds, out, args=args, cfg_scale=cfg_scale, device=device, described=described)
    finally:
        if ctl is not None:
            remove_dqar(model)
    batches = len(arrays)
    grid = write_grid(np.concatenate(arrays), labels, out)
    summary = _summary_for_json(merge_summaries(summaries)) if ctl is not None else None
    traces = write_traces(trace_rows, out) if config.trace else None
    result = {
        "model": described, "images": [str(p) for p in paths], "grid": str(grid), "seconds": seconds,
        "ms_per_step": 1000.0 * seconds / args.steps, "steps": args.steps, "sampler": args.sampler,
        "cfg_scale": cfg_scale, "classes": labels, "seeds": seeds, "batch_size": args.batch_size,
        "batches": batches, "config": config.to_dict(), "dqar": summary,
        "traces": str(traces) if traces else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        s = result["dqar"]
        reuse = ""
        if s:
            ideal = f"{s['ideal_speedup']:.3f}x" if s["ideal_speedup"] else "n/a"
            # The stack target decides once per step and branch for the whole chain of blocks.
            unit = "stack passes" if config.targets == ("stack",) else "module calls"
            reuse = (f"; reused {s['reuse_events']} of {s['reuse_events'] + s['compute_events']} {unit}, "
                     f"cache {s['cache_mb']:.3f} MB, ideal speedup {ideal}")
        print(f"wrote {len(paths)} images to {args.out} and the grid {grid}; "
              f"{result['ms_per_step']:.1f} ms/step{reuse}", file=sys.stderr)
    return 0


def _generate_batches(model, ctl, labels, seeds, out: Path, *, args, cfg_scale, device, described):
    """Sample in batches of --batch-size, writing each batch's PNGs as it is done.

    Returns (uint8 arrays per batch, PNG paths, per-batch controller summaries, trace rows tagged with their
    batch, seconds spent sampling). A batch with NaN/inf values stops the run before its PNGs are written.
    """
    import torch

    from dqar.cli import UsageError
    from dqar.sampling import sample, to_uint8

    size = args.batch_size
    batches = [range(s, min(s + size, len(labels))) for s in range(0, len(labels), size)]
    progress = not (args.json or args.no_progress)
    arrays, paths, summaries, trace_rows = [], [], [], []
    seconds = 0.0
    bar = None
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="generate", unit="batch", file=sys.stderr)
    try:
        for b, idx in enumerate(batches):
            batch_labels, batch_seeds = [labels[i] for i in idx], [seeds[i] for i in idx]
            start = time.perf_counter()
            images = sample(model, batch_labels, batch_seeds, steps=args.steps, sampler=args.sampler,
                            cfg_scale=cfg_scale, device=device, progress=progress)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            if not bool(torch.isfinite(images).all()):
                raise UsageError(f"--model {described}: sampling produced NaN or inf values (batch {b}, images "
                                 f"{idx.start}..{idx.stop - 1}); the weights or the settings make the model "
                                 "diverge, and its images would be flat; nothing more was written")
            if ctl is not None:
                summaries.append({**ctl.summary(), "images": len(idx)})
                trace_rows.extend({**r, "batch": b} for r in ctl.trace_rows)
            arr = to_uint8(images).numpy()
            paths += write_pngs(arr, batch_labels, batch_seeds, out, first=idx.start)
            arrays.append(arr)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return arrays, paths, summaries, trace_rows, seconds


def _summary_for_json(summary: dict) -> dict:
    """The merged per-batch summaries, with the cache sizes in MB (peaks over batches)."""
    s = dict(summary)
    s["cache_mb"] = s["cache_bytes"] / 2**20
    s["peak_cache_mb"] = s["peak_cache_bytes"] / 2**20
    return s


def write_traces(rows, out: Path) -> Path:
    """--trace: one JSON line per traced (step, layer, branch) of the whole batch, features named."""
    from dqar.harness.policy_training import write_jsonl
    from dqar.method.stats import POLICY_FEATURE_NAMES

    named = ({**r, "features": dict(zip(POLICY_FEATURE_NAMES, r["features"]))} for r in rows)
    return write_jsonl(out / TRACES_NAME, named)


GRID_NAME = "grid.png"
TRACES_NAME = "traces.jsonl"


def png_name(index: int, label: int, seed: int) -> str:
    return f"{index:05d}_class{label}_seed{seed}.png"


def write_pngs(arr, labels, seeds, out: Path, first: int = 0) -> list[Path]:
    """One PNG per (H, W, C) uint8 image, named by global index, class and seed."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (img, label, seed) in enumerate(zip(arr, labels, seeds), start=first):
        p = out / png_name(k, label, seed)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
        paths.append(p)
    return paths


def write_grid(arr, labels, out: Path) -> Path:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    grid_path = out / GRID_NAME
    Image.fromarray(make_grid(arr, labels)).save(grid_path)
    return grid_path


def make_grid(arr, labels, pad: int = 8, min_cell: int = 96, caption_height: int = 18):
    """(N, H, W, C) uint8 -> one readable image: each sample upscaled (nearest, by a whole factor) to at least
    `min_cell` pixels, on a white page with padding, a row per distinct class in first-seen order and the
    class written above each column (one sample per class) or left of each row (several per class)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows: dict[int, list] = {}
    for img, label in zip(arr, labels):
        rows.setdefault(int(label), []).append(img)
    h, w, c = arr.shape[1:]
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    one_per_class = max(len(v) for v in rows.values()) == 1
    if one_per_class:                      # one row, a caption above each column
        layout = [[(label, imgs[0]) for label, imgs in rows.items()]]
        left, top = pad, pad + caption_height
    else:                                  # a row per class, its caption on the left
        layout = [[(label, img) for img in imgs] for label, imgs in rows.items()]
        left, top = pad + 4 * caption_height, pad
    ncols = max(len(r) for r in layout)
    page = Image.new("L" if c == 1 else "RGB", (left + ncols * (cell_w + pad), top + len(layout) * (cell_h + pad)),
                     color=255)
    draw = ImageDraw.Draw(page)
    for r, row in enumerate(layout):
        y = top + r * (cell_h + pad)
        if not one_per_class:
            draw.text((pad, y + cell_h // 2 - 6), f"class {row[0][0]}", fill=0)
        for col, (label, img) in enumerate(row):
            x = left + col * (cell_w + pad)
            big = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))
            page.paste(Image.fromarray(big[..., 0] if c == 1 else big), (x, y))
            if one_per_class:
                draw.text((x + cell_w // 2 - 12, pad), f"class {label}", fill=0)
    return np.asarray(page)
