"""How well each signal of the signal study (`signal_study`) ranks the harm: Spearman's rho, ROC AUC, fits.

Harm is the single-position final-image MSE against the uncached image of the same seed; "harmful" (for the
AUC) is a PSNR below a stated threshold. Spearman and AUC come from scipy / scikit-learn. A fitted
combination is a least-squares line for log10(MSE) in the logs of positive signals (entropy and log SNR as
they are), scored on held-out positions (k folds by position, so the seeds of one position stay together).
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch

from dqar.harness.policy_training import binary_auc
from dqar.harness.signal_study import COMBOS

SIGNALS = ("entropy", "log_snr", "age", "last_rel", "last_gated", "rate_gated", "input_change", "probe",
           "now_rel", "now_gated", "cfg_weight", *COMBOS)
# Signals the adaptive schedule cannot know before deciding (they need this step's fresh output).
ORACLE = ("now_rel", "now_gated", "now_gated*w")
FITS = {
    "fit[entropy, log_snr]": ("entropy", "log_snr"),
    "fit[last_gated, w]": ("last_gated", "cfg_weight"),
    "fit[last_gated, w, log_snr]": ("last_gated", "cfg_weight", "log_snr"),
    "fit[last_gated, w, entropy, log_snr]": ("last_gated", "cfg_weight", "entropy", "log_snr"),
    "fit[rate_gated, age, w, log_snr]": ("rate_gated", "age", "cfg_weight", "log_snr"),
    "fit[now_gated, w, log_snr]": ("now_gated", "cfg_weight", "log_snr"),
}
_AS_IS = ("entropy", "log_snr")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy); None when either side is constant or there are fewer than 3 pairs."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """ROC AUC of `scores` for the positive class (scikit-learn); None when only one class is present."""
    return binary_auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(positive, dtype=torch.float64))


def _design(rows: Sequence[dict], features: Sequence[str]) -> np.ndarray:
    cols = [np.ones(len(rows))]
    for f in features:
        v = np.array([r[f] for r in rows], dtype=np.float64)
        cols.append(v if f in _AS_IS else np.log10(np.maximum(v, 1e-12)))
    return np.stack(cols, axis=1)


def position_key(row: dict) -> tuple:
    return (row["step"], row["layer"], row["target"], row["branch"], row["order"], row["age"])


def cross_validated_fit(rows: Sequence[dict], features: Sequence[str], folds: int = 5, seed: int = 0) -> list[float]:
    """Held-out predictions of log10(MSE) from a least-squares fit on `features`, k folds by position."""
    keys = sorted({position_key(r) for r in rows})
    random.Random(seed).shuffle(keys)
    fold_of = {k: i % folds for i, k in enumerate(keys)}
    x = _design(rows, features)
    y = np.log10(np.maximum(np.array([r["mse"] for r in rows]), 1e-30))
    fold = np.array([fold_of[position_key(r)] for r in rows])
    pred = np.empty(len(rows))
    for f in range(folds):
        test = fold == f
        if not test.any():
            continue
        coef, *_ = np.linalg.lstsq(x[~test], y[~test], rcond=None)
        pred[test] = x[test] @ coef
    return pred.tolist()


def fit_coefficients(rows: Sequence[dict], features: Sequence[str]) -> dict:
    """The fit on all rows: intercept and one coefficient per feature (on log10 unless entropy / log SNR)."""
    x = _design(rows, features)
    y = np.log10(np.maximum(np.array([r["mse"] for r in rows]), 1e-30))
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"intercept": float(coef[0]), **{f: float(c) for f, c in zip(features, coef[1:])}}


def groups_of(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """'all', every target ('attn', ...), and every (target, order) ('attn o0', ...), in a stable order."""
    out = {"all": list(rows)}
    for t in dict.fromkeys(r["target"] for r in rows):
        out[t] = [r for r in rows if r["target"] == t]
    for t in dict.fromkeys(r["target"] for r in rows):
        for k in sorted({r["order"] for r in rows}):
            sub = [r for r in rows if r["target"] == t and r["order"] == k]
            if sub:
                out[f"{t} o{k}"] = sub
    return out


def evaluate(rows: Sequence[dict], psnr_threshold: float, signals: Sequence[str] = SIGNALS,
             fits: dict = FITS) -> dict:
    """{group: {"n", "positive_rate", "signals": {name: {"spearman", "auc"}}}} for every group of `groups_of`."""
    out = {}
    for name, sub in groups_of(rows).items():
        harm = [r["mse"] for r in sub]
        positive = [r["psnr"] < psnr_threshold for r in sub]
        scores = {s: [r[s] for r in sub] for s in signals}
        scores.update({f: cross_validated_fit(sub, feats) for f, feats in fits.items()})
        out[name] = {"n": len(sub), "positions": len({position_key(r) for r in sub}),
                     "positive_rate": sum(positive) / len(sub),
                     "signals": {s: {"spearman": spearman(v, harm), "auc": auc(v, positive)}
                                 for s, v in scores.items()}}
    return out


def age_growth(rows: Sequence[dict]) -> dict:
    """{"target oK": {age: {"now_over_rate", "median_psnr", "n"}}}: how the gated forecast error grows with age.

    now_over_rate = median over rows of now_gated / rate_gated, the error of the age-a forecast actually used
    at step s over the error an age-1 forecast made at the last compute s-a: what error control's a^(k+1) law
    predicts to be a^(k+1)."""
    out = {}
    for t in dict.fromkeys(r["target"] for r in rows):
        for k in sorted({int(r["order"]) for r in rows}):
            cells = {}
            for a in sorted({int(r["age"]) for r in rows}):
                sub = [r for r in rows if r["target"] == t and r["order"] == k and r["age"] == a]
                if sub:
                    ratio = [r["now_gated"] / r["rate_gated"] for r in sub if r["rate_gated"] > 0]
                    cells[a] = {"now_over_rate": float(np.median(ratio)),
                                "median_psnr": float(np.median([r["psnr"] for r in sub])), "n": len(sub)}
            if cells:
                out[f"{t} o{k}"] = cells
    return out


def growth_table(growth: dict) -> str:
    ages = sorted({a for cells in growth.values() for a in cells})
    lines = ["| target, order | " + " | ".join(f"age {a}: error x (a^(k+1)), median PSNR" for a in ages) + " |",
             "|---|" + "---|" * len(ages)]
    for name, cells in growth.items():
        k = int(name.rsplit("o", 1)[1])
        row = [f"{cells[a]['now_over_rate']:.2f} ({a ** (k + 1)}), {cells[a]['median_psnr']:.1f} dB" if a in cells
               else "-" for a in ages]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, signed: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown_tables(results: dict, columns: Sequence[str] | None = None) -> str:
    """Two tables (Spearman with MSE, AUC for PSNR below the threshold): one row per signal, one column per group."""
    columns = list(columns or results)
    names = list(next(iter(results.values()))["signals"])
    lines = []
    for metric, title in (("spearman", "Spearman rho with the final-image MSE"),
                          ("auc", "ROC AUC for harm (PSNR below the threshold)")):
        lines += [f"**{title}**", "", "| signal | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for s in names:
            label = f"{s} (oracle)" if s in ORACLE else s
            cells = [_fmt(results[c]["signals"][s][metric], metric == "spearman") for c in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| group | rows | positions | harmful share |")
    lines.append("|---|---|---|---|")
    for c in columns:
        r = results[c]
        lines.append(f"| {c} | {r['n']} | {r['positions']} | {r['positive_rate']:.2f} |")
    return "\n".join(lines) + "\n"
