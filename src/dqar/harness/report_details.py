"""The report's sections on single effects: one-field pairs (order, K/V, cache bits), memory, the entropy
and SNR profile, the named baselines and the sample images."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .baselines import BASELINE_SETTINGS
from .plots import entropy_snr_plot, image_grid_plot
from .report_common import (DASH, Missing, calls_cell, fmt, ideal_cell, label, measured_cell, pairs, pct, setting,
                            table)
from .results_file import load_samples

if TYPE_CHECKING:
    from .report import Report

# Sample images per class and side in the samples figure.
IMAGES_PER_CLASS = 4


# ------------------------------------------------------------------------------------------------
# pairs that differ in one field
# ------------------------------------------------------------------------------------------------

def _pair_section(rep: "Report", field: str, a, b_values, names: tuple[str, str], hint: str):
    ps = pairs(rep.rows, field, a, b_values)
    if not ps:
        raise Missing(f"needs two points that differ only in {field} ({hint})")
    body, deltas = [], []
    for ra, rb in ps:
        fa, fb = ra.quality.fid_vs_baseline, rb.quality.fid_vs_baseline
        da = None if fa is None or fb is None else fb - fa
        deltas.append((ra, rb, da))
        body.append([f"{ra.schedule} w={setting(ra, 'warmup')} l={setting(ra, 'layer_fraction')}"
                     + (f" → {rb.config.get(field)}" if len(b_values) > 1 else ""),
                     fmt(fa), fmt(fb), fmt(da), fmt(ra.quality.fid_vs_data), fmt(rb.quality.fid_vs_data),
                     fmt(ra.quality.ssim, ".3f"), fmt(rb.quality.ssim, ".3f"), ideal_cell(ra), ideal_cell(rb),
                     fmt(ra.dqar.cache_mb, ".2f"), fmt(rb.dqar.cache_mb, ".2f")])
    x, y = names
    header = ["config", f"FID {x}", f"FID {y}", "Δ FID", f"FID-data {x}", f"FID-data {y}", f"SSIM {x}",
              f"SSIM {y}", f"ideal {x}", f"ideal {y}", f"cache MiB {x}", f"cache MiB {y}"]
    return table(header, body), deltas


def sec_order(rep: "Report") -> list[str]:
    lines, deltas = _pair_section(rep, "order", "shallow", ("deep",), ("shallow", "deep"),
                                  "e.g. --grid order=shallow,deep layers=0.33,1.0")
    d = [abs(x[2]) for x in deltas if x[2] is not None]
    if d:
        ref = [x[0].quality.fid_vs_baseline for x in deltas if x[0].quality.fid_vs_baseline is not None]
        lines += ["", f"Largest |Δ FID| deep vs shallow: {max(d):.3f} over {len(d)} pair(s) "
                      f"(shallow FIDs span {min(ref):.2f}–{max(ref):.2f})."]
    return lines


def sec_kv(rep: "Report") -> list[str]:
    lines, _ = _pair_section(rep, "mode", "output", ("kv",), ("output", "K/V"), "e.g. --baselines static,kv")
    return ["Same schedule, caching the attention output (before the adaLN gate) vs caching K/V and "
            "recomputing Q and attention:", ""] + lines


def sec_int8(rep: "Report") -> list[str]:
    lines, deltas = _pair_section(rep, "cache_bits", 16, (8, 4), ("16-bit", "quantized"),
                                  "e.g. --grid cache-bits=16,8")
    d = [x[2] for x in deltas if x[2] is not None]
    return lines + (["", f"Δ FID from quantizing the cache: {', '.join(f'{v:+.3f}' for v in d)}."] if d else [])


# ------------------------------------------------------------------------------------------------
# memory, entropy, baselines, samples
# ------------------------------------------------------------------------------------------------

def sec_memory(rep: "Report") -> list[str]:
    ref, dq = rep.reference, rep.showcase()
    if ref is None or dq is None:
        raise Missing("needs the 'none' reference and a static point (--baselines none,static)")
    b, d = ref.baseline, dq.dqar
    lines = [f"Reference vs `{label(dq)}` (warmup {setting(dq, 'warmup')}, layers {setting(dq, 'layer_fraction')}). "
             "Peak memory is per generation: on CPU the growth of the resident set during the call (weights "
             "loaded before it are not counted), on CUDA the max allocated bytes; cache = the controller's peak "
             "cache size.", ""]
    delta = lambda x, y: None if x is None or y is None else y - x
    body = [["Peak memory (MiB)", fmt(b.peak_mem_mb, ".1f"), fmt(d.peak_mem_mb, ".1f"),
             fmt(delta(b.peak_mem_mb, d.peak_mem_mb), "+.1f")],
            ["Cache memory (MiB)", DASH, fmt(d.cache_mb, ".2f"), fmt(d.cache_mb, "+.2f")],
            ["Generation time (s, median)", fmt(b.seconds, ".2f"), fmt(d.seconds, ".2f"),
             fmt(delta(b.seconds, d.seconds), "+.2f")],
            ["Speedup: FLOP bound", "1.00x", ideal_cell(dq) + "x", ""],
            ["Speedup: measured (run range)", "1.00x", measured_cell(dq), ""]]
    lines += table(["metric", "baseline", "DQAR", "delta"], body)
    lines += ["", "Every point:", ""]
    body = []
    for r in rep.rows:
        cache = r.dqar.cache_mb
        share = None if cache is None or not b.peak_mem_mb else cache / b.peak_mem_mb
        body.append([label(r), fmt(r.dqar.peak_mem_mb, ".1f"), fmt(cache, ".2f"), pct(share, ".1f"),
                     fmt(r.dqar.seconds, ".2f"), ideal_cell(r), measured_cell(r)])
    lines += table(["point", "peak MiB", "cache MiB", "cache / ref. peak", "seconds", "ideal", "measured"], body)
    return lines


def _monotone(name: str, seq, falling: bool) -> str:
    vals = [v for v in seq if v is not None]
    if len(vals) < 2:
        return f"- {name}: not measured."
    diffs = np.diff(np.asarray(vals, dtype=float))
    wrong = diffs > 0 if falling else diffs < 0
    word = "falls" if falling else "rises"
    return (f"- {name}: {vals[0]:.4g} → {vals[-1]:.4g}; {word} at {int((~wrong).sum())} of {len(diffs)} steps"
            + (f", moves the other way at {int(wrong.sum())} (largest such move {np.abs(diffs[wrong]).max():.3g})"
               if wrong.any() else " (monotone)") + ".")


def sec_entropy(rep: "Report") -> list[str]:
    prof = rep.reference.profile if rep.reference is not None else None
    ent = prof.entropy_per_step if prof is not None else None
    if not ent or all(v is None for v in ent):
        raise Missing("needs the 'none' reference row with its entropy profile (--baselines none)")
    snr, x0 = prof.snr_per_step or [], prof.x0_snr_per_step or []
    event_rows = {label(r): r.profile.events_per_step for r in rep.rows
                  if r.schedule in ("gate", "static") and r.profile is not None and r.profile.events_per_step}
    shown = [n for n in ("static",) if n in event_rows]
    shown += [n for n in event_rows if n not in shown and (rep.named(n) is not None and rep.named(n).schedule == "gate")]
    shown = shown[:3]
    T = len(ent)
    idx = sorted(set(list(range(0, T, 5)) + [T - 1]))
    lines = [f"Attention entropy (nats, mean over layers and {prof.profile_n} images' sampled query "
             "rows) and SNR of the uncached model; reuse events per step (all layers and CFG branches) of "
             "the static and gate points.", ""]
    body = [[str(i), fmt(ent[i], ".3f"), fmt(snr[i] if i < len(snr) else None, ".3g"),
             fmt(x0[i] if i < len(x0) else None, ".3g")]
            + [str(event_rows[n][i]) if i < len(event_rows[n]) else DASH for n in shown] for i in idx]
    lines += table(["step", "entropy", "SNR α²/σ²", "SNR x̂₀"] + [f"events {n}" for n in shown], body)
    lines += ["", _monotone("entropy", ent, falling=True), _monotone("SNR α²/σ²", snr, falling=False),
              _monotone("SNR x̂₀", x0, falling=False)]
    entropy_snr_plot(ent, snr, rep.out / "entropy_snr.png", x0_snr=x0 or None,
                     events={n: event_rows[n] for n in shown} or None)
    return lines + ["", "![entropy and SNR per step](entropy_snr.png)"]


def _variant_settings(row) -> str:
    recorded = row.variant_settings
    shown = recorded if recorded is not None else BASELINE_SETTINGS.get(row.variant, {})
    parts = []
    for k, v in shown.items():
        if isinstance(v, list) and len(v) > 4:      # magcache's calibrated ratios, one per step
            parts.append(f"{k}=[{len(v)} values: {v[0]:.3g} … {v[-1]:.3g}]")
        else:
            parts.append(f"{k}={v}")
    # Rows from before variant_settings was recorded ran with the same constants (unchanged since pab exists).
    return ", ".join(parts) + ("" if recorded is not None else " (not recorded in the row: the values dqar has "
                                                                "always used)")


def sec_baselines(rep: "Report") -> list[str]:
    order = ["none", "static", "interval-attn-mlp", "kv"]
    rows = [rep.named(n) for n in order if rep.named(n) is not None and rep.named(n).variant is None]
    rows += [r for r in rep.rows if r.variant is not None]          # ptq-int8, pab, diffusers' caches
    rows += [r for r in rep.rows if r.schedule == "gate"]
    if len(rows) < 2:
        raise Missing("needs the named baselines (--baselines none,static,ptq-int8,interval-attn-mlp,kv)")
    body = [[label(r), fmt(r.dqar.ms_per_step, ".1f"), ideal_cell(r), measured_cell(r), calls_cell(r),
             fmt(r.dqar.peak_mem_mb, ".1f"), fmt(r.dqar.cache_mb, ".2f"), fmt(r.dqar.reuse_events, "d"),
             fmt(r.quality.psnr, ".2f"), fmt(r.quality.fid_vs_baseline), fmt(r.quality.fid_vs_data),
             pct(r.quality.accuracy)] for r in rows]
    lines = ["Seed 002's comparison (its rows: baseline, static reuse, PTQ4DiT-style quantization, DQAR), plus "
             "FORA-style interval reuse, K/V caching and, where measured, diffusers' pyramid attention broadcast "
             "(pab; its reuse events count attention calls, each covering both CFG halves) and diffusers' other "
             "caches on the same weights (taylorseer, seacache, fastercache, fbc, magcache; their reuse events "
             "count skipped attention and MLP calls per CFG branch). PTQ, PAB and diffusers' caches run without "
             "the controller, so no FLOP bound is computed for them (ideal –); *work a/m/b*, the share of "
             "attention / MLP / block calls executed, is counted for all alike.", ""]
    lines += table(["method", "ms/step", "ideal", "measured", "work a/m/b", "peak MiB", "cache MiB", "reuse events",
                    "PSNR dB", "FID vs base", "FID vs data", "accuracy"], body)
    pab = rep.named("pab")
    if pab is not None:
        lines += ["", f"PAB settings: {_variant_settings(pab)}. They are our choices, not diffusers' defaults: "
                      "diffusers' PyramidAttentionBroadcastConfig leaves the spatial attention skip range at None "
                      "(nothing skipped), so skip range 2 (every other attention call reuses) is ours, and the "
                      "timestep window (100, 800) is the range diffusers' config carries, which we kept."]
    others = [r for r in rows if r.variant not in (None, "ptq-int8") and r is not pab
              and (r.variant_settings is not None or r.variant in BASELINE_SETTINGS)]
    if others:
        lines += ["", "Settings the other baselines ran with (their defaults under the options given; diffusers' "
                      "caches are configured for a DiT as `dqar.harness.peers` describes):", ""]
        lines += [f"- `{label(r)}`: {_variant_settings(r)}" for r in others]
    return lines


def sec_images(rep: "Report") -> list[str]:
    ref, dq = rep.reference, rep.showcase()
    if ref is None or dq is None:
        raise Missing("needs the 'none' reference and a static point with saved samples")
    a, b = load_samples(rep.results, ref), load_samples(rep.results, dq)
    if a is None or b is None:
        raise Missing("no saved samples for them (sweep with --save-samples > 0, keep the .samples folder)")
    (ia, la), (ib, lb) = a, b
    k = min(len(la), len(lb))
    classes = list(dict.fromkeys(int(c) for c in la[:k]))
    if not classes:
        raise Missing("the saved samples are empty")
    grid = []
    for c in classes:
        idx = [i for i in range(k) if la[i] == c and lb[i] == c][:IMAGES_PER_CLASS]
        grid.append((f"class {c}", ia[idx], ib[idx]))
    image_grid_plot(grid, rep.out / "samples.png", names=("uncached", f"DQAR: {label(dq)}"),
                    title=f"same seeds; FID vs uncached {fmt(dq.quality.fid_vs_baseline)}, FLOP-bound speedup "
                          f"{ideal_cell(dq)}x")
    return [f"Same seeds, uncached vs `{label(dq)}`, every class among the {k} saved images ({classes}; up to "
            f"{IMAGES_PER_CLASS} images each):", "", "![baseline vs DQAR samples](samples.png)"]
