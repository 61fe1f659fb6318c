"""Statistics the reuse gate and policy read: sampled attention entropy, SNR (two forms), norms."""
from __future__ import annotations

import math

import torch

ENTROPY_EPS = 1e-6
SNR_EPS = 1e-6


def sample_query_rows(num_tokens: int, rows: int, seed: int) -> torch.Tensor:
    """A fixed, seeded subset of query-row indices (all rows when rows >= num_tokens)."""
    if rows >= num_tokens:
        return torch.arange(num_tokens)
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randperm(num_tokens, generator=g)[:rows].sort().values


def attention_entropy(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Mean per-query-row entropy (nats) of softmax(q k^T) for the sampled rows, one value per batch row.

    q, k: (N, H, T, hd). Only `len(rows)` query rows are materialised, so the main path keeps its
    fused attention; the mean over rows (not the sum) keeps the value from growing with T. This is seed
    000's H_t = -1/(H T) sum_h sum_ij A log A (over the sampled rows) with seed 002's log(A + 1e-6); seed
    002's own normalisation, -(1/H) sum_h sum_ij, sums the rows and is T times this value. Checked against
    hand-computed softmax entropies in tests/test_stats.py.
    """
    return logits_entropy(attention_logits(q, k, rows, scale))


def attention_logits(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float | None = None,
                     images: torch.Tensor | None = None) -> torch.Tensor:
    """(n, H, r, T) scaled attention logits of the sampled query rows of the batch rows `images` (an index from
    first_images_index; None: every one): the part of attention_entropy that needs q and k (the rest can wait
    and run for many layers at once: logits_entropy)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    rows = rows.to(q.device)
    if images is not None:
        # One gather per tensor (the images first, so the row gather copies only theirs); K's is the
        # contiguous copy a batched matmul wants anyway (against a strided view of the fused qkv
        # projection it costs several times that copy).
        images = images.to(q.device)
        qs, k = q.index_select(0, images).index_select(2, rows), k.index_select(0, images)
    else:
        qs, k = q.index_select(2, rows), k.contiguous()
    return torch.matmul(qs.float(), k.float().transpose(-1, -2)).mul_(scale)


class QKRows:
    """q and k of one attention call whose sampled logits are formed at the step's end, with the step's others
    (dqar.method.pending_entropy): views of the call's own projections, the first `images` images of each of
    `groups` equal branch parts and the query rows `rows`, as attention_logits(q, k, rows, images=
    first_images_index(...)) would take them now. A plain class: one is made per attention call."""

    __slots__ = ("q", "k", "rows", "groups", "images", "versions")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, groups: int, images: int):
        self.q, self.k, self.rows, self.groups, self.images = q, k, rows, groups, images
        self.versions = (q._version, k._version)

    @property
    def batch(self) -> int:
        """Logit rows this call gives: its kept images."""
        return self.groups * self.images

    @property
    def logits_numel(self) -> int:
        return self.batch * self.q.shape[1] * self.rows.numel() * self.k.shape[2]

    def kind(self) -> tuple:
        """Calls of one kind stack into one tensor each for q and k (stacked_logits)."""
        q, k = self.q, self.k
        return (q.shape, q.stride(), k.shape, k.stride(), q.dtype, q.device, self.rows.numel(), self.groups,
                self.images)

    def kept(self, t: torch.Tensor) -> torch.Tensor:
        """(groups, images, H, T, hd): a view of t's kept images."""
        return t.unflatten(0, (self.groups, t.shape[0] // self.groups))[:, :self.images]


def stacked_logits(calls: list[QKRows]) -> torch.Tensor:
    """(M, n, H, r, T) attention_logits of M calls of one kind (QKRows.kind): one stack for each of q, k and
    the sampled rows (each layer samples its own), one gather, one product, whatever M."""
    for c in calls:
        if (c.q._version, c.k._version) != c.versions:
            raise RuntimeError("DQAR: an attention's q or k was written in place after the call, before its entropy "
                               "was measured at the step's end; run this model with entropy_images=0")
    q = torch.stack([c.kept(c.q) for c in calls]).flatten(1, 2)           # (M, n, H, T, hd), contiguous
    k = torch.stack([c.kept(c.k) for c in calls]).flatten(1, 2)
    m, n, h, _, hd = q.shape
    rows = torch.stack([c.rows for c in calls]).to(q.device)               # (M, r)
    qs = q.gather(3, rows.view(m, 1, 1, -1, 1).expand(m, n, h, rows.shape[1], hd))
    return torch.matmul(qs.float(), k.float().transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))


def logits_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(N,) mean over heads and rows of the softmax entropy of (N, H, r, T) logits. In-place steps give the
    same values with fewer tensors."""
    a = logits.softmax(dim=-1)
    h = a.add(ENTROPY_EPS).log_().mul_(a).sum(dim=-1).neg_()                   # (N, H, r)
    return h.mean(dim=(1, 2))


def first_images_index(batch: int, groups: int, images: int) -> torch.Tensor | None:
    """Batch rows of the first `images` images of each of the `groups` equal parts of a batch of `batch` (a CFG
    batch holds one part per branch), in order; None when `images` is 0 or covers every part."""
    per_group = batch // groups
    if images <= 0 or images >= per_group:
        return None
    return (torch.arange(groups).unsqueeze(1) * per_group + torch.arange(images)).flatten()


def spread_rows(batch: int, images: int) -> slice:
    """`images` batch rows spread evenly over a branch's `batch` (every batch // images-th from the first; all
    when `images` is 0 or covers the batch): a sample of the images for a statistic that is a maximum, which
    the first few (in a class-ordered batch, one class) would under-read."""
    if images <= 0 or images >= batch:
        return slice(None)
    step = batch // images
    return slice(0, step * images, step)


def schedule_snr(alpha: float, sigma: float) -> float:
    """alpha_t^2 / sigma_t^2 from the noise schedule (seed 000)."""
    return alpha * alpha / max(sigma * sigma, 1e-12)


def x0_snr(x0: torch.Tensor, xt: torch.Tensor) -> float:
    """||x0||^2 / (||x_t - x0||^2 + eps) with x0 the model's current prediction (seed 002)."""
    x0 = x0.float()
    return float(x0.pow(2).sum() / ((xt.float() - x0).pow(2).sum() + SNR_EPS))


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """(N,) L2 norm of each sample, in float32 at least. Reduced over the non-batch dimensions rather than
    after flatten(1), which copies a non-contiguous tensor (diffusers' patch embedding hands the blocks a
    transposed view): 8x the cost of the norm."""
    return torch.linalg.vector_norm(x.detach().float(), dim=tuple(range(1, x.dim())))


def latent_norm(x: torch.Tensor) -> float:
    """Mean per-sample L2 norm of the current latent."""
    return float(per_sample_norm(x).mean())


def policy_features(entropy: float, snr: float, norm: float, progress: float, prompt_length: int) -> list[float]:
    """The seed's five policy features, in the order the policy file records."""
    return [
        float(entropy),
        math.log(max(snr, 0.0) + 1e-8),
        math.log(max(norm, 0.0) + 1e-8),
        float(progress),
        min(int(prompt_length), 128) / 128.0,
    ]


POLICY_FEATURE_NAMES = ("entropy", "log_snr", "log_norm", "step_progress", "prompt_length")
# Policy v2 (issue 17): the seed's five, then what a reusing run knows about each (layer, branch): the steps
# since it last computed, log of the forecast error measured at that compute (the adaLN-gated effect of
# dqar.method.error_control) and the cache age that error was measured at. Computed in dqar.method.policy.
POLICY_FEATURE_NAMES_V2 = POLICY_FEATURE_NAMES + ("cache_age", "log_forecast_error", "error_age")
# v2 less the attention entropy, the weakest of v2's informative signals (single-feature AUC 0.73 against the
# forecast error's 0.91, docs/POLICY.md) and its most expensive: without it no attention statistic is taken,
# so the attention modules run their own forward (issue 17, bullet 4).
POLICY_FEATURE_NAMES_V2_NOENTROPY = tuple(n for n in POLICY_FEATURE_NAMES_V2 if n != "entropy")
POLICY_FEATURE_SETS = {"v1": POLICY_FEATURE_NAMES, "v2": POLICY_FEATURE_NAMES_V2,
                       "v2-noentropy": POLICY_FEATURE_NAMES_V2_NOENTROPY}
