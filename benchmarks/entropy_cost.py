"""What the entropy statistic costs per denoising step, on random-weight DiT shapes.

A whole sampling run is too noisy on a shared 2-core machine to resolve a 1-3% effect (rounds spread
8-16%), so this measures the cost two ways in one process:

- micro: the extra work the hooks do per forward when entropy is on (`attention_entropy` on the
  sampled query rows of every layer, plus reading the value back), timed on the real q/k of each layer,
  against the median forward time of the same model (batch 2 = one image with CFG);
- forward-level: hooked forwards with and without entropy, interleaved with a rotating order, many
  rounds, median.

    python benchmarks/entropy_cost.py --models DiT-B/2,DiT-XL/2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.harness.timing import interleaved_timing
from dqar.method.hooks import DiTAttentionOps
from dqar.models import build_dit
from dqar.method.stats import attention_entropy, sample_query_rows


def capture_qk(model, x, t, y):
    """(q, k) of every attention module for one forward, through the model's own qkv projection."""
    captured = []
    handles = []
    for blk in model.blocks:
        attn = blk.attn

        def hook(mod, args):
            q, k, _ = DiTAttentionOps.qkv(mod, args[0])
            captured.append((q.detach(), k.detach()))

        handles.append(attn.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x, t, y)
    for h in handles:
        h.remove()
    return captured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="DiT-B/2,DiT-XL/2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--micro-repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 2; {date.today()}")
    print("| model | forward ms | entropy work per forward, ms (micro) | micro % of forward "
          "| forward-level: hooked with entropy / hooked without | spread of rounds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model = build_dit(name).randomize_(0).eval()
        cfg = model.config  # DiTConfig
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        t = torch.tensor([500, 500])
        y = torch.tensor([1, cfg.num_classes])
        rows_cfg = DQARConfig(schedule="none", record_entropy=True)
        qk = capture_qk(model, x, t, y)
        rows = [sample_query_rows(q.shape[2], rows_cfg.entropy_rows, rows_cfg.entropy_seed + i)
                for i, (q, _) in enumerate(qk)]

        def entropy_work():
            # per layer and per CFG branch, as the hooks commit it
            for (q, k), r in zip(qk, rows):
                e = attention_entropy(q, k, r)
                for part in e.chunk(2):
                    float(part.mean())

        def forward():
            with torch.no_grad():
                return model(x, t, y)

        for _ in range(3):
            forward()
            entropy_work()
        micro = []
        for _ in range(args.micro_repeats):
            t0 = time.perf_counter()
            entropy_work()
            micro.append(time.perf_counter() - t0)
        fwd = []
        for _ in range(max(5, args.micro_repeats // 3)):
            t0 = time.perf_counter()
            forward()
            fwd.append(time.perf_counter() - t0)
        micro_ms, fwd_ms = 1000 * statistics.median(micro), 1000 * statistics.median(fwd)

        def hooked(config):
            def run():
                ctl = apply_dqar(model, config)
                try:
                    ctl.begin_step(0, 1)
                    return forward()
                finally:
                    remove_dqar(model)
            return run

        res = interleaved_timing({"hooked": hooked(DQARConfig(schedule="none")), "entropy": hooked(rows_cfg)},
                                 rounds=args.rounds, warmup_runs=2, measure_memory=False)
        ratio = res["entropy"].median / res["hooked"].median
        spread = max((max(r.samples) - min(r.samples)) / r.median for r in res.values())
        print(f"| {name} | {fwd_ms:.1f} | {micro_ms:.2f} | {100 * micro_ms / fwd_ms:.2f}% | {ratio:.3f} | "
              f"{spread:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
