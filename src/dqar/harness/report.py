"""`dqar report`: the seeds' tables and figures, rebuilt from the rows of a `dqar sweep` results file.

Every section is computed from measured rows only. A section whose rows are not in the file (no K/V
point, no evaluator so no FID, ...) is replaced by a one-line note saying what is missing and which
sweep option would add it. Figures are PNGs beside report.md.

Images for the baseline-vs-DQAR grid come from the samples the sweep saved per point (its sidecar
folder, `--save-samples`), not from re-running the model: the report stays model-free and fast, and
shows exactly the images that were scored.

Which rows a section uses:
- FID grid: schedule static, mode output, shallow order, 16-bit cache, attention only, unmodified model;
  one cell per (warmup, layer fraction).
- Pairs (shallow/deep, output/kv, 16/8-bit cache): rows whose configs differ in that one field only.
- Gate vs static: each gate row against the static grid's Pareto front interpolated at the gate's
  FLOP speedup (`ideal_speedup`: noise-free, unlike wall-clock time on a shared machine).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from dqar.method.schedules import live_fields

from .sweep import load_samples, read_rows


class Missing(Exception):
    """A section cannot be built from these rows; the message says why."""


def fmt(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def pct(v, spec: str = ".0f") -> str:
    return fmt(None if v is None else 100.0 * v, spec) + ("%" if v is not None else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# ------------------------------------------------------------------------------------------------
# row helpers
# ------------------------------------------------------------------------------------------------

def cfg(row: dict) -> dict:
    return row.get("config") or {}


def fid_b(row: dict):
    return (row.get("quality") or {}).get("fid_vs_baseline")


def fid_d(row: dict):
    return (row.get("quality") or {}).get("fid_vs_data")


def is_reference(row: dict) -> bool:
    return row.get("variant") is None and cfg(row).get("schedule") == "none"


def is_plain_static(row: dict) -> bool:
    """A cell of seed 000's grid: the static schedule with nothing else changed."""
    c = cfg(row)
    return (row.get("variant") is None and c.get("schedule") == "static" and c.get("mode") == "output"
            and c.get("order") == "shallow" and c.get("cache_bits") == 16 and list(c.get("targets", [])) == ["attn"])


def same_except(a: dict, b: dict, field: str) -> bool:
    """Same variant, and configs equal on every field except `field` that could change either's images."""
    if a.get("variant") != b.get("variant"):
        return False
    ca, cb = cfg(a), cfg(b)
    # A field counts if it is live in either config: kv_bits is inert for an output-mode point but live
    # for its K/V twin, so it must match.
    keys = (live_fields(ca) | live_fields(cb)) - {field}
    return all(ca.get(k) == cb.get(k) for k in keys)


def pairs(rows: list[dict], field: str, a, b_values) -> list[tuple[dict, dict]]:
    """(row with field=a, row with field in b_values) whose configs agree on everything else."""
    out = []
    for rb in rows:
        if cfg(rb).get(field) in b_values and cfg(rb).get(field) != a:
            match = next((ra for ra in rows if cfg(ra).get(field) == a and same_except(ra, rb, field)), None)
            if match is not None:
                out.append((match, rb))
    return out


def label(row: dict) -> str:
    return row.get("name") or row.get("key", "?")


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated in (higher speedup, lower quality value), sorted by speedup."""
    front = []
    for p in points:
        dominated = any(q is not p and q["speedup"] >= p["speedup"] and q["quality"] <= p["quality"]
                        and (q["speedup"] > p["speedup"] or q["quality"] < p["quality"]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["speedup"])


def interpolate(front: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x over sorted (x, y) points; None outside their range."""
    if not front:
        return None
    xs = [p[0] for p in front]
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[1] for p in front]))


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------

class Report:
    def __init__(self, results: str | Path, out_dir: str | Path):
        self.results = Path(results)
        self.out = Path(out_dir)
        all_rows = read_rows(self.results)
        if not all_rows:
            raise ValueError(f"{self.results} has no sweep rows")
        # One settings group per report: numbers from different n/steps/models are not comparable.
        counts = Counter(json.dumps(r.get("settings"), sort_keys=True) for r in all_rows)
        chosen, _ = counts.most_common(1)[0]
        seen, self.rows = set(), []
        for r in all_rows:
            if json.dumps(r.get("settings"), sort_keys=True) == chosen and r["key"] not in seen:
                seen.add(r["key"])
                self.rows.append(r)
        self.settings = json.loads(chosen) or {}
        self.other_groups = len(counts) - 1
        self.reference = next((r for r in self.rows if is_reference(r)), None)
        self.has_fid = any(fid_b(r) is not None for r in self.rows)
        self.figures: list[str] = []

    def named(self, name: str) -> dict | None:
        return next((r for r in self.rows if r.get("name") == name), None)

    # -------------------------------------------------------------- sections
    def sec_overview(self) -> list[str]:
        s = self.settings
        lines = [f"Model `{s.get('model')}`, {s.get('n')} images per point (classes {s.get('classes')} cycled), "
                 f"{s.get('steps')} {s.get('sampler')} steps, CFG scale {s.get('cfg_scale')}, seeds "
                 f"{s.get('seed')}…{(s.get('seed') or 0) + (s.get('n') or 1) - 1}; {len(self.rows)} points."]
        if self.other_groups:
            lines.append(f"({self.other_groups} other settings group(s) in the file are not shown.)")
        ref = self.reference or self.rows[0]
        lines.append(f"Uncached reference: {fmt(ref['baseline']['seconds'], '.2f')} s per generation "
                     f"({fmt(ref['baseline']['ms_per_step'], '.1f')} ms/step), peak memory "
                     f"{fmt(ref['baseline']['peak_mem_mb'], '.1f')} MiB.")
        lines.append("Speedup = reference seconds / point seconds (wall clock, one shared reference run); "
                     "ideal = FLOP-count bound from the controller (no timing noise). FID uses the embedded "
                     "evaluator's features: *vs baseline* compares with the uncached samples of the same seeds, "
                     "*vs data* with held-out real digits.")
        walls = [r.get("wall_s") for r in self.rows if r.get("wall_s") is not None]
        if walls:
            lines.append(f"Sweep time spent on these points: {sum(walls) / 60:.1f} min (the reference run not included).")
        # A wall-clock speedup above the FLOP bound can only be timing noise (load from other processes).
        noisy = [r for r in self.rows if r.get("speedup") and r.get("ideal_speedup")
                 and r["speedup"] > 1.02 * r["ideal_speedup"]]
        slower = [r for r in self.rows if r.get("speedup") and r["speedup"] < 0.98 and not is_reference(r)]
        if noisy or slower:
            lines.append(f"Timing caveat: {len(noisy)} point(s) ran faster than their FLOP bound allows and "
                         f"{len(slower)} ran > 2% slower than the uncached reference; each point is timed "
                         "separately from the one reference run, so machine load between runs moves these "
                         "ratios. Re-time a chosen configuration with `dqar bench` (interleaved runs).")
        lines.append("")
        header = ["point", "schedule", "mode", "warmup", "layers", "order", "bits", "targets", "reuse",
                  "ms/step", "speedup", "ideal", "FID vs base", "FID vs data", "PSNR", "SSIM", "acc"]
        body = []
        for r in self.rows:
            c, d, q = cfg(r), r["dqar"], r.get("quality") or {}
            body.append([label(r) + (f" ({r['variant']})" if r.get("variant") else ""), c.get("schedule", "?"),
                         c.get("mode", "?"), fmt(c.get("warmup")), fmt(c.get("layer_fraction")), c.get("order", "?"),
                         str(c.get("cache_bits")), "+".join(c.get("targets", [])), pct(d.get("reuse_fraction")),
                         fmt(d.get("ms_per_step"), ".1f"), fmt(r.get("speedup"), ".3f"),
                         fmt(r.get("ideal_speedup"), ".3f"), fmt(q.get("fid_vs_baseline")),
                         fmt(q.get("fid_vs_data")), fmt(q.get("psnr"), ".1f"), fmt(q.get("ssim"), ".3f"),
                         pct(q.get("accuracy"))])
        return lines + table(header, body)

    def grid_cells(self) -> dict[tuple[float, float], dict]:
        cells = {}
        for r in self.rows:
            if is_plain_static(r):
                c = cfg(r)
                cells.setdefault((c["warmup"], c["layer_fraction"]), r)
        return cells

    def sec_fid_grid(self) -> list[str]:
        cells = self.grid_cells()
        warmups = sorted({w for w, _ in cells})
        layers = sorted({l for _, l in cells})
        if len(warmups) < 2 or len(layers) < 2:
            raise Missing("needs static-schedule points at >= 2 warmups and >= 2 layer fractions "
                          "(e.g. --grid warmup=0.2,0.3,0.4 layers=0.33,0.66,1.0)")
        lines = []
        metrics = [("FID vs uncached samples", fid_b), ("FID vs held-out data", fid_d),
                   ("measured speedup (x)", lambda r: r.get("speedup")),
                   ("ideal (FLOP) speedup (x)", lambda r: r.get("ideal_speedup"))]
        effects = {}
        for title, get in metrics:
            vals = {k: get(r) for k, r in cells.items()}
            if all(v is None for v in vals.values()):
                lines.append(f"*{title}: not measured (no evaluator for this model).*")
                lines.append("")
                continue
            lines.append(f"**{title}**")
            lines.append("")
            body = [[f"{w:.0%}"] + [fmt(vals.get((w, l)), ".3f" if "speedup" in title else ".2f") for l in layers]
                    for w in warmups]
            lines += table(["warmup \\ layers"] + [f"{l:.0%}" for l in layers], body)
            lines.append("")
            effects[title] = self._main_effects(vals, warmups, layers)
        if effects:
            ws, ls = self.complete_subgrid({k: r.get("speedup") for k, r in cells.items()}, warmups, layers)
            lines.append("Main effects: the range of the row means (warmup) and of the column means (layer "
                         "fraction) over the measured rectangle warmup "
                         f"{{{', '.join(f'{w:g}' for w in ws)}}} x layers {{{', '.join(f'{l:g}' for l in ls)}}}: "
                         "how much each knob moves a metric, averaged over the other.")
            lines.append("")
            body = [[t, fmt(e[0], ".3f"), fmt(e[1], ".3f")] for t, e in effects.items()]
            lines += table(["metric", "warmup effect", "layer-fraction effect"], body)
            lines.append("")
        if self.has_fid:
            from .plots import fid_heatmap

            fid_heatmap(warmups, layers, {k: fid_b(r) for k, r in cells.items()}, self.out / "fid_heatmap.png")
            lines.append("![FID heatmap](fid_heatmap.png)")
            if any(fid_d(r) is not None for r in cells.values()):
                fid_heatmap(warmups, layers, {k: fid_d(r) for k, r in cells.items()},
                            self.out / "fid_data_heatmap.png", title="FID vs held-out data")
                lines.append("![FID vs data heatmap](fid_data_heatmap.png)")
        return lines

    @staticmethod
    def complete_subgrid(vals, warmups, layers) -> tuple[list, list]:
        """The largest rectangle of measured cells: full columns if >= 2 exist, else full rows."""
        cols = [l for l in layers if all(vals.get((w, l)) is not None for w in warmups)]
        if len(cols) >= 2:
            return list(warmups), cols
        rows = [w for w in warmups if all(vals.get((w, l)) is not None for l in layers)]
        return rows, list(layers)

    @classmethod
    def _main_effects(cls, vals, warmups, layers):
        ws, ls = cls.complete_subgrid(vals, warmups, layers)
        if len(ws) < 2 or len(ls) < 2:
            return (None, None)
        arr = np.array([[vals[(w, l)] for l in ls] for w in ws], dtype=float)
        return (float(np.ptp(arr.mean(axis=1))), float(np.ptp(arr.mean(axis=0))))

    def quality_points(self) -> tuple[list[dict], str]:
        use_fid = self.has_fid
        pts = []
        for r in self.rows:
            if r.get("speedup") is None:
                continue
            q = fid_b(r) if use_fid else (None if (r.get("quality") or {}).get("ssim") is None
                                          else 1.0 - r["quality"]["ssim"])
            if q is None:
                continue
            group = ("baseline" if r.get("kind") == "baseline" else
                     "static grid" if is_plain_static(r) else cfg(r).get("schedule", "?") + " / other")
            pts.append({"name": label(r), "speedup": r["speedup"], "quality": q, "group": group, "row": r})
        return pts, ("FID vs uncached samples" if use_fid else "1 - SSIM vs uncached samples")

    def sec_pareto(self) -> list[str]:
        pts, qname = self.quality_points()
        cand = [p for p in pts if not is_reference(p["row"])]
        if len(cand) < 2:
            raise Missing("needs >= 2 measured points with a speedup and a quality number")
        front = pareto_front(cand)
        lines = [f"Non-dominated points (higher measured speedup, lower {qname}), slowest first:", ""]
        body = []
        for p in front:
            c = cfg(p["row"])
            body.append([p["name"], c.get("schedule", "?"), fmt(c.get("warmup")), fmt(c.get("layer_fraction")),
                         fmt(p["speedup"], ".3f"), fmt(p["row"].get("ideal_speedup"), ".3f"), fmt(p["quality"], ".3f"),
                         fmt(fid_d(p["row"]))])
        lines += table(["config", "schedule", "warmup", "layers", "speedup", "ideal", qname, "FID vs data"], body)
        ideal = [dict(p, speedup=p["row"]["ideal_speedup"]) for p in cand if p["row"].get("ideal_speedup")]
        if len(ideal) >= 2:
            # The FLOP bound has no timing noise: on a loaded machine it ranks configurations more reliably.
            lines += ["", "The same by FLOP-bound (ideal) speedup, points without one (PTQ) left out:", ""]
            body = [[p["name"], fmt(p["speedup"], ".3f"), fmt(p["row"].get("speedup"), ".3f"), fmt(p["quality"], ".3f")]
                    for p in pareto_front(ideal)]
            lines += table(["config", "ideal", "measured", qname], body)
        from .plots import pareto_plot

        pareto_plot([{k: p[k] for k in ("name", "speedup", "quality", "group")} for p in pts],
                    [p["name"] for p in front], self.out / "pareto.png", ylabel=qname + " (lower is better)")
        return lines + ["", "![Pareto front](pareto.png)"]

    def _pair_section(self, field: str, a, b_values, names: tuple[str, str], hint: str) -> tuple[list[str], list]:
        ps = pairs(self.rows, field, a, b_values)
        if not ps:
            raise Missing(f"needs two points that differ only in {field} ({hint})")
        body, deltas = [], []
        for ra, rb in ps:
            da = None if fid_b(ra) is None or fid_b(rb) is None else fid_b(rb) - fid_b(ra)
            deltas.append((ra, rb, da))
            c = cfg(ra)
            body.append([f"{c.get('schedule')} w={fmt(c.get('warmup'))} l={fmt(c.get('layer_fraction'))}"
                         + (f" → {cfg(rb).get(field)}" if len(b_values) > 1 else ""),
                         fmt(fid_b(ra)), fmt(fid_b(rb)), fmt(da), fmt(fid_d(ra)), fmt(fid_d(rb)),
                         fmt((ra.get("quality") or {}).get("ssim"), ".3f"), fmt((rb.get("quality") or {}).get("ssim"), ".3f"),
                         fmt(ra.get("speedup"), ".3f"), fmt(rb.get("speedup"), ".3f"),
                         fmt(ra["dqar"].get("cache_mb"), ".2f"), fmt(rb["dqar"].get("cache_mb"), ".2f")])
        x, y = names
        header = ["config", f"FID {x}", f"FID {y}", "Δ FID", f"FID-data {x}", f"FID-data {y}", f"SSIM {x}",
                  f"SSIM {y}", f"speedup {x}", f"speedup {y}", f"cache MiB {x}", f"cache MiB {y}"]
        return table(header, body), deltas

    def sec_order(self) -> list[str]:
        lines, deltas = self._pair_section("order", "shallow", ("deep",), ("shallow", "deep"),
                                           "e.g. --grid order=shallow,deep layers=0.33,1.0")
        d = [abs(x[2]) for x in deltas if x[2] is not None]
        if d:
            ref = [fid_b(x[0]) for x in deltas if fid_b(x[0]) is not None]
            lines += ["", f"Largest |Δ FID| deep vs shallow: {max(d):.3f} over {len(d)} pair(s) "
                          f"(shallow FIDs span {min(ref):.2f}–{max(ref):.2f})."]
        return lines

    def sec_kv(self) -> list[str]:
        lines, deltas = self._pair_section("mode", "output", ("kv",), ("output", "K/V"),
                                           "e.g. --baselines static,kv")
        return ["Same schedule, caching the attention output (before the adaLN gate) vs caching K/V and "
                "recomputing Q and attention:", ""] + lines

    def sec_int8(self) -> list[str]:
        lines, deltas = self._pair_section("cache_bits", 16, (8, 4), ("16-bit", "quantized"),
                                           "e.g. --grid cache-bits=16,8")
        d = [x[2] for x in deltas if x[2] is not None]
        extra = [f"Δ FID from quantizing the cache: {', '.join(f'{v:+.3f}' for v in d)}."] if d else []
        return lines + ([""] + extra if extra else [])

    def sec_gate(self) -> list[str]:
        gates = [r for r in self.rows if cfg(r).get("schedule") == "gate"]
        if not gates:
            raise Missing("needs a gate-schedule point (e.g. --grid schedule=gate)")
        cells = self.grid_cells()
        statics = [r for r in cells.values() if fid_b(r) is not None and r.get("ideal_speedup") is not None]
        if not statics or not self.has_fid:
            raise Missing("needs FID-scored static grid points to compare the gate with")
        pts = pareto_front([{"speedup": r["ideal_speedup"], "quality": fid_b(r), "row": r} for r in statics])
        front = [(p["speedup"], p["quality"]) for p in pts]
        mfront = pareto_front([{"speedup": r["speedup"], "quality": fid_b(r), "row": r} for r in statics])
        mfront = [(p["speedup"], p["quality"]) for p in mfront]
        body = []
        for g in gates:
            c = cfg(g)
            at_ideal = interpolate(front, g.get("ideal_speedup") or 0.0)
            at_measured = interpolate(mfront, g.get("speedup") or 0.0)
            body.append([label(g), fmt(c.get("tau0"), ".1f"), f"[{', '.join(fmt(v, 'g') for v in c.get('snr_range', []))}]",
                         fmt(c.get("warmup")), pct(g["dqar"].get("reuse_fraction")),
                         fmt(g.get("speedup"), ".3f"), fmt(g.get("ideal_speedup"), ".3f"), fmt(fid_b(g)),
                         fmt(at_ideal), fmt(at_measured)])
        lines = ["Each gate point against the static grid's Pareto front interpolated at the same speed "
                 "('–': the gate's speed is outside the static points' range, no equal-speed static point).", ""]
        lines += table(["gate point", "tau0", "SNR window", "warmup", "reuse", "speedup", "ideal", "FID gate",
                        "static FID @ same ideal", "static FID @ same measured"], body)
        return lines

    def sec_memory(self) -> list[str]:
        ref = self.reference
        dq = self.named("static") or next((r for r in self.rows if is_plain_static(r)), None)
        if ref is None or dq is None:
            raise Missing("needs the 'none' reference and a static point (--baselines none,static)")
        b, d = ref["baseline"], dq["dqar"]
        peak_b, peak_d = b.get("peak_mem_mb"), d.get("peak_mem_mb")
        lines = [f"Reference vs `{label(dq)}` (warmup {fmt(cfg(dq).get('warmup'))}, layers "
                 f"{fmt(cfg(dq).get('layer_fraction'))}). Peak memory is per generation: on CPU the growth of "
                 "the resident set during the call (weights loaded before it are not counted), on CUDA the "
                 "max allocated bytes; cache = the controller's peak cache size.", ""]
        delta = lambda x, y: None if x is None or y is None else y - x
        body = [["Peak memory (MiB)", fmt(peak_b, ".1f"), fmt(peak_d, ".1f"), fmt(delta(peak_b, peak_d), "+.1f")],
                ["Cache memory (MiB)", "–", fmt(d.get("cache_mb"), ".2f"), fmt(d.get("cache_mb"), "+.2f")],
                ["Generation time (s)", fmt(b.get("seconds"), ".2f"), fmt(d.get("seconds"), ".2f"),
                 fmt(delta(b.get("seconds"), d.get("seconds")), "+.2f")],
                ["Speedup", "1.00x", fmt(dq.get("speedup"), ".3f") + "x", ""]]
        lines += table(["metric", "baseline", "DQAR", "delta"], body)
        lines += ["", "Every point:", ""]
        body = []
        for r in self.rows:
            cache = r["dqar"].get("cache_mb")
            share = None if cache is None or not peak_b else cache / peak_b
            body.append([label(r), fmt(r["dqar"].get("peak_mem_mb"), ".1f"), fmt(cache, ".2f"), pct(share, ".1f"),
                         fmt(r["dqar"].get("seconds"), ".2f"), fmt(r.get("speedup"), ".3f")])
        lines += table(["point", "peak MiB", "cache MiB", "cache / ref. peak", "seconds", "speedup"], body)
        return lines

    def sec_entropy(self) -> list[str]:
        ref = self.reference
        prof = (ref or {}).get("profile") or {}
        ent = prof.get("entropy_per_step")
        if not ent or all(v is None for v in ent):
            raise Missing("needs the 'none' reference row with its entropy profile (--baselines none)")
        snr, x0 = prof.get("snr_per_step") or [], prof.get("x0_snr_per_step") or []
        event_rows = {label(r): (r.get("profile") or {}).get("events_per_step") for r in self.rows
                      if cfg(r).get("schedule") in ("gate", "static") and (r.get("profile") or {}).get("events_per_step")}
        shown = [n for n in ("static",) if n in event_rows]
        shown += [n for n in event_rows if n not in shown and cfg(self.named(n) or {}).get("schedule") == "gate"]
        shown = shown[:3]
        T = len(ent)
        idx = sorted(set(list(range(0, T, 5)) + [T - 1]))
        lines = [f"Attention entropy (nats, mean over layers and {prof.get('profile_n')} images' sampled query "
                 "rows) and SNR of the uncached model; reuse events per step (all layers and CFG branches) of "
                 "the static and gate points.", ""]
        body = [[str(i), fmt(ent[i], ".3f"), fmt(snr[i] if i < len(snr) else None, ".3g"),
                 fmt(x0[i] if i < len(x0) else None, ".3g")]
                + [str(event_rows[n][i]) if i < len(event_rows[n]) else "–" for n in shown] for i in idx]
        lines += table(["step", "entropy", "SNR α²/σ²", "SNR x̂₀"] + [f"events {n}" for n in shown], body)
        lines += ["", self._monotone("entropy", ent, falling=True), self._monotone("SNR α²/σ²", snr, falling=False),
                  self._monotone("SNR x̂₀", x0, falling=False)]
        from .plots import entropy_snr_plot

        entropy_snr_plot(ent, snr, self.out / "entropy_snr.png", x0_snr=x0 or None,
                         events={n: event_rows[n] for n in shown} or None)
        return lines + ["", "![entropy and SNR per step](entropy_snr.png)"]

    @staticmethod
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

    def sec_baselines(self) -> list[str]:
        order = ["none", "static", "ptq-int8", "interval-attn-mlp", "kv", "pab"]
        rows = [self.named(n) for n in order if self.named(n) is not None]
        rows += [r for r in self.rows if cfg(r).get("schedule") == "gate"]
        if len(rows) < 2:
            raise Missing("needs the named baselines (--baselines none,static,ptq-int8,interval-attn-mlp,kv)")
        body = [[label(r), fmt(r["dqar"].get("ms_per_step"), ".1f"), fmt(r.get("speedup"), ".3f"),
                 fmt(r["dqar"].get("peak_mem_mb"), ".1f"), str(r["dqar"].get("reuse_events")),
                 fmt(fid_b(r)), fmt(fid_d(r)), pct((r.get("quality") or {}).get("accuracy"))] for r in rows]
        return (["Seed 002's comparison (its rows: baseline, static reuse, PTQ4DiT-style quantization, DQAR), "
                 "plus FORA-style interval reuse, K/V caching and, where measured, diffusers' pyramid attention "
                 "broadcast (pab; its reuse events count attention calls, each covering both CFG halves):", ""]
                + table(["method", "ms/step", "speedup", "peak MiB", "reuse events", "FID vs base", "FID vs data",
                         "accuracy"], body))

    def sec_images(self) -> list[str]:
        ref = self.reference
        dq = self.named("static") or next((r for r in self.rows if is_plain_static(r)), None)
        if ref is None or dq is None:
            raise Missing("needs the 'none' reference and a static point with saved samples")
        a, b = load_samples(self.results, ref), load_samples(self.results, dq)
        if a is None or b is None:
            raise Missing("no saved samples for them (sweep with --save-samples > 0, keep the .samples folder)")
        (ia, la), (ib, lb) = a, b
        k = min(len(la), len(lb))
        classes = list(dict.fromkeys(int(c) for c in la[:k]))[:2]
        if not classes:
            raise Missing("the saved samples are empty")
        grid = []
        for c in classes:
            idx = [i for i in range(k) if la[i] == c and lb[i] == c][:6]
            grid.append((f"baseline\nclass {c}", ia[idx]))
            grid.append((f"DQAR\nclass {c}", ib[idx]))
        from .plots import image_grid

        image_grid(grid, self.out / "samples.png",
                   title=f"uncached vs {label(dq)} (same seeds); FID vs base {fmt(fid_b(dq))}, speedup "
                         f"{fmt(dq.get('speedup'), '.3f')}x")
        return [f"Same seeds, uncached vs `{label(dq)}`, classes {classes} (first images of each class):", "",
                "![baseline vs DQAR samples](samples.png)"]

    # -------------------------------------------------------------- assembly
    def build(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        sections: list[tuple[str, Callable[[], list[str]]]] = [
            ("Overview", self.sec_overview),
            ("FID grid: warmup x layer fraction (seed 000, slide 7)", self.sec_fid_grid),
            ("Pareto configurations (seed 000, backup 1)", self.sec_pareto),
            ("Shallow-first vs deep-first order (seed 000, slide 8)", self.sec_order),
            ("Memory profile (seed 000, backup 4)", self.sec_memory),
            ("Entropy and SNR per step (seed 002, slide 14)", self.sec_entropy),
            ("K/V caching vs output caching (seed 000, slide 4)", self.sec_kv),
            ("INT8 cache (seed 002, slides 6 and 13)", self.sec_int8),
            ("Entropy+SNR gate vs static schedule at equal speed (seed 002)", self.sec_gate),
            ("Baselines (seed 002, slide 12)", self.sec_baselines),
            ("Samples: baseline vs DQAR (seed 000, slide 9)", self.sec_images),
        ]
        md = [f"# DQAR report: {self.results.name}", ""]
        for title, fn in sections:
            md.append(f"## {title}")
            md.append("")
            try:
                md += fn()
            except Missing as why:
                md.append(f"*Section omitted: {why}.*")
            md.append("")
        path = self.out / "report.md"
        path.write_text("\n".join(md))
        return path


def build_report(results: str | Path, out_dir: str | Path) -> Path:
    """Write out_dir/report.md and its PNGs from a sweep results file; returns report.md's path."""
    return Report(results, out_dir).build()
