"""PNG figures for `dqar report` (matplotlib, Agg backend: no display needed).

Each function takes plain numbers/arrays (no sweep rows). The `*_plot` / `fid_heatmap` functions write one
PNG, grown to fit every title and label (nothing cropped), and return its path; `pareto_figure` and
`paired_image_grid` return the figure itself, so what it shows can be checked without reading pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    # Agg before pyplot is imported anywhere, so a headless machine (CI, a server) never needs a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def fid_heatmap(warmups: Sequence[float], layers: Sequence[float], values: dict, path: str | Path, *,
                title: str = "FID vs uncached samples", cbar: str = "FID") -> Path:
    """values[(warmup, layer_fraction)] -> number (missing cells blank)."""
    plt = _pyplot()
    grid = np.array([[_nan(values.get((w, l))) for l in layers] for w in warmups])
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(layers), 1.2 + 0.8 * len(warmups)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(layers)), [f"{l:.0%}" for l in layers])
    ax.set_yticks(range(len(warmups)), [f"{w:.0%}" for w in warmups])
    ax.set_xlabel("layer fraction")
    ax.set_ylabel("warmup")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(warmups)):
        for j in range(len(layers)):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if grid[i, j] > mid else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


WORK_LABEL = "work share: executed share of attention and MLP calls, counted (1 = the uncached model)"


def pareto_figure(points: Sequence[dict], *, ideal_front: Sequence[str] = (), measured_front: Sequence[str] = (),
                  ylabel: str = "FID vs uncached samples (lower is better)", x: str = "speed",
                  work_front: Sequence[str] = ()):
    """Quality against speed (`x="speed"`) or against work (`x="work"`), every point labelled with its name;
    returns the matplotlib figure.

    x="work": one panel, quality against each point's "work" (the executed share of attention and MLP calls,
    counted for every contender alike), `work_front` joined by a line; points without a "work" are left out.

    points: {"name", "group", "quality", "ideal", "measured", "low", "high"}; "ideal" is the FLOP-count
    bound (None for a point without one), "measured" the median measured speedup with its run range
    ["low", "high"] (all None where it was not timed at least twice). The left panel leads with the FLOP
    bound; the right one, drawn only when some point has a measured speedup, shows those with their range
    as error bars, and flags in red every measured speedup above its own FLOP bound (the bound marked x,
    joined to the measurement): that excess can only be timing noise. The `*_front` names are joined by a line.
    """
    if x not in ("speed", "work"):
        raise ValueError(f"x={x!r} is not allowed: must be 'speed' or 'work'")
    plt = _pyplot()
    measured = [p for p in points if p.get("measured") is not None] if x == "speed" else []
    panels = [("ideal", "FLOP-bound (ideal) speedup over the uncached model (x)", ideal_front)]
    if x == "work":
        panels = [("work", WORK_LABEL, work_front)]
    if measured:
        panels.append(("measured", "measured speedup, median and min-max of the timed runs (x)", measured_front))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False, sharey=True)
    groups = sorted({p["group"] for p in points})
    markers = dict(zip(groups, "osD^v<>ph*"))
    qs = [p["quality"] for p in points if p["quality"] is not None and np.isfinite(p["quality"])]
    nonneg = [q for q in qs if q >= 0]
    symlog = bool(nonneg) and max(qs) > 100 * max(min(nonneg), 0.1)
    for ax, (key, xlabel, front) in zip(axes[0], panels):
        shown = [p for p in points if p.get(key) is not None]
        for g in groups:
            ps = [p for p in shown if p["group"] == g]
            if ps:
                ax.scatter([p[key] for p in ps], [p["quality"] for p in ps], label=g, marker=markers[g], s=40)
        for p in shown:
            above = key == "measured" and p.get("ideal") is not None and p["measured"] > p["ideal"]
            if key == "measured":
                ax.errorbar([p["measured"]], [p["quality"]], xerr=[[p["measured"] - p["low"]], [p["high"] - p["measured"]]],
                            fmt="none", ecolor="red" if above else "grey", lw=1, capsize=2)
            if above:
                ax.plot([p["ideal"], p["measured"]], [p["quality"]] * 2, "r:", lw=1)
                ax.scatter([p["ideal"]], [p["quality"]], marker="x", color="red", s=30)
            ax.annotate(p["name"] + (f"  ! above its FLOP bound {p['ideal']:.3f}x" if above else ""),
                        (p[key], p["quality"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points",
                        color="red" if above else "black")
        fr = sorted((p for p in shown if p["name"] in set(front)), key=lambda p: p[key])
        if fr:
            ax.plot([p[key] for p in fr], [p["quality"] for p in fr], "k--", lw=1, label="Pareto front")
        ax.axvline(1.0, color="grey", lw=0.5)
        if symlog:
            # FIDs from 0.01 to 300 on one plot: linear would flatten every good point onto zero.
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0, top=max(qs) * 2)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(ylabel + (", symlog scale" if symlog else ""))
    if x == "work":
        axes[0, 0].set_title("every contender (DQAR and each baseline) by the calls it executed", fontsize=9)
    else:
        axes[0, 0].set_title("by FLOP bound (no timing noise)" if measured else
                             "by FLOP bound; measured speedups not shown: no point was timed twice", fontsize=9)
    if measured:
        axes[0, 1].set_title("measured; red: above its own FLOP bound (x), i.e. timing noise", fontsize=9)
    fig.tight_layout()
    return fig


def pareto_plot(points: Sequence[dict], path: str | Path, **kwargs) -> Path:
    """`pareto_figure(points, **kwargs)` written to `path`."""
    return _save(pareto_figure(points, **kwargs), path)


def _save(fig, path: str | Path) -> Path:
    # bbox_inches="tight" grows the canvas to every artist, so no title or label is ever cropped.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    _pyplot().close(fig)
    return Path(path)


def entropy_snr_plot(entropy: Sequence, snr: Sequence, path: str | Path, *, x0_snr: Sequence | None = None,
                     events: dict[str, Sequence[int]] | None = None) -> Path:
    """Entropy (left axis) and SNR (log right axis) per step; reuse events per step below."""
    plt = _pyplot()
    rows = 2 if events else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7.5, 3.2 * rows), sharex=True, squeeze=False)
    ax = axes[0, 0]
    steps = np.arange(len(entropy))
    ax.plot(steps, [_nan(v) for v in entropy], "C0-", label="attention entropy (nats)")
    ax.set_ylabel("entropy (nats)", color="C0")
    ax2 = ax.twinx()
    ax2.semilogy(steps, [_nan(v) for v in snr], "C1-", label="SNR alpha^2/sigma^2")
    if x0_snr is not None:
        ax2.semilogy(np.arange(len(x0_snr)), [_nan(v) for v in x0_snr], "C2--", label="SNR x0 form")
    ax2.set_ylabel("SNR (log)", color="C1")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="upper center")
    ax.set_title("uncached model: entropy and SNR per step")
    if events:
        axe = axes[1, 0]
        for name, ev in events.items():
            axe.plot(np.arange(len(ev)), ev, label=name)
        axe.set_ylabel("reuse events")
        axe.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, path)


def paired_image_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], *, names: tuple[str, str] = ("uncached", "DQAR"),
                      title: str = ""):
    """One row per entry (label, uint8 (K, H, W, C) images A, images B): A's images left, B's right under
    their `names`; returns the figure (constrained layout, so the titles take their own space)."""
    plt = _pyplot()
    k = max(max(len(a), len(b)) for _, a, b in rows)
    fig = plt.figure(figsize=(2 * (0.9 * k + 0.3) + 0.8, 0.95 * len(rows) + 0.9), layout="constrained")
    halves = fig.subfigures(1, 2, wspace=0.04)
    for side, (sub, name) in enumerate(zip(halves, names)):
        axes = sub.subplots(len(rows), k, squeeze=False)
        sub.suptitle(name, fontsize=9)
        for r, entry in enumerate(rows):
            imgs = entry[1 + side]
            for c in range(k):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    img = imgs[c]
                    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
                else:
                    ax.axis("off")
            if side == 0:
                axes[r, 0].set_ylabel(entry[0], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def image_grid_plot(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, **kwargs) -> Path:
    """`paired_image_grid(rows, **kwargs)` written to `path`."""
    return _save(paired_image_grid(rows, **kwargs), path)
