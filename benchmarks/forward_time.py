"""Forward time of DiT presets at 256 tokens, batch 2, and the share of it spent in attention modules.

The attention share is measured as a ratio in one run: full forwards interleaved with forwards whose
attention modules return a precomputed output (everything else unchanged), median of rounds:
share = 1 - t(no attention) / t(full). Usage:

    python benchmarks/forward_time.py --models DiT-S/2,DiT-B/2,DiT-XL/2 --rounds 5
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import statistics
import sys
import time

import torch

from dqar.harness.timing import Contender, interleaved_timing
from dqar.models import build_dit


def import_times(runs: int = 5) -> dict[str, float]:
    """Median wall seconds of `python -c 'import dqar'` and `dqar --help` in fresh processes."""
    out = {}
    for name, cmd in {"import dqar": [sys.executable, "-c", "import dqar"],
                      "dqar --help": [shutil.which("dqar") or "dqar", "--help"]}.items():
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            samples.append(time.perf_counter() - t0)
        out[name] = statistics.median(samples)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="DiT-S/2,DiT-B/2,DiT-XL/2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch}, 256 tokens")
    print("| model | forward ms (median) | forward ms, attention skipped | attention share |")
    print("|---|---:|---:|---:|")
    for name in args.models.split(","):
        model = build_dit(name).randomize_(0).eval()
        c = model.config
        x = torch.randn(args.batch, c.in_channels, c.input_size, c.input_size)
        t = torch.full((args.batch,), 500)
        y = torch.arange(args.batch) % c.num_classes
        canned = torch.randn(args.batch, c.num_tokens, c.hidden_size)

        def full():
            with torch.no_grad():
                return model(x, t, y)

        def skip_setup():
            for b in model.blocks:
                b.attn.forward = lambda _x: canned

        def skip_teardown(_):
            for b in model.blocks:
                del b.attn.forward

        res = interleaved_timing({"full": full, "no_attn": Contender(full, skip_setup, skip_teardown)},
                                 rounds=args.rounds, warmup_runs=1, measure_memory=False)
        tf, tn = res["full"].median, res["no_attn"].median
        print(f"| {name} | {1000 * tf:.1f} | {1000 * tn:.1f} | {1 - tn / tf:.1%} |")
        del model
    for name, secs in import_times().items():
        print(f"`{name}`: {secs:.2f} s (median of 5 fresh processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
