"""The report's quality-against-speed sections: the static FID grid, the Pareto front, the work share of
every contender, the gate vs static.

Each ranks by the FLOP-count bound first; measured speedups enter only where timed at least twice
(`report_common.measured`), with their run range. The work-share section puts DQAR and every baseline
(peers included, which have no FLOP bound) on one axis: the executed share of attention and MLP calls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .plots import fid_heatmap, pareto_plot
from .report_common import (Missing, calls_cell, fmt, ideal_cell, interpolate, is_plain_static, label, measured,
                            measured_cell, pareto_front, pct, table, setting, work_cell)
from .rows import SweepRow

if TYPE_CHECKING:
    from .report import Report


def grid_cells(rep: "Report") -> dict[tuple[float, float], SweepRow]:
    cells = {}
    for r in rep.rows:
        if is_plain_static(r):
            cells.setdefault((r.config["warmup"], r.config["layer_fraction"]), r)
    return cells


def complete_subgrid(vals, warmups, layers) -> tuple[list, list]:
    """The largest rectangle of measured cells: full columns if >= 2 exist, else full rows."""
    cols = [l for l in layers if all(vals.get((w, l)) is not None for w in warmups)]
    if len(cols) >= 2:
        return list(warmups), cols
    rows = [w for w in warmups if all(vals.get((w, l)) is not None for l in layers)]
    return rows, list(layers)


def main_effects(vals, warmups, layers):
    """(range of the row means, range of the column means) over the complete rectangle."""
    ws, ls = complete_subgrid(vals, warmups, layers)
    if len(ws) < 2 or len(ls) < 2:
        return (None, None)
    arr = np.array([[vals[(w, l)] for l in ls] for w in ws], dtype=float)
    return (float(np.ptp(arr.mean(axis=1))), float(np.ptp(arr.mean(axis=0))))


def sec_fid_grid(rep: "Report") -> list[str]:
    cells = grid_cells(rep)
    warmups = sorted({w for w, _ in cells})
    layers = sorted({l for _, l in cells})
    if len(warmups) < 2 or len(layers) < 2:
        raise Missing("needs static-schedule points at >= 2 warmups and >= 2 layer fractions "
                      "(e.g. --grid warmup=0.2,0.3,0.4 layers=0.33,0.66,1.0)")
    lines = []
    no_fid = "not measured (no evaluator for this model)"
    metrics = [("FID vs uncached samples", lambda r: r.quality.fid_vs_baseline, ".2f", no_fid),
               ("FID vs held-out data", lambda r: r.quality.fid_vs_data, ".2f", no_fid),
               ("ideal (FLOP) speedup (x)", lambda r: r.ideal_speedup, ".3f", "not recorded"),
               ("measured speedup (x), median of the timed runs", measured, ".3f",
                "not shown: the cells were timed once (sweep --repeats 3 --warmup-runs 1)")]
    effects = {}
    for title, get, spec, why in metrics:
        vals = {k: get(r) for k, r in cells.items()}
        if all(v is None for v in vals.values()):
            lines += [f"*{title}: {why}.*", ""]
            continue
        lines += [f"**{title}**", ""]
        body = [[f"{w:.0%}"] + [fmt(vals.get((w, l)), spec) for l in layers] for w in warmups]
        lines += table(["warmup \\ layers"] + [f"{l:.0%}" for l in layers], body)
        lines.append("")
        effects[title] = main_effects(vals, warmups, layers)
    if effects:
        ws, ls = complete_subgrid({k: r.ideal_speedup for k, r in cells.items()}, warmups, layers)
        lines.append("Main effects: the range of the row means (warmup) and of the column means (layer "
                     "fraction) over the measured rectangle warmup "
                     f"{{{', '.join(f'{w:g}' for w in ws)}}} x layers {{{', '.join(f'{l:g}' for l in ls)}}}: "
                     "how much each knob moves a metric, averaged over the other.")
        lines.append("")
        body = [[t, fmt(e[0], ".3f"), fmt(e[1], ".3f")] for t, e in effects.items()]
        lines += table(["metric", "warmup effect", "layer-fraction effect"], body)
        lines.append("")
    if rep.has_fid:
        fid_heatmap(warmups, layers, {k: r.quality.fid_vs_baseline for k, r in cells.items()},
                    rep.out / "fid_heatmap.png")
        lines.append("![FID heatmap](fid_heatmap.png)")
        if any(r.quality.fid_vs_data is not None for r in cells.values()):
            fid_heatmap(warmups, layers, {k: r.quality.fid_vs_data for k, r in cells.items()},
                        rep.out / "fid_data_heatmap.png", title="FID vs held-out data")
            lines.append("![FID vs data heatmap](fid_data_heatmap.png)")
    return lines


def quality_points(rep: "Report") -> tuple[list[dict], str]:
    """Every non-reference row with a quality number: FID vs the uncached samples, else 1 - SSIM."""
    pts = []
    for r in rep.rows:
        q = r.quality.fid_vs_baseline if rep.has_fid else (None if r.quality.ssim is None else 1.0 - r.quality.ssim)
        if q is None or r.is_reference:
            continue
        group = ("baseline" if r.kind == "baseline" else
                 "static grid" if is_plain_static(r) else r.schedule + " / other")
        rng = r.measured_range() if measured(r) is not None else None
        pts.append({"name": label(r), "quality": q, "group": group, "row": r, "ideal": r.ideal_speedup,
                    "measured": measured(r), "low": rng[0] if rng else None, "high": rng[1] if rng else None})
    return pts, ("FID vs uncached samples" if rep.has_fid else "1 - SSIM vs uncached samples")


def sec_pareto(rep: "Report") -> list[str]:
    pts, qname = quality_points(rep)
    by_ideal = [dict(p, speedup=p["ideal"]) for p in pts if p["ideal"] is not None]
    by_measured = [dict(p, speedup=p["measured"]) for p in pts if p["measured"] is not None]
    if len(by_ideal) < 2 and len(by_measured) < 2:
        raise Missing("needs >= 2 measured points with a FLOP-bound speedup and a quality number")
    lines = []
    ideal_front = pareto_front(by_ideal) if len(by_ideal) >= 2 else []
    if ideal_front:
        lines += [f"Non-dominated points by FLOP-bound (ideal) speedup and {qname} (lower is better), slowest "
                  "first; points without a FLOP bound (PTQ, PAB, diffusers' caches) left out (the work-share section "
                  "places every contender):", ""]
        body = [[p["name"], p["row"].schedule, setting(p["row"], "warmup"), setting(p["row"], "layer_fraction"),
                 ideal_cell(p["row"]), measured_cell(p["row"]), fmt(p["quality"], ".3f"),
                 fmt(p["row"].quality.fid_vs_data)] for p in ideal_front]
        lines += table(["config", "schedule", "warmup", "layers", "ideal", "measured", qname, "FID vs data"], body)
    measured_front = pareto_front(by_measured) if len(by_measured) >= 2 else []
    if measured_front:
        lines += ["", "The same by measured speedup (median; min–max of the timed runs), points timed at least "
                      "twice only:", ""]
        body = [[p["name"], measured_cell(p["row"]), ideal_cell(p["row"]), fmt(p["quality"], ".3f")]
                for p in measured_front]
        lines += table(["config", "measured", "ideal", qname], body)
    elif rep.timed_once:
        lines += ["", f"No front by measured speedup: {len(rep.timed_once)} point(s) were timed once, and a "
                      "single run is noise, not a speedup (sweep with --repeats 3 --warmup-runs 1)."]
    keys = ("name", "quality", "group", "ideal", "measured", "low", "high")
    pareto_plot([{k: p[k] for k in keys} for p in pts], rep.out / "pareto.png",
                ideal_front=[p["name"] for p in ideal_front], measured_front=[p["name"] for p in measured_front],
                ylabel=qname + " (lower is better)")
    return lines + ["", "![Pareto front](pareto.png)"]


def _kind(row: SweepRow) -> str:
    return row.variant if row.variant is not None else f"DQAR {row.schedule}"


def sec_work(rep: "Report") -> list[str]:
    rows = [r for r in rep.rows if not r.is_reference and r.work_share() is not None]
    if not rows:
        raise Missing("needs rows with counted calls (sweeps from before call counting have none: re-run them)")
    lines = ["Every point with its counted calls: the share of attention / MLP / block calls it executed (1.00 = "
             "the uncached model) and its *work* share, the mean of the attention and MLP shares. Unlike the FLOP "
             "bound this is measured the same way for DQAR and every baseline, so the baselines without a bound "
             "(PTQ, PAB, diffusers' caches) sit on the same axis; lower is less work.", ""]
    body = [[label(r), _kind(r), calls_cell(r), work_cell(r), ideal_cell(r), measured_cell(r),
             fmt(r.quality.psnr, ".2f"), fmt(r.quality.fid_vs_baseline, ".3f")]
            for r in sorted(rows, key=lambda r: r.work_share())]
    lines += table(["point", "method", "work a/m/b", "work", "ideal", "measured", "PSNR dB", "FID vs base"], body)
    metrics = [("PSNR vs uncached samples (dB, higher is better)", "psnr", lambda r: r.quality.psnr, -1.0)]
    if rep.has_fid:
        metrics.append(("FID vs uncached samples (lower is better)", "fid",
                        lambda r: r.quality.fid_vs_baseline, 1.0))
    for title, tag, get, sign in metrics:
        pts = [{"name": label(r), "group": _kind(r) if r.variant else "DQAR", "quality": get(r),
                "work": r.work_share(), "ideal": r.ideal_speedup, "measured": None, "low": None, "high": None}
               for r in rows if get(r) is not None]
        if not pts:
            lines += ["", f"*{title}: no point has it (identical images have no finite PSNR).*"]
            continue
        # Less work and a better quality dominate: the front of (-work, sign * quality).
        front = pareto_front([dict(p, speedup=-p["work"], quality=sign * p["quality"]) for p in pts])
        names = [p["name"] for p in reversed(front)]       # the front is sorted by -work
        png = f"pareto_work_{tag}.png"
        pareto_plot(pts, rep.out / png, x="work", work_front=names, ylabel=title)
        lines += ["", f"Non-dominated by work share and {title}, least work first: {', '.join(names)}.", "",
                  f"![{title} against work share]({png})"]
    return lines


def sec_gate(rep: "Report") -> list[str]:
    gates = [r for r in rep.rows if r.schedule == "gate"]
    if not gates:
        raise Missing("needs a gate-schedule point (e.g. --grid schedule=gate)")
    statics = [r for r in grid_cells(rep).values()
               if r.quality.fid_vs_baseline is not None and r.ideal_speedup is not None]
    if not statics or not rep.has_fid:
        raise Missing("needs FID-scored static grid points to compare the gate with")
    front = [(p["speedup"], p["quality"]) for p in pareto_front(
        [{"speedup": r.ideal_speedup, "quality": r.quality.fid_vs_baseline} for r in statics])]
    mfront = [(p["speedup"], p["quality"]) for p in pareto_front(
        [{"speedup": measured(r), "quality": r.quality.fid_vs_baseline} for r in statics if measured(r) is not None])]
    body = []
    for g in gates:
        at_ideal = interpolate(front, g.ideal_speedup or 0.0)
        at_measured = interpolate(mfront, measured(g)) if measured(g) is not None else None
        snr = g.config.get("snr_range") or []
        body.append([label(g), fmt(g.config.get("tau0"), ".1f"), f"[{', '.join(fmt(v, 'g') for v in snr)}]",
                     setting(g, "warmup"), pct(g.dqar.reuse_fraction), ideal_cell(g), measured_cell(g),
                     fmt(g.quality.fid_vs_baseline), fmt(at_ideal), fmt(at_measured)])
    lines = ["Each gate point against the static grid's Pareto front interpolated at the same speed "
             "('–': the gate's speed is outside the static points' range, or was not measured repeatedly).", ""]
    lines += table(["gate point", "tau0", "SNR window", "warmup", "reuse", "ideal", "measured", "FID gate",
                    "static FID @ same ideal", "static FID @ same measured"], body)
    return lines
