"""The table of experiments/results/stress_search.md from experiments/results/stress_search.json
(per-step traces of the GRPO runs that searched for a stressing regime, configs/grpo_stress.py).

  python -m experiments.stress_table [experiments/results/stress_search.json]
"""

import json
import sys

import numpy as np

WINDOW = 10  # steps averaged at the start and the end of a run


def rows(results: dict) -> list[str]:
  """One markdown row per run: reward start -> end, the largest completion log π/π_ref, the
  fraction of steps whose largest one is ≥ 5 nats, the final and largest exact reverse KL."""
  out = ["| config (overrides of configs/grpo_stress.py) | variant | seed | reward first→last 10 "
         "| max completion log π/π_ref | steps ≥ 5 nats | final exact RKL (last 10) | max exact RKL "
         "| max grad norm | wall s (steps s) |", "|" + "---|" * 10]
  for name, block in results.items():
    for r in block["runs"]:
      wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f}"  # None: not measured
      reward, ratio, rkl = (np.asarray(r[k]) for k in ("reward_mean", "max_seq_log_ratio", "exact_rkl"))
      out.append(
          f"| {name}: `{' '.join(block['overrides']) or '(none)'}` | {r['variant']} | {r['seed']} "
          f"| {reward[:WINDOW].mean():.3f} → {reward[-WINDOW:].mean():.3f} | {ratio.max():.2f} "
          f"| {np.mean(ratio >= 5):.2f} | {rkl[-WINDOW:].mean():.4f} | {rkl.max():.4f} "
          f"| {max(r['grad_norm']):.2f} | {wall} ({r['step_s']:.0f}) |")
  return out


if __name__ == "__main__":
  path = sys.argv[1] if len(sys.argv) > 1 else "experiments/results/stress_search.json"
  with open(path) as f:
    print("\n".join(rows(json.load(f))))
