"""Forecast-history memory at production shapes, from DQAR's own accounting, next to diffusers' TaylorSeer.

For each shape, one representative cached tensor per kind is stored through `dqar.method.quant.store` at
16 bits (the model's own dtype), INT8 and INT4 (per-channel scales), and its `nbytes` (payload + scales) is
multiplied by the number of such tensors the forecast history keeps: (order + 1) slots (F, D1, D2) per
cached module and CFG branch. diffusers' TaylorSeer keeps the same (order + 1) factors per hooked module
output in its `taylor_factors_dtype` (bfloat16 by default), which is the column it is compared with.

    python benchmarks/cache_memory.py [--order 2] [--json out.json]

Shapes (per image; batch 1):
- DiT-XL/2: 28 blocks, 256 tokens, hidden 1152, CFG (2 branches); attention + MLP outputs cached (56 modules).
- DiT-XL/2 block target (28 block residuals) and stack target (one residual for the whole stack).
- Flux-dev: 19 double-stream blocks (image 4096 and text 512 tokens) and 38 single-stream blocks (4608 tokens),
  hidden 3072, guidance-distilled (1 branch); the whole-block residual cached (57 blocks, both streams).
"""
from __future__ import annotations

import argparse
import json

import torch

from dqar.method.quant import store

MIB = 2 ** 20


def shapes() -> dict:
    """name -> (model dtype, branches, [(tensor shape, how many such tensors per branch)])."""
    return {
        "DiT-XL/2 (attn+mlp, CFG, fp32 weights)": (torch.float32, 2, [((1, 256, 1152), 28 * 2)]),
        "DiT-XL/2 (attn+mlp, CFG, bf16 weights)": (torch.bfloat16, 2, [((1, 256, 1152), 28 * 2)]),
        "DiT-XL/2 (block residuals, CFG, bf16 weights)": (torch.bfloat16, 2, [((1, 256, 1152), 28)]),
        "DiT-XL/2 (stack residual, CFG, bf16 weights)": (torch.bfloat16, 2, [((1, 256, 1152), 1)]),
        "Flux-dev (block residuals, bf16)": (torch.bfloat16, 1, [((1, 4096, 3072), 19), ((1, 512, 3072), 19),
                                                                  ((1, 4608, 3072), 38)]),
    }


def history_bytes(dtype: torch.dtype, branches: int, tensors: list, order: int, bits: int) -> int:
    total = 0
    g = torch.Generator().manual_seed(0)
    for shape, count in tensors:
        x = torch.randn(shape, generator=g).to(dtype)
        total += store(x, bits, "channel").nbytes * count * branches * (order + 1)
    return total


def taylorseer_bytes(branches: int, tensors: list, order: int, factor_dtype=torch.bfloat16) -> int:
    size = torch.empty((), dtype=factor_dtype).element_size()
    return sum(torch.Size(shape).numel() * count for shape, count in tensors) * branches * (order + 1) * size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--order", type=int, default=2, choices=(0, 1, 2))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    print(f"| shape | order | DQAR 16-bit (model dtype) MiB | DQAR INT8 MiB | DQAR INT4 MiB | "
          f"diffusers TaylorSeer (bf16 factors) MiB |")
    print("|---|---|---|---|---|---|")
    for name, (dtype, branches, tensors) in shapes().items():
        row = {"shape": name, "order": args.order,
               **{f"dqar_{b}bit_bytes": history_bytes(dtype, branches, tensors, args.order, b) for b in (16, 8, 4)},
               "taylorseer_bf16_bytes": taylorseer_bytes(branches, tensors, args.order)}
        rows.append(row)
        print(f"| {name} | {args.order} | {row['dqar_16bit_bytes'] / MIB:,.1f} | {row['dqar_8bit_bytes'] / MIB:,.1f} | "
              f"{row['dqar_4bit_bytes'] / MIB:,.1f} | {row['taylorseer_bf16_bytes'] / MIB:,.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
