"""PNG figures for `dqar report` (matplotlib, Agg backend: no display needed).

Each function takes plain numbers/arrays (no sweep rows), writes one PNG and returns its path.
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pareto_plot(points: Sequence[dict], front: Sequence[str], path: str | Path, *,
                ylabel: str = "FID vs uncached samples (lower is better)") -> Path:
    """points: {"name", "speedup", "quality", "group"}; `front` names the non-dominated ones (joined by a line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = sorted({p["group"] for p in points})
    markers = dict(zip(groups, "osD^v<>ph*"))
    for g in groups:
        ps = [p for p in points if p["group"] == g]
        ax.scatter([p["speedup"] for p in ps], [p["quality"] for p in ps], label=g, marker=markers[g], s=40)
        if g == "baseline":
            for p in ps:
                ax.annotate(p["name"], (p["speedup"], p["quality"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
    fr = sorted((p for p in points if p["name"] in set(front)), key=lambda p: p["speedup"])
    if fr:
        ax.plot([p["speedup"] for p in fr], [p["quality"] for p in fr], "k--", lw=1, label="Pareto front")
    ax.axvline(1.0, color="grey", lw=0.5)
    qs = [p["quality"] for p in points if p["quality"] is not None and np.isfinite(p["quality"])]
    if qs and max(qs) > 100 * max(min(q for q in qs if q >= 0), 0.1):
        # FIDs from 0.01 to 300 on one plot: linear would flatten every good point onto zero.
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(bottom=0, top=max(qs) * 2)
        ylabel += ", symlog scale"
    ax.set_xlabel("measured speedup over the uncached model (x)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def image_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, *, title: str = "") -> Path:
    """rows: (label, uint8 (K, H, W, C) images); one row of K images per entry."""
    plt = _pyplot()
    k = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k + 1.6, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                img = imgs[c]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
