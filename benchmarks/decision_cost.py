"""What DQAR's per-step decisions cost (issue 17: <= 2% of a step), interleaved against the plain model.

Every DQAR contender here computes every module at every step, so the images are the uncached ones and
the time over the plain model is pure overhead, split by what is added:

- `hooks+history`: the hooks and the forecast history (interval 1: every step computes and is stored);
- `adaptive`: + the error control's measurement at every compute (tolerance so small that it always
  refreshes), with the block probes that read the block input norms and gates;
- `gate`: the seed's entropy + SNR gate, entropy measured on every attention call (tau0 so small that it
  never passes);
- `policy`: the shipped policy's features and MLP on every layer (threshold 1.0 and a budget of less than
  one layer: it never reuses).

The decision cost is each decision contender's time over `hooks+history` (the same cache work without
the decisions); the hook cost is `hooks+history` over the plain model. On a shared 2-core machine two whole
runs differ by 10% from one round to the next, more than the 2% asked for, so the script also measures the
decision work inside each run (`--share-runs`): every function that does decision work is timed with
`time.perf_counter` around its call (statistics: attention entropy, the error measurement, the block
probes; the step's plan: features and the policy MLP; each module's reuse test), and its share of that
same run's wall time is reported (median and range over the runs). Numerator and denominator come from one
run, so machine drift cancels. Usage:

    python benchmarks/decision_cost.py --model DiT-B/2 --steps 10 --rounds 7
    python benchmarks/decision_cost.py --model embedded --n 20 --steps 20 --rounds 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import dqar.method.target as target_module
from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.digits.embedded import load_embedded_model
from dqar.harness.timing import dqar_contender, interleaved_timing
from dqar.method.controller import DQARController
from dqar.method.error_control import ErrorControl
from dqar.method.policy import shipped_policy_path
from dqar.method.probes import BlockProbe
from dqar.models import build_dit
from dqar.sampling import sample


def configs(targets: tuple, order: int, entropy_images: int = 0, policy: str | None = None,
            error_images: int = 0, policy_targets: tuple | None = None,
            branch_decisions: str = "each", error_targets: tuple | None = None) -> dict[str, DQARConfig]:
    common = dict(warmup=0.0, targets=targets, forecast_order=order)
    # The policy runs on the targets its card names (use_with): those its error feature was measured on.
    policy_targets = policy_targets or policy_use_with(policy).get("targets", ("attn",))
    return {
        "hooks+history": DQARConfig(schedule="interval", interval=1, **common),
        "adaptive": DQARConfig(schedule="adaptive", tolerance=1e-12, max_age=6, error_images=error_images,
                               branch_decisions=branch_decisions, **common),
        # The gate and the policy read attention entropy, so they decide on attention (and keep its history).
        "gate": DQARConfig(schedule="gate", tau0=1e-6, warmup=0.0, forecast_order=order,
                           entropy_images=entropy_images),
        # Threshold 1.0 alone can pass (a float32 sigmoid reaches 1.0); a budget below one layer never does.
        "policy": DQARConfig(schedule="policy", policy_path=policy, policy_threshold=1.0, policy_budget=0.01,
                             warmup=0.0, forecast_order=order, entropy_images=entropy_images,
                             error_images=error_images, targets=tuple(policy_targets),
                             branch_decisions=branch_decisions, error_targets=error_targets),
    }


def policy_use_with(path: str | None) -> dict:
    """The `use_with` of a policy's card (the .json beside it; the shipped policy's when path is None), or {}."""
    card = Path(path).with_suffix(".json") if path else shipped_policy_path().with_suffix(".json")
    return json.loads(card.read_text(encoding="utf-8")).get("use_with", {}) if card.is_file() else {}


class DecisionTimers:
    """Wall time inside the decision functions, patched in for one run and put back after it. A call made
    from inside another timed call (the policy's error measurement calls the error control) counts once."""

    PATCHED = ((DQARController, "begin_step"), (DQARController, "should_reuse"), (ErrorControl, "observe"),
               (ErrorControl, "resolve"), (BlockProbe, "_record_input"), (BlockProbe, "effect"),
               (target_module, "attention_logits"), (DQARController, "resolve_entropy"))

    def __init__(self):
        self.seconds, self.calls, self._depth, self._saved = 0.0, 0, 0, []
        self.by_function: dict[str, float] = {}

    def _timed(self, fn):
        label = fn.__name__

        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds += spent
                self.by_function[label] = self.by_function.get(label, 0.0) + spent
                self.calls += 1
                self._depth -= 1
        return timed

    def __enter__(self):
        for owner, name in self.PATCHED:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []


def decision_shares(run, model, configs: dict, runs: int) -> dict:
    """Per contender: the decision functions' share of each run's wall time (runs after one warm-up run)."""
    out = {}
    for name, config in configs.items():
        shares, calls, parts = [], 0, {}
        for i in range(runs + 1):
            # Patched before apply_dqar: the block probes bind their pre-hook when they are installed.
            with DecisionTimers() as timers:
                apply_dqar(model, config)
                try:
                    start = time.perf_counter()
                    run()
                    wall = time.perf_counter() - start
                finally:
                    remove_dqar(model)
            if i:
                shares.append(timers.seconds / wall)
                calls = timers.calls
                for label, spent in timers.by_function.items():
                    parts.setdefault(label, []).append(spent / wall)
        out[name] = {"median": statistics.median(shares), "min": min(shares), "max": max(shares),
                     "timed_calls_per_run": calls, "shares": shares,
                     "by_function": {k: statistics.median(v) for k, v in parts.items()}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-B/2", help="a preset (random weights) or 'embedded' (the shipped model)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=1, help="images per generation, each with its CFG twin (default 1)")
    ap.add_argument("--targets", default="block", help="what the adaptive and interval contenders cache (default block)")
    ap.add_argument("--forecast-order", type=int, default=2)
    ap.add_argument("--share-runs", type=int, default=5,
                    help="runs per contender for the in-run decision share (0: skip that part)")
    ap.add_argument("--entropy-images", type=int, default=0,
                    help="gate and policy: entropy over this many images per branch (0: all, the default)")
    ap.add_argument("--error-images", type=int, default=0,
                    help="adaptive and policy: forecast error over this many images per branch (0: all, the default)")
    ap.add_argument("--policy", default=None,
                    help="the policy contender's file (default: the shipped one), e.g. "
                         "docs/policy/policy_v2_noentropy.safetensors")
    ap.add_argument("--policy-targets", default=None,
                    help="the policy contender's targets (default: its card's use_with, else attn)")
    ap.add_argument("--branch-decisions", default="each", choices=("each", "cond"),
                    help="adaptive and policy: each branch decides on its own (each) or cond's plan serves both")
    ap.add_argument("--error-targets", default="", help="the policy: measure these targets only (default: all)")
    ap.add_argument("--only", default=None, help="comma list of contenders to time besides plain and hooks+history")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    model = load_embedded_model() if args.model == "embedded" else build_dit(args.model).randomize_(0).eval()
    labels, seeds = [i % 10 for i in range(args.n)], list(range(args.n))

    def run():
        return sample(model, labels, seeds, steps=args.steps, cfg_scale=1.5)

    reference = run()
    summaries: dict[str, dict] = {}

    def unchanged(name):
        def check(images):
            if not torch.equal(images, reference):
                raise RuntimeError(f"{name} changed the images: it reused something, so it does not time decisions")
        return check

    def contender(name, config):
        return dqar_contender(model, config, run, summaries, name, check=unchanged(name))

    contenders = {"plain": run}
    chosen = configs(tuple(args.targets.split(",")), args.forecast_order, args.entropy_images, args.policy,
                     args.error_images, tuple(args.policy_targets.split(",")) if args.policy_targets else None,
                     args.branch_decisions, tuple(t for t in args.error_targets.split(",") if t) or None)
    if args.only:
        keep = {"hooks+history", *args.only.split(",")}
        unknown = keep - set(chosen)
        if unknown:
            ap.error(f"--only {args.only!r}: unknown contender(s) {sorted(unknown)}; allowed: {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in keep}
    contenders.update({name: contender(name, c) for name, c in chosen.items()})
    results = interleaved_timing(contenders, rounds=args.rounds, warmup_runs=1, measure_memory=False)
    base, hooked = results["plain"].median, results["hooks+history"].median
    rows = []
    for name, res in results.items():
        spread = (max(res.samples) - min(res.samples)) / res.median
        rows.append({"contender": name, "ms_per_step": 1000 * res.median / args.steps, "spread": spread,
                     "over_plain": res.median / base - 1,
                     "decision_cost": None if name in ("plain", "hooks+history") else res.median / hooked - 1,
                     "reuse_events": summaries.get(name, {}).get("reuse_events"), "samples_s": res.samples})
    where = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.n} image(s) + CFG, {args.steps} steps, {args.rounds} rounds interleaved, median; {where}; {date.today()}")
    print("| contender | ms/step | (max-min)/median | over plain | decision cost (over hooks+history) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        cost = f"{r['decision_cost']:+.1%}" if r["decision_cost"] is not None else "-"
        print(f"| {r['contender']} | {r['ms_per_step']:.1f} | {r['spread']:.1%} | {r['over_plain']:+.1%} | {cost} |")
    shares = {}
    if args.share_runs:
        shares = decision_shares(run, model, {k: v for k, v in chosen.items() if k != "hooks+history"},
                                 args.share_runs)
        print(f"\nDecision work inside each run ({args.share_runs} runs per contender after a warm-up run): time in "
              "the decision functions / the run's wall time")
        print("| contender | share of the run (median) | min..max | timed calls per run | by function |")
        print("|---|---:|---:|---:|---|")
        for name, r in shares.items():
            parts = ", ".join(f"{k} {v:.2%}" for k, v in sorted(r["by_function"].items(), key=lambda kv: -kv[1]))
            print(f"| {name} | {r['median']:.2%} | {r['min']:.2%}..{r['max']:.2%} | {r['timed_calls_per_run']} | {parts} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "rounds": args.rounds, "rows": rows,
                       "configs": {k: dataclasses.asdict(v) for k, v in chosen.items()},
                       "decision_share": shares}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
