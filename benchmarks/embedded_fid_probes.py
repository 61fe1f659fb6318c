"""What limits the embedded model's FID: tests of two fixes that need no training.

    python benchmarks/embedded_fid_probes.py [--per-class 100] [--threads 2] [--json out.json]

The samples (seeds 0..N-1, DDIM 50, CFG 1.5, as `embedded_quality.py`) are scored three ways against the
held-out digits in the evaluator's features:

- as generated;
- projected onto the data's own manifold: every training image is an exact bilinear 2x upsampling of an 8x8
  scan, a linear map U (256 x 64), so the least-squares projection U pinv(U) leaves a real digit unchanged
  (checked) and removes only what no upsampled scan can hold; also with the 8x8 values rounded to the scans'
  17 grey levels;
- sampled again with DDIM's x0 clipping (`clip_sample=True`, diffusers' default for pixel-space models; the
  harness samples without it, as DiT does).

It also splits FID into its mean and covariance terms, compares each class's feature spread with the
held-out digits', and asks whether a few off-class samples carry the FID: the FID of the samples the evaluator
classifies correctly, and of the samples left after dropping the 2 / 5 / 10% the evaluator is least sure
of (their requested class's probability), next to real training digits (same n) put through the same drop.

With `--guidance-intervals SCALE:T_LO:T_HI,...` it also samples with guidance only at timesteps in [T_LO, T_HI]
(scale 1 elsewhere; Kynkaanniemi et al. 2024 found guidance in a limited interval improves FID) and reports FID
and accuracy of each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embedded_quality  # noqa: E402  (the sampling and feature helpers of the quality benchmark)
import dqar.sampling as sampling  # noqa: E402
from dqar.digits.data import IMAGE_SIZE, load_split  # noqa: E402
from dqar.digits.embedded import load_embedded_model, load_evaluator  # noqa: E402
from dqar.harness.metrics import frechet_distance  # noqa: E402


def upsampling_matrix() -> torch.Tensor:
    """U (256, 64): the data pipeline's bilinear 2x upsampling (align_corners=False) as a matrix."""
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    up = torch.nn.functional.interpolate(basis, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return up.reshape(64, IMAGE_SIZE * IMAGE_SIZE).T


def project(images: torch.Tensor, grey_levels: bool = False) -> torch.Tensor:
    """Least-squares projection of [-1, 1] images onto the upsampled 8x8 scans (optionally on 17 grey levels)."""
    u = upsampling_matrix()
    scans = ((images.double() + 1) / 2).flatten(1) @ torch.linalg.pinv(u).T          # (N, 64) in [0, 1]
    if grey_levels:
        scans = (scans * 16).round().clamp(0, 16) / 16
    return ((scans @ u.T) * 2 - 1).clamp(-1, 1).reshape(images.shape).float()


def clipped_ddim(sampler: str, *args, **kwargs):
    from diffusers import DDIMScheduler

    scheduler = ORIGINAL_SCHEDULER(sampler, *args, **kwargs)
    if sampler != "ddim":
        return scheduler
    return DDIMScheduler.from_config(scheduler.config, clip_sample=True)


ORIGINAL_SCHEDULER = sampling.make_scheduler


def fid_terms(a: torch.Tensor, b: torch.Tensor) -> dict:
    mean_term = float((a.mean(0) - b.mean(0)).pow(2).sum())
    fid = frechet_distance(a, b)
    return {"fid": fid, "mean_term": mean_term, "covariance_term": fid - mean_term}


class _Timestep:
    """A sampling observer that remembers the current step's timestep."""

    def __init__(self):
        self.timestep = None

    def on_step_begin(self, info):
        self.timestep = info.timestep

    def on_step_end(self, info):
        pass


def guided_in_interval(model, per_class: int, scale: float, t_lo: int, t_hi: int):
    """embedded_quality.generate with guidance `scale` at timesteps in [t_lo, t_hi] and none elsewhere."""
    clock, original_guide, original_sample = _Timestep(), sampling.guide, embedded_quality.sample

    def guide(cond, uncond, _scale, channels):
        return original_guide(cond, uncond, scale if t_lo <= clock.timestep <= t_hi else 1.0, channels)

    def sample(*args, **kwargs):
        return original_sample(*args, observers=[*kwargs.pop("observers", ()), clock], **kwargs)

    sampling.guide, embedded_quality.sample = guide, sample
    try:
        # Any scale but 1 makes the sampler run both branches; `guide` then applies the interval's.
        return embedded_quality.generate(model, per_class, 50, 1.5, 100)
    finally:
        sampling.guide, embedded_quality.sample = original_guide, original_sample


def parse_intervals(text: str) -> list[tuple[float, int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        try:
            scale, lo, hi = item.split(":")
            out.append((float(scale), int(lo), int(hi)))
        except ValueError:
            raise ValueError(f"--guidance-intervals item {item!r} is not SCALE:T_LO:T_HI (e.g. 2.0:83:580)") from None
    return out


def confident_share(feats: torch.Tensor, confidence: torch.Tensor, drop: float) -> torch.Tensor:
    """The features of the (1 - drop) share of samples with the highest confidence."""
    keep = int(round(len(confidence) * (1 - drop)))
    return feats[confidence.argsort(descending=True)[:keep]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--guidance-intervals", default="",
                    help="also sample with guidance only inside timestep intervals: SCALE:T_LO:T_HI,...")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        intervals = parse_intervals(args.guidance_intervals)
    except ValueError as exc:
        ap.error(str(exc))
    if args.per_class < 1:
        ap.error(f"--per-class={args.per_class} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, evaluator = load_embedded_model(), load_evaluator()
    test, train = load_split("test"), load_split("train")
    test_feats = embedded_quality.features(evaluator, test.images).double()
    feats = lambda x: embedded_quality.features(evaluator, x).double()                # noqa: E731

    images, labels = embedded_quality.generate(model, args.per_class, 50, 1.5, 100)
    gen = feats(images)
    out = {"samples": len(labels), "as_generated": fid_terms(gen, test_feats),
           "projected": frechet_distance(feats(project(images)), test_feats),
           "projected_grey_levels": frechet_distance(feats(project(images, True)), test_feats),
           "projection_moves_real_digits_max": float((project(train.images) - train.images).abs().max()),
           "off_manifold_rms": float((project(images) - images.clamp(-1, 1)).pow(2).mean().sqrt()),
           "pixels_outside_range": float((images.abs() > 1).double().mean()),
           "per_class_spread_gen_over_test": [
               float(gen[labels == c].var(0).sum() / test_feats[test.labels == c].var(0).sum()) for c in range(10)]}
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[:len(labels)]
    real = feats(train.images[idx])
    out["real_train_same_n"] = fid_terms(real, test_feats)
    with torch.no_grad():
        probs = evaluator.logits(images).softmax(-1)
        real_probs = evaluator.logits(train.images[idx]).softmax(-1)
    confidence = probs[torch.arange(len(labels)), labels]
    real_confidence = real_probs[torch.arange(len(idx)), train.labels[idx]]
    correct = probs.argmax(-1) == labels
    out["correct_only"] = {"samples": int(correct.sum()), "fid": frechet_distance(gen[correct], test_feats)}
    out["without_least_confident"] = {
        f"{drop:g}": {"generated": frechet_distance(confident_share(gen, confidence, drop), test_feats),
                      "real_train": frechet_distance(confident_share(real, real_confidence, drop), test_feats)}
        for drop in (0.02, 0.05, 0.10)}
    out["confidence_quantiles_0.01_0.05_0.1_0.5"] = {
        "generated": [float(v) for v in confidence.quantile(torch.tensor([0.01, 0.05, 0.1, 0.5]))],
        "real_train": [float(v) for v in real_confidence.quantile(torch.tensor([0.01, 0.05, 0.1, 0.5]))]}

    sampling.make_scheduler = clipped_ddim
    try:
        clipped, _ = embedded_quality.generate(model, args.per_class, 50, 1.5, 100)
    finally:
        sampling.make_scheduler = ORIGINAL_SCHEDULER
    out["clip_sample"] = {"fid": frechet_distance(feats(clipped), test_feats),
                          "accuracy": float((evaluator.predict(clipped) == labels).double().mean())}
    out["guidance_intervals"] = []
    for scale, lo, hi in intervals:
        guided, _ = guided_in_interval(model, args.per_class, scale, lo, hi)
        out["guidance_intervals"].append({
            "scale": scale, "t_lo": lo, "t_hi": hi, "fid": frechet_distance(feats(guided), test_feats),
            "accuracy": float((evaluator.predict(guided) == labels).double().mean())})
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
