"""`dqar report`: the seeds' tables and figures, rebuilt from the rows of a `dqar sweep` results file.

Every section is computed from measured rows only (`dqar.harness.rows.SweepRow`). A section whose rows are
not in the file (no K/V point, no evaluator so no FID, ...) is replaced by a one-line note saying what is
missing and which sweep option would add it. Figures are PNGs beside report.md.

Speed is led by the FLOP-count bound (`ideal_speedup`, no timing noise). A measured speedup appears only
with the range of its timed runs (sweep --repeats >= 2), never from a single run, and one above its own
bound is flagged ("!" in tables, red on pareto.png): see `report_common`.

Images for the baseline-vs-DQAR grid come from the samples the sweep saved per point (its sidecar
folder, `--save-samples`), not from re-running the model: the report stays model-free and fast, and
shows exactly the images that were scored.

The sections live beside this module: `report_speed` (FID grid, Pareto front, gate vs static: quality
against speed) and `report_details` (one-field pairs, memory, entropy, baselines, samples). Which rows
a section uses:
- FID grid: schedule static, mode output, shallow order, 16-bit cache, attention only, unmodified model;
  one cell per (warmup, layer fraction).
- Pairs (shallow/deep, output/kv, 16/8-bit cache): rows whose configs differ in that one field only.
- Work share: every row with counted calls (DQAR points and every baseline, peers included): quality (PSNR,
  FID) against the executed share of attention and MLP calls.
- Gate vs static: each gate row against the static grid's Pareto front interpolated at the gate's
  FLOP speedup (and, where both were timed repeatedly, at its measured speedup).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from . import report_details, report_speed
from .report_common import (DASH, Missing, above_bound, calls_cell, fmt, ideal_cell, is_plain_static, label,
                            measured, measured_cell, pct, setting, table)
from .results_file import read_rows
from .rows import SweepRow


class Report:
    """The rows of one settings group of a results file, and the sections built from them."""

    def __init__(self, results: str | Path, out_dir: str | Path):
        self.results = Path(results)
        self.out = Path(out_dir)
        all_rows = read_rows(self.results)
        if not all_rows:
            raise ValueError(f"{self.results} has no sweep rows")
        # One settings group per report: numbers from different n/steps/models are not comparable.
        counts = Counter(json.dumps(r.settings, sort_keys=True) for r in all_rows)
        chosen, _ = counts.most_common(1)[0]
        seen, self.rows = set(), []
        for r in all_rows:
            if json.dumps(r.settings, sort_keys=True) == chosen and r.key not in seen:
                seen.add(r.key)
                self.rows.append(r)
        self.settings = json.loads(chosen)
        self.other_groups = len(counts) - 1
        self.reference = next((r for r in self.rows if r.is_reference), None)
        self.has_fid = any(r.quality.fid_vs_baseline is not None for r in self.rows)
        self.timed_once = [r for r in self.rows if not r.is_reference and measured(r) is None]

    def named(self, name: str) -> SweepRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def showcase(self) -> SweepRow | None:
        """The DQAR point the memory and samples sections show: the 'static' baseline, else a grid cell."""
        return self.named("static") or next((r for r in self.rows if is_plain_static(r)), None)

    def speed_note(self) -> str:
        """How speed is shown, and why some measured speedups are not."""
        note = ("Speed: *ideal* is the FLOP-count bound from the controller (no timing noise) and is what the "
                "tables rank by; *measured* is reference seconds / point seconds, the median with the min–max "
                "over every pairing of timed runs, shown only where both were timed at least twice.")
        if self.timed_once:
            note += (f" {len(self.timed_once)} point(s) were timed once (a single run is noise, not a speedup): "
                     f"their measured speedup shows as {DASH}; sweep with --repeats 3 --warmup-runs 1, or time "
                     "one configuration with `dqar bench` (interleaved runs).")
        return note

    # -------------------------------------------------------------- sections
    def sec_overview(self) -> list[str]:
        s = self.settings
        seed, n = s.get("seed") or 0, s.get("n") or 1
        lines = [f"Model `{s.get('model')}`, {s.get('n')} images per point (classes {s.get('classes')} cycled), "
                 f"{s.get('steps')} {s.get('sampler')} steps, CFG scale {s.get('cfg_scale')}, seeds "
                 f"{seed}…{seed + n - 1}; {len(self.rows)} points."]
        if self.other_groups:
            lines.append(f"({self.other_groups} other settings group(s) in the file are not shown.)")
        ref = (self.reference or self.rows[0]).baseline
        lines.append(f"Uncached reference: {fmt(ref.seconds, '.2f')} s per generation "
                     f"({fmt(ref.ms_per_step, '.1f')} ms/step; "
                     + (f"median of {len(ref.runs)} timed run(s)" if ref.runs else "timed runs not recorded")
                     + f"), peak memory {fmt(ref.peak_mem_mb, '.1f')} MiB.")
        lines.append(self.speed_note() + " *work a/m/b*: the share of attention / MLP / block calls the point "
                     "executed, counted (1.00 = the uncached model), the same measure for DQAR and every baseline. "
                     "FID uses the embedded evaluator's features: *vs baseline* compares "
                     "with the uncached samples of the same seeds, *vs data* with held-out real digits. "
                     f"{DASH} in a config column: the field does not apply to that row's schedule.")
        walls = [r.wall_s for r in self.rows if r.wall_s is not None]
        if walls:
            lines.append(f"Sweep time spent on these points: {sum(walls) / 60:.1f} min (the reference run not included).")
        noisy = [label(r) for r in self.rows if above_bound(r)]
        if noisy:
            lines.append(f"Timing caveat: {len(noisy)} point(s) measured faster than their FLOP bound allows "
                         f"(marked ! here, red on pareto.png): {', '.join(noisy)}. Each point is timed apart from "
                         "the one reference run, so machine load between runs moves these ratios.")
        lines.append("")
        header = ["point", "schedule", "mode", "warmup", "layers", "order", "bits", "targets", "reuse",
                  "work a/m/b", "ideal", "measured", "ms/step", "FID vs base", "FID vs data", "PSNR", "SSIM", "acc"]
        body = []
        for r in self.rows:
            q = r.quality
            body.append([label(r) + (f" ({r.variant})" if r.variant else ""), r.schedule, setting(r, "mode"),
                         setting(r, "warmup"), setting(r, "layer_fraction"), setting(r, "order"),
                         setting(r, "cache_bits", None), setting(r, "targets"), pct(r.dqar.reuse_fraction),
                         calls_cell(r), ideal_cell(r), measured_cell(r), fmt(r.dqar.ms_per_step, ".1f"),
                         fmt(q.fid_vs_baseline), fmt(q.fid_vs_data), fmt(q.psnr, ".1f"), fmt(q.ssim, ".3f"),
                         pct(q.accuracy)])
        return lines + table(header, body)

    # -------------------------------------------------------------- assembly
    def build(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        sections: list[tuple[str, Callable[[Report], list[str]]]] = [
            ("Overview", Report.sec_overview),
            ("FID grid: warmup x layer fraction (seed 000, slide 7)", report_speed.sec_fid_grid),
            ("Pareto configurations (seed 000, backup 1)", report_speed.sec_pareto),
            ("Work share: every contender on the same axes", report_speed.sec_work),
            ("Shallow-first vs deep-first order (seed 000, slide 8)", report_details.sec_order),
            ("Memory profile (seed 000, backup 4)", report_details.sec_memory),
            ("Entropy and SNR per step (seed 002, slide 14)", report_details.sec_entropy),
            ("K/V caching vs output caching (seed 000, slide 4)", report_details.sec_kv),
            ("INT8 cache (seed 002, slides 6 and 13)", report_details.sec_int8),
            ("Entropy+SNR gate vs static schedule at equal speed (seed 002)", report_speed.sec_gate),
            ("Baselines (seed 002, slide 12)", report_details.sec_baselines),
            ("Samples: baseline vs DQAR (seed 000, slide 9)", report_details.sec_images),
        ]
        md = [f"# DQAR report: {self.results.name}", ""]
        for title, fn in sections:
            md.append(f"## {title}")
            md.append("")
            try:
                md += fn(self)
            except Missing as why:
                md.append(f"*Section omitted: {why}.*")
            md.append("")
        path = self.out / "report.md"
        path.write_text("\n".join(md))
        return path


def default_out(results: str | Path) -> Path:
    """Where `dqar report` writes without --out: `<results stem>.report/` beside the results file."""
    results = Path(results)
    return results.with_name(results.stem + ".report")


def build_report(results: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write out_dir/report.md and its PNGs from a sweep results file; returns report.md's path."""
    return Report(results, default_out(results) if out_dir is None else out_dir).build()
