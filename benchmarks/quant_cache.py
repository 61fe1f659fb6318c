"""The quantized reuse cache end to end: error on real attention outputs, cache size, cost, image effect.

a. Reconstruction error ||x - deq(q(x))|| / ||x|| per mode on the attention outputs the cache would
   hold: every layer's output, split into cond/uncond as the cache stores it, at every step of a DDIM
   generation of the embedded model (forward hooks on block.attn, no reuse, so the trajectory is the
   model's own).
b. Cache size for the DiT-XL/2 shape (28 layers x 2 CFG branches x batch 1 x 256 tokens x 1152),
   measured by committing real-shaped tensors through DQARController and reading summary()["cache_bytes"].
c. Quantize + dequantize cost as % of a DiT-B/2 sampling step (random weights; batch 2 with CFG = 4
   rows): interleaved runs at cache_bits 16 / 8 / 4 with the same static decisions, median ms/step,
   and the direct micro cost (layers computed x quantize ms + layers reused x dequantize ms).
d. Final-image effect of quantized vs unquantized reuse, same seeds: PSNR, and FID vs the uncached
   samples on the embedded evaluator's features when it is installed.

    python benchmarks/quant_cache.py [--parts abcd] [--threads 1] [--md out.md] [--dry-run]

Without the embedded model's assets the script stops, unless --dry-run, which uses DiT-Digits with
random weights so the plumbing can be checked: its quality numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import replace

import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.controller import DQARController
from dqar.models import build_dit
from dqar.method.quant import GRANULARITIES, SalienceCalibrator, store
from dqar.sampling import sample

BRANCHES = ("cond", "uncond")
MB = 2 ** 20


# ------------------------------------------------------------------------------------------ helpers
def load_digits_model(dry_run: bool):
    """(model, description, cfg_scale, evaluator or None)."""
    try:
        from dqar.digits.embedded import load_embedded_model, model_card

        model = load_embedded_model()
        cfg_scale = float(model_card().get("recommended_cfg_scale", 1.5))
        try:
            from dqar.digits.embedded import load_evaluator

            evaluator = load_evaluator()
        except Exception as exc:  # the evaluator is optional: PSNR does not need it
            print(f"note: embedded evaluator unavailable ({exc}); FID columns will be n/a", file=sys.stderr)
            evaluator = None
        return model, "embedded digits DiT (trained)", cfg_scale, evaluator
    except Exception as exc:
        if not dry_run:
            sys.exit(f"embedded model unavailable ({exc}); rerun with --dry-run to check the plumbing "
                     "on DiT-Digits random weights")
        print(f"warning: embedded model unavailable ({exc}); DRY RUN on DiT-Digits random weights",
              file=sys.stderr)
        return (build_dit("DiT-Digits").randomize_(0).eval(),
                "DiT-Digits RANDOM weights (dry run: quality numbers mean nothing)", 1.5, None)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).norm() / x.float().norm())


def fmt(v, spec=".3e"):
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class StepTracker:
    """Sampler observer that remembers the current step index."""

    def __init__(self):
        self.step = 0

    def on_step_begin(self, info):
        self.step = info.step_index

    def on_step_end(self, info):
        pass


def labels_seeds(n, classes=10, seed0=0):
    return [k % classes for k in range(n)], [seed0 + k for k in range(n)]


# ------------------------------------------------------------------------------------------ a
def csb_options(channels):
    one_pct = max(1, round(0.01 * channels))
    return [("none", None), (f"top 1% ({one_pct} ch)", 0.01), ("4 ch", 4), ("4 ch, calibrated steps 0-1", "cal4")]


def part_a(model, cfg_scale, args):
    channels = model.config.hidden_size
    modes = [(b, g, name, spec) for b in (8, 4) for g in GRANULARITIES for name, spec in csb_options(channels)]
    errs = {("fp16", "-", "-"): []}
    errs.update({(f"int{b}", g, name): [] for b, g, name, _ in modes})
    tracker = StepTracker()
    calibrators = {}
    use_cfg = cfg_scale != 1.0

    def hook_for(layer):
        def hook(module, inputs, out):
            out = out.detach()
            chunks = out.chunk(2) if use_cfg else (out,)
            cal = calibrators.setdefault(layer, SalienceCalibrator())
            if tracker.step < 2:
                for c in chunks:
                    cal.update(c)
            for c in chunks:
                errs[("fp16", "-", "-")].append(rel_err(c, c.half().to(c.dtype)))   # store(c, 16) keeps the model dtype
                for b, g, name, spec in modes:
                    salient = cal.channels(4) if spec == "cal4" else spec
                    errs[(f"int{b}", g, name)].append(rel_err(c, store(c, b, g, salient).dequantize()))
        return hook

    labels, seeds = labels_seeds(args.recon_images)
    handles = [blk.attn.register_forward_hook(hook_for(i)) for i, blk in enumerate(model.blocks)]
    t0 = time.perf_counter()
    try:
        sample(model, labels, seeds, steps=args.recon_steps, cfg_scale=cfg_scale, observers=[tracker])
    finally:
        for h in handles:
            h.remove()
    n = len(errs[("fp16", "-", "-")])
    rows = []
    for (mode, g, csb), v in errs.items():
        v = sorted(v)
        rows.append([mode, g, csb, fmt(statistics.fmean(v)), fmt(statistics.median(v)),
                     fmt(v[min(len(v) - 1, int(0.95 * len(v)))]), fmt(v[-1])])
    shape = (args.recon_images, model.config.num_patches if hasattr(model.config, "num_patches")
             else (model.config.input_size // model.config.patch_size) ** 2, channels)
    head = (f"### a. Reconstruction error on cached attention outputs\n\n"
            f"{n} tensors = {args.recon_steps} DDIM steps x {len(model.blocks)} layers x "
            f"{2 if use_cfg else 1} branches, each {shape} fp32 (cfg {cfg_scale}); "
            f"collected in {time.perf_counter() - t0:.0f} s. CSB 'top 1%' / '4 ch' pick the channels from each "
            "tensor itself (csb_calibration_steps=0); 'calibrated' uses the channels with the largest "
            "max|x| over both branches of steps 0-1 per layer (csb_calibration_steps=2).\n\n")
    return head + table(["mode", "granularity", "CSB", "mean rel. err", "median", "p95", "max"], rows)


# ------------------------------------------------------------------------------------------ b
def part_b(args):
    layers, tokens, hidden, heads = 28, 256, 1152, 16
    g = torch.Generator().manual_seed(0)
    outs = torch.randn(layers, 2, 1, tokens, hidden, generator=g)
    kv = torch.randn(layers, 2, 2, 1, heads, tokens, hidden // heads, generator=g)

    def measured(config, dtype=torch.float32, kv_mode=False):
        # Every layer reusable (l = 1.0): the controller caches only layers its schedule can reuse.
        config = dataclasses.replace(config, layer_fraction=1.0)
        ctl = DQARController(config, num_layers=layers, branches=BRANCHES)
        ctl.begin_step(0, 50, branches=BRANCHES)
        stored = 0
        for layer in range(layers):
            for i, b in enumerate(BRANCHES):
                if kv_mode:
                    e = ctl.commit(layer, b, keys=kv[layer, i, 0].to(dtype), values=kv[layer, i, 1].to(dtype))
                else:
                    e = ctl.commit(layer, b, output=outs[layer, i].to(dtype))
                stored += e.nbytes
        total = ctl.summary()["cache_bytes"]
        assert total == stored, (total, stored)  # the controller's count is the entries' own
        return total

    rows = []
    spec = [
        ("fp32 (cache_bits=16, fp32 model)", DQARConfig(cache_bits=16), torch.float32),
        ("fp16 (cache_bits=16, fp16 model)", DQARConfig(cache_bits=16), torch.float16),
    ]
    for bits in (8, 4):
        for gran in GRANULARITIES:
            spec.append((f"int{bits} {gran}", DQARConfig(cache_bits=bits, quant_granularity=gran), torch.float32))
        spec.append((f"int{bits} channel + CSB 1% (12 ch)",
                     DQARConfig(cache_bits=bits, csb_topk=0.01), torch.float32))
    fp32_total = None
    for name, config, dtype in spec:
        total = measured(config, dtype)
        fp32_total = fp32_total or total
        rows.append([name, f"{total:,}", f"{total / MB:.2f}", f"{total / 1e6:.2f}", f"{fp32_total / total:.2f}x"])
    kv_total = measured(DQARConfig(mode="kv", kv_bits=(16, 8)), torch.float16, kv_mode=True)
    rows.append(["kv mode: K fp16 + V int8 channel (fp16 model)", f"{kv_total:,}", f"{kv_total / MB:.2f}",
                 f"{kv_total / 1e6:.2f}", f"{fp32_total / kv_total:.2f}x"])
    head = ("### b. Cache size, DiT-XL/2 shape\n\n"
            f"{layers} layers x 2 CFG branches x batch 1, attention output ({tokens}, {hidden}) per entry "
            f"(kv mode: K and V, each ({heads}, {tokens}, {hidden // heads})); bytes are "
            "DQARController.summary()['cache_bytes'] after committing one entry per (layer, branch), "
            "checked equal to the sum of the entries' nbytes.\n\n")
    return head + table(["storage", "bytes", "MiB", "MB (1e6)", "vs fp32"], rows)


# ------------------------------------------------------------------------------------------ c
def time_ms(fn, warmup=5, repeats=30):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def part_c(args):
    model = build_dit(args.timing_model).randomize_(0).eval()
    cfgm = model.config
    tokens = (cfgm.input_size // cfgm.patch_size) ** 2
    labels, seeds = labels_seeds(args.timing_batch, classes=cfgm.num_classes)
    base = DQARConfig(schedule="static", warmup=0.3, layer_fraction=1.0)
    bits_list = (16, 8, 4)
    ms = {b: [] for b in bits_list}
    events = {}

    def one(bits, steps):
        # Only cache_bits changes between runs: the schedule, and so every decision, is the same. A fresh
        # controller per run (applied outside the timed call): a controller's config is fixed.
        ctl = apply_dqar(model, replace(base, cache_bits=bits))
        try:
            t0 = time.perf_counter()
            sample(model, labels, seeds, steps=steps, cfg_scale=4.0)
            dt = time.perf_counter() - t0
            events[bits] = ctl.summary()["events_per_step"]
        finally:
            remove_dqar(model)
        return 1e3 * dt / steps

    t_start = time.perf_counter()
    for bits in bits_list:             # warm-up (also the one-off FLOP profile of the input shape)
        one(bits, 2)
    for rep in range(args.timing_repeats):
        order = bits_list[rep % 3:] + bits_list[:rep % 3]   # rotate so no setting always goes first
        for bits in order:
            ms[bits].append(one(bits, args.timing_steps))
    wall = time.perf_counter() - t_start
    assert events[16] == events[8] == events[4], events
    layers = len(model.blocks)
    per_step_reused = events[16]
    # micro costs on the cached tensor shape: one branch's rows
    x = torch.randn(args.timing_batch, tokens, cfgm.hidden_size, generator=torch.Generator().manual_seed(0))
    micro = {}
    for bits in (8, 4):
        q = store(x, bits, base.quant_granularity)
        micro[bits] = (time_ms(lambda: store(x, bits, base.quant_granularity)), time_ms(q.dequantize))
    slots = layers * 2 * args.timing_steps
    reused = sum(per_step_reused)
    computed = slots - reused
    med16 = statistics.median(ms[16])
    rows = [[16, f"{med16:.1f}", ", ".join(f"{v:.0f}" for v in ms[16]), "-", "-", "-", "-", "0 (no copy)"]]
    for bits in (8, 4):
        med = statistics.median(ms[bits])
        qms, dqms = micro[bits]
        micro_step = (computed * qms + reused * dqms) / args.timing_steps
        rows.append([bits, f"{med:.1f}", ", ".join(f"{v:.0f}" for v in ms[bits]), f"{med - med16:+.1f}",
                     f"{100 * (med - med16) / med16:+.2f}%", f"{qms:.3f} / {dqms:.3f}",
                     f"{micro_step:.2f} ms", f"{100 * micro_step / med16:.2f}%"])
    head = (f"### c. Quantization cost vs step time, {args.timing_model} (random weights)\n\n"
            f"{args.timing_batch} images with CFG = {2 * args.timing_batch} rows x {tokens} tokens, "
            f"{args.timing_steps} DDIM steps, static w=0.3 l=1.0 (reused (layer, branch) slots per step: "
            f"{per_step_reused}, {reused} of {slots}), quant_granularity=channel; {args.timing_repeats} "
            f"interleaved repeats per setting after a 2-step warm-up each; {wall:.0f} s in all. "
            f"Micro cost per step = ({computed} computed x quantize ms + {reused} reused x dequantize ms) / "
            f"{args.timing_steps} steps, quantize/dequantize timed on ({args.timing_batch}, {tokens}, "
            f"{cfgm.hidden_size}) fp32 in the same process (median of 30 after 5 warm-up).\n\n")
    return head + table(["cache_bits", "median ms/step", "runs (ms/step)", "diff vs 16 (ms)", "diff vs 16",
                         "quantize / dequantize ms", "micro cost per step", "micro cost % of step"], rows)


# ------------------------------------------------------------------------------------------ d
QUALITY_MODES = [
    ("int8 channel", {"cache_bits": 8, "quant_granularity": "channel"}),
    ("int8 tensor", {"cache_bits": 8, "quant_granularity": "tensor"}),
    ("int4 channel", {"cache_bits": 4, "quant_granularity": "channel"}),
    ("int4 tensor", {"cache_bits": 4, "quant_granularity": "tensor"}),
    ("int4 channel + CSB 4 ch", {"cache_bits": 4, "quant_granularity": "channel", "csb_topk": 4}),
]
QUALITY_SCHEDULES = [("static w=0.2 l=1.0", {"warmup": 0.2, "layer_fraction": 1.0}),
                     ("static w=0.4 l=0.33 (seeds)", {"warmup": 0.4, "layer_fraction": 0.33})]


def part_d(model, cfg_scale, evaluator, args):
    from dqar.harness.metrics import EvaluatorFeatures, feature_stats, fid_from_features, psnr

    labels, seeds = labels_seeds(args.quality_images, seed0=1000)
    run = lambda: sample(model, labels, seeds, steps=args.quality_steps, cfg_scale=cfg_scale)  # noqa: E731
    t0 = time.perf_counter()
    uncached = run()
    extractor = EvaluatorFeatures(evaluator) if evaluator is not None else None
    ref_stats = feature_stats(extractor(uncached), "uncached") if extractor else None
    fid = (lambda imgs: fid_from_features(extractor(imgs), ref_stats)) if extractor else (lambda imgs: None)
    rows = []
    for sched_name, sched in QUALITY_SCHEDULES:
        base = DQARConfig(schedule="static", **sched)
        ctl = apply_dqar(model, base)
        try:
            exact = run()
            frac = ctl.summary()["reuse_fraction"]
        finally:
            remove_dqar(model)
        rows.append([sched_name, "16 (unquantized reuse)", "inf", fmt(psnr(exact, uncached), ".2f"),
                     fmt(fid(exact), ".4f"), f"{frac:.3f}"])
        for name, over in QUALITY_MODES:
            # Same schedule, only the storage changes; a fresh controller, since its quantizer state (CSB
            # tracking) is built from the config it was applied with.
            ctl = apply_dqar(model, replace(base, **over))
            try:
                images = run()
                frac = ctl.summary()["reuse_fraction"]
            finally:
                remove_dqar(model)
            rows.append([sched_name, name, fmt(psnr(images, exact), ".2f"), fmt(psnr(images, uncached), ".2f"),
                         fmt(fid(images), ".4f"), f"{frac:.3f}"])
    head = (f"### d. Final-image effect, {args.quality_images} images x {args.quality_steps} DDIM steps, cfg {cfg_scale}\n\n"
            "PSNR in dB on [-1, 1] images over the batch; same seeds for every row. FID is against the uncached "
            "samples of the same seeds, on the embedded evaluator's penultimate features "
            f"({'available' if extractor else 'not installed: n/a'}). {time.perf_counter() - t0:.0f} s in all.\n\n")
    return head + table(["schedule", "cache", "PSNR vs unquantized reuse", "PSNR vs uncached",
                         "FID vs uncached", "reuse fraction"], rows)


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. abd (default abcd)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core VM two threads stall each other)")
    p.add_argument("--dry-run", action="store_true", help="DiT-Digits random weights when the embedded model is missing")
    p.add_argument("--recon-images", type=int, default=20)
    p.add_argument("--recon-steps", type=int, default=50)
    p.add_argument("--timing-model", default="DiT-B/2")
    p.add_argument("--timing-batch", type=int, default=2, help="images per branch (CFG doubles the rows)")
    p.add_argument("--timing-steps", type=int, default=8)
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--quality-images", type=int, default=100)
    p.add_argument("--quality-steps", type=int, default=50)
    p.add_argument("--md", default=None, help="also write the tables to this Markdown file")
    args = p.parse_args(argv)
    bad = set(args.parts) - set("abcd")
    if bad:
        p.error(f"--parts={args.parts!r} has unknown parts {sorted(bad)}; allowed letters: a, b, c, d")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = [f"torch {torch.__version__}, threads {torch.get_num_threads()}, command: python "
           + " ".join(["benchmarks/quant_cache.py", *(argv if argv is not None else sys.argv[1:])])]
    model = cfg_scale = evaluator = None
    if set(args.parts) & set("ad"):
        model, described, cfg_scale, evaluator = load_digits_model(args.dry_run)
        out.append(f"model for a/d: {described}")
    print("\n".join(out), flush=True)
    with torch.no_grad():
        for part in "abdc":   # c last: the timing run should not share the machine with this process's own work
            if part not in args.parts:
                continue
            t0 = time.perf_counter()
            if part == "a":
                text = part_a(model, cfg_scale, args)
            elif part == "b":
                text = part_b(args)
            elif part == "c":
                text = part_c(args)
            else:
                text = part_d(model, cfg_scale, evaluator, args)
            print(f"\n{text}\n\n(part {part}: {time.perf_counter() - t0:.0f} s)", flush=True)
            out.append(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
