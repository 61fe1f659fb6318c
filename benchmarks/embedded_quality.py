"""Quality of the embedded digits DiT: evaluator accuracy and evaluator-feature FID of its samples.

    python benchmarks/embedded_quality.py [--dir runs/embedded-model] [--update-card] [--threads 2]

Generates `--per-class` samples per class (seeds 0..N-1, DDIM, `--steps`, `--cfg-scale`), classifies them with
the shipped evaluator (accuracy against the requested class) and computes FID in the evaluator's 128-d
penultimate features against the held-out test digits, beside the train-vs-test FID of real digits (the floor
a perfect generator would reach with this reference size). `--sweep` first scores a few guidance scales on
fewer samples, `--attention-share` times `block.attn` inside the forward pass. `--update-card` writes the
results into the model card's "metrics" (and `recommended_cfg_scale`) in `--dir`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dqar.digits.data import load_split, random_affine, random_shift
from dqar.digits.embedded import DIT_CARD, DIT_FILE, EVALUATOR_FILE, asset_path, load_embedded_model, load_evaluator
from dqar.harness.metrics import frechet_distance
from dqar.sampling import sample


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="folder with the four asset files (default: the shipped assets)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class for the main run (100)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the main run (1.5, the CLI default)")
    p.add_argument("--sweep", default="1.0,1.5,2.0,3.0", help="guidance scales to compare ('' to skip)")
    p.add_argument("--sweep-per-class", type=int, default=20, help="samples per class per sweep point (20)")
    p.add_argument("--batch", type=int, default=100, help="images per sampling call (100)")
    p.add_argument("--attention-share", action="store_true", help="also time block.attn at batch --attn-batch")
    p.add_argument("--attn-batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-main", action="store_true", help="only the floor, sweep and attention share")
    p.add_argument("--augmented-floor", action="store_true",
                   help="also the FID of 1,000 real training digits under the training augmentation (shift 1 px; "
                        "shift + affine 5 deg / 5%%) vs the test digits: the floor a model of that distribution has")
    p.add_argument("--update-card", action="store_true", help="write the results into the DiT card in --dir")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for name in ("per_class", "steps", "sweep_per_class", "batch", "attn_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


@torch.no_grad()
def features(evaluator, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([evaluator.features(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def generate(model, per_class: int, steps: int, cfg_scale: float, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class images of each class; image k uses seed k, so runs at different scales are paired."""
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = list(range(len(labels)))
    chunks = [sample(model, labels[i:i + batch].tolist(), seeds[i:i + batch], steps=steps, sampler="ddim",
                     cfg_scale=cfg_scale) for i in range(0, len(labels), batch)]
    return torch.cat(chunks), labels


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [-1, 1] back to load_digits' own form: 8x8 grey levels 0..16, flattened (N, 64)."""
    x = torch.nn.functional.avg_pool2d(images.clamp(-1, 1), 2)                 # undoes the 2x upsampling
    return ((x + 1) * 8.0).flatten(1).double().numpy()


def independent_classifier():
    """A classifier that never saw the shipped evaluator or a generated image: an RBF SVM (scikit-learn's
    digits example) on the 1,437 real training scans at their native 8x8."""
    from sklearn.svm import SVC

    train = load_split("train")
    return SVC(gamma=0.001).fit(to_8x8(train.images), train.labels.numpy())


def floor_at(train_feats: torch.Tensor, test_feats: torch.Tensor, n: int, draws: int = 5) -> float:
    """Real-vs-real FID at the generated sample count: n real training digits (seeded draws without
    replacement, averaged) vs the held-out test digits. FID is biased upward at small n, so a generated
    set of n images is compared with this, not with the full-train floor."""
    g = torch.Generator().manual_seed(0)
    n = min(n, len(train_feats))
    vals = [frechet_distance(train_feats[torch.randperm(len(train_feats), generator=g)[:n]], test_feats)
            for _ in range(draws)]
    return float(sum(vals) / len(vals))


def augmented_floor(evaluator, train_images: torch.Tensor, real_test_feats: torch.Tensor, n: int = 1000) -> dict:
    """FID vs test of n real training digits as they are, shifted by up to 1 px, and shifted + affine-jittered
    (the shipped model's recipe): a model that learns the augmented distribution cannot beat its floor."""
    base = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:n]]
    shifted = random_shift(base, 1, torch.Generator().manual_seed(1))
    jittered = random_affine(shifted, 5.0, 0.05, torch.Generator().manual_seed(2))
    return {name: frechet_distance(features(evaluator, x).double(), real_test_feats)
            for name, x in (("unshifted", base), ("shift1", shifted), ("shift1_affine", jittered))}


def nearest_distance_median(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Median over `images` of the pixel L2 distance to the nearest `reference` image (16x16, [-1, 1])."""
    return float(torch.cdist(images.flatten(1).double(), reference.flatten(1).double()).min(dim=1).values.median())


def feature_spread(feats: torch.Tensor) -> float:
    """Total variance (trace of the covariance) of evaluator features: how varied a set of images is."""
    return float(feats.double().var(dim=0).sum())


def score(model, evaluator, real_test_feats, per_class, steps, cfg_scale, batch, check=None,
          train_feats=None, train_images=None) -> dict:
    start = time.perf_counter()
    images, labels = generate(model, per_class, steps, cfg_scale, batch)
    wall = time.perf_counter() - start
    acc = float((evaluator.predict(images) == labels).double().mean())
    per_class_acc = [float((evaluator.predict(images[labels == c]) == c).double().mean()) for c in range(10)]
    gen_feats = features(evaluator, images).double()
    fid = frechet_distance(gen_feats, real_test_feats)
    row = {"cfg_scale": cfg_scale, "samples": len(labels), "steps": steps, "sampler": "ddim",
           "accuracy": acc, "per_class_accuracy": per_class_acc, "fid_vs_test": fid, "sampling_wall_s": wall,
           # Diversity vs fidelity: spread below the test digits' = too uniform; nearest-training distance above
           # theirs = samples that no real digit resembles as closely as real digits resemble each other.
           "feature_spread_over_test": feature_spread(gen_feats) / feature_spread(real_test_feats)}
    if train_images is not None:
        row["nearest_train_px_median"] = nearest_distance_median(images, train_images)
    if train_feats is not None:
        row["fid_floor_same_n"] = floor_at(train_feats, real_test_feats, len(labels))
        row["fid_over_floor"] = fid / row["fid_floor_same_n"]
    if check is not None:
        pred = torch.as_tensor(check.predict(to_8x8(images)))
        row["independent_accuracy"] = float((pred == labels).double().mean())
        row["independent_per_class_accuracy"] = [float((pred[labels == c] == c).double().mean()) for c in range(10)]
        row["independent_classifier"] = "sklearn SVC(gamma=0.001) on the real 8x8 training scans"
    return row


@torch.no_grad()
def attention_share(model, batch: int, repeats: int = 30, warmup: int = 5) -> dict:
    """Share of DiT forward time spent inside block.attn (perf_counter hooks around each attn call)."""
    spent = {"attn": 0.0}
    starts = {}

    def pre(module, _inputs):
        starts[id(module)] = time.perf_counter()

    def post(module, _inputs, _output):
        spent["attn"] += time.perf_counter() - starts.pop(id(module))

    handles = []
    for block in model.blocks:
        handles += [block.attn.register_forward_pre_hook(pre), block.attn.register_forward_hook(post)]
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    try:
        for _ in range(warmup):
            model(x, t, y)
        spent["attn"] = 0.0
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t, y)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return {"batch": batch, "repeats": repeats, "forward_ms": 1000 * total / repeats,
            "attn_ms": 1000 * spent["attn"] / repeats, "attention_share": spent["attn"] / total,
            "threads": torch.get_num_threads(), "method": "perf_counter forward hooks around every block.attn"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.dir) if args.dir else asset_path(DIT_FILE).parent
    model = load_embedded_model(folder / DIT_FILE)
    evaluator = load_evaluator(folder / EVALUATOR_FILE)
    train, test = load_split("train"), load_split("test")
    real_test = features(evaluator, test.images).double()
    real_train = features(evaluator, train.images).double()
    floor = frechet_distance(real_train, real_test)
    check = independent_classifier()
    results = {"fid_floor_train_vs_test": floor, "real_test_images": len(test), "real_train_images": len(train),
               "independent_accuracy_real_test": float((check.predict(to_8x8(test.images)) == test.labels.numpy())
                                                       .mean()),
               "feature_space": "evaluator penultimate layer (128-d)", "threads": torch.get_num_threads(),
               "evaluator_accuracy_real_test": float((evaluator.predict(test.images) == test.labels).double().mean()),
               "real_test_nearest_train_px_median": nearest_distance_median(test.images, train.images)}
    print(f"FID floor (real train vs real test): {floor:.3f}", file=sys.stderr)

    if args.augmented_floor:
        results["augmented_floor"] = augmented_floor(evaluator, train.images, real_test)
        print(f"augmented floor at n=1000: {results['augmented_floor']}", file=sys.stderr)
    if args.attention_share:
        results["attention_share"] = attention_share(model, args.attn_batch)
        print(f"attention share at batch {args.attn_batch}: {results['attention_share']['attention_share']:.3f}",
              file=sys.stderr)

    sweep = []
    for scale in [float(s) for s in args.sweep.split(",") if s.strip()]:
        row = score(model, evaluator, real_test, args.sweep_per_class, args.steps, scale, args.batch, check, real_train,
                    train.images)
        sweep.append(row)
        print(f"sweep cfg {scale}: accuracy {row['accuracy']:.3f} (independent {row['independent_accuracy']:.3f})  "
              f"FID {row['fid_vs_test']:.3f} (floor at this n {row['fid_floor_same_n']:.3f})  "
              f"({row['samples']} samples, {row['sampling_wall_s']:.0f} s)", file=sys.stderr)
    if sweep:
        results["cfg_sweep"] = sweep

    main_run = None
    if not args.skip_main:
        main_run = score(model, evaluator, real_test, args.per_class, args.steps, args.cfg_scale, args.batch, check,
                         real_train, train.images)
        results["main"] = main_run
        print(f"main cfg {args.cfg_scale}: accuracy {main_run['accuracy']:.4f} (independent "
              f"{main_run['independent_accuracy']:.4f})  FID {main_run['fid_vs_test']:.3f} (floor at this n "
              f"{main_run['fid_floor_same_n']:.3f}; {main_run['samples']} samples, {main_run['sampling_wall_s']:.0f} s)",
              file=sys.stderr)

    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.update_card:
        card_path = folder / DIT_CARD
        card = json.loads(card_path.read_text(encoding="utf-8"))
        metrics = card.setdefault("metrics", {})
        if main_run:
            metrics[f"cfg_{args.cfg_scale:g}"] = main_run
        for key in ("fid_floor_train_vs_test", "feature_space", "real_test_images", "attention_share", "cfg_sweep"):
            if key in results:
                metrics[key] = results[key]
        metrics["command"] = "python benchmarks/embedded_quality.py " + " ".join(argv or sys.argv[1:])
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        print(f"updated {card_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
