"""Micro-benchmark of dqar.method.quant: quantize + dequantize time and error per mode, and cache size.

Shapes are a DiT attention output (batch 2 = CFG cond|uncond, 256 tokens, hidden 1152 for DiT-XL/2,
768 for DiT-B/2), fp32. Data is synthetic and seeded: Gaussian, and Gaussian with 1% of channels
scaled x50 to mimic the outlier channels CSB is meant for. Timings are medians after warm-up
(nanoGPT bench.py style), with a device sync around each timed region.

    python benchmarks/quant_micro.py [--repeats 50] [--warmup 5] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dqar.method.quant import GRANULARITIES, select_salient_channels, store

SHAPES = {"DiT-XL/2": (2, 256, 1152), "DiT-B/2": (2, 256, 768)}
CSB_TOPK = 0.01
OUTLIER_FACTOR = 50.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, warmup: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median, min) wall time of fn in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm())


def make_data(shape, device):
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(shape, generator=g)
    x_out = x.clone()
    channels = shape[-1]
    n_out = max(1, round(CSB_TOPK * channels))
    idx = torch.randperm(channels, generator=g)[:n_out]
    x_out[..., idx] *= OUTLIER_FACTOR
    return x.to(device), x_out.to(device)


def bench_shape(name, shape, args, device):
    x, x_out = make_data(shape, device)
    # CSB as the cache runs it: salience calibrated once, then fixed indices every step
    sal = select_salient_channels(x, CSB_TOPK)
    sal_out = select_salient_channels(x_out, CSB_TOPK)
    rows = []

    def measure(label, gran, csb, bits, s, s_out):
        st = lambda: store(x, bits, "tensor" if gran == "-" else gran, s)
        held = st()
        q_med, _ = time_ms(st, args.warmup, args.repeats, device)
        dq_med, _ = time_ms(held.dequantize, args.warmup, args.repeats, device)
        tot_med, tot_min = time_ms(lambda: st().dequantize(), args.warmup, args.repeats, device)
        rows.append((label, gran, csb, q_med, dq_med, tot_med, tot_min, rel_err(x, held.dequantize()),
                     rel_err(x_out, store(x_out, bits, "tensor" if gran == "-" else gran, s_out).dequantize())))

    for bits in (16, 32):
        measure(f"fp{bits} copy", "-", "-", bits, None, None)
    for bits in (8, 4):
        for gran in GRANULARITIES:
            measure(f"int{bits}", gran, "no", bits, None, None)
            measure(f"int{bits}", gran, f"{sal.numel()} ch", bits, sal, sal_out)
    t_sel, _ = time_ms(lambda: select_salient_channels(x, CSB_TOPK), args.warmup, args.repeats, device)
    print(f"\n### {name}: {tuple(shape)} fp32\n")
    print("| mode | granularity | CSB (top 1%) | quantize ms | dequantize ms | both ms (median) | both ms (min) "
          "| rel. error, Gaussian | rel. error, 1% outlier ch. x50 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for label, gran, csb, q, dq, tot, tmin, e, e_out in rows:
        print(f"| {label} | {gran} | {csb} | {q:.3f} | {dq:.3f} | {tot:.3f} | {tmin:.3f} | {e:.2e} | {e_out:.2e} |")
    print(f"\nselect_salient_channels(x, {CSB_TOPK}) alone (per-step selection instead of calibrated "
          f"indices; not included above): {t_sel:.3f} ms")


def cache_table(device):
    layers, branches, shape = 28, 2, (1, 256, 1152)
    entries = layers * branches
    x, x_out = make_data(shape, device)
    sal = select_salient_channels(x_out, CSB_TOPK)
    print(f"\n### Cache size: DiT-XL/2, {layers} layers x {branches} CFG branches x {shape} ({entries} entries)\n")
    print("| storage | bytes per entry | cache MB (10^6 B) | vs fp32 |")
    print("|---|---:|---:|---:|")
    base = store(x, 32).nbytes
    modes = [("fp32", 32, "tensor", None), ("fp16", 16, "tensor", None)]
    for bits in (8, 4):
        for gran in GRANULARITIES:
            modes.append((f"int{bits} {gran}", bits, gran, None))
        modes.append((f"int{bits} channel + CSB top 1% ({sal.numel()} ch)", bits, "channel", sal))
    for label, bits, gran, s in modes:
        nb = store(x_out, bits, gran, s).nbytes
        print(f"| {label} | {nb:,} | {nb * entries / 1e6:.2f} | {nb / base:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}, warm-up {args.warmup}")
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            bench_shape(name, shape, args, device)
        cache_table(device)


if __name__ == "__main__":
    main()
