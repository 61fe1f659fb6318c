#!/usr/bin/env bash
# Interleaved re-timing of the standard report's key points with `dqar bench` (baseline and candidate
# alternating in one process, each round starting with the other one, a warm-up round, median of 5),
# because the sweep times each point once against one shared reference and this VM's speed drifts by
# 10-30% from one minute to the next.
#
#   benchmarks/interleaved_points.sh            # -> runs/interleaved/<name>.json, one per point
set -euo pipefail
OUT=${OUT:-runs/interleaved}
N=${N:-50}
REPEATS=${REPEATS:-5}
mkdir -p "$OUT"
common=(--model embedded --n "$N" --steps 50 --sampler ddim --cfg-scale 1.5 --seed 0 --repeats "$REPEATS"
        --warmup-runs 1 --threads 2)
dqar bench "${common[@]}" --schedule static --warmup 0.4 --layers 0.33 --json "$OUT/static-w0.4-l0.33.json"
dqar bench "${common[@]}" --schedule static --warmup 0.2 --layers 1.0 --order deep --json "$OUT/deep-w0.2-l1.0.json"
dqar bench "${common[@]}" --schedule interval --interval 3 --warmup 0 --targets attn,mlp \
    --json "$OUT/interval3-attn-mlp.json"
