"""The method: when a DiT's attention/MLP outputs are reused, how they are stored, and how that is hooked in.

Read in this order: `config` (every knob), `schedules` (which layers may reuse at a step), `stats`
(entropy, SNR, policy features), `policy` (the learned reuse MLP), `cache` and `quant` (what is kept and at
how many bits), `controller` (the per-generation state: decisions, cache, counters), `step` (the one path
that starts and ends steps), `layouts` (where each model family keeps its blocks), `flops` (the FLOP
profile behind ideal_speedup) and `hooks` (apply_dqar / remove_dqar).
"""
