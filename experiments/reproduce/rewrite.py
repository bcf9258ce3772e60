"""Rewrites a committed report's verdicts and report.md from its results.json, without rerunning.

  python -m experiments.reproduce.rewrite experiments/results/full experiments/results/quick

The verdicts are recomputed by `verdicts.verdicts` from the measurements results.json stores (so a
change of wording or of the statistics quoted, e.g. the exact permutation p beside Welch's, reaches
a report whose runs took 17 minutes), and report.md is written by `report.write_report`; its oracle
table is kept from the existing report.md (results.json stores the rows' numbers, and the table is
their rendering). Nothing is trained, and `meta` (the runs' cost) is unchanged.
"""

from __future__ import annotations

import json
import math
import re
import sys

import ml_collections

from experiments.reproduce import report, verdicts
from kljax import gradient_table, paths

_ORACLE = "## Oracle: exact expected gradients"


def _rows(oracle: dict) -> list[gradient_table.Row]:
  nan = lambda x: math.nan if x is None else x  # noqa: E731
  return [gradient_table.Row(term, setting, r["coefficient"], r["grad_norm"], r["to_rkl"],
                             r["to_fkl"], nan(r["to_frozen"]), nan(r["to_frozen_fkl"]),
                             r["follows"])
          for setting, terms in oracle.items() for term, r in terms.items()]


def _warm_max_seq_log_ratio(results: dict) -> float:
  """Stored since this module exists; older results quote it only in claim 3's evidence."""
  if "warm_max_seq_log_ratio" in results:
    return results["warm_max_seq_log_ratio"]
  m = re.search(r"largest log π/π_ref of a sampled completion ([\d.]+) nats\.",
                results["verdicts"]["3_k3_as_loss_weaker_than_k2"]["evidence"])
  return float(m.group(1)) if m else math.nan


def rewrite(workdir) -> dict:
  """Recomputes results.json's verdicts and rewrites report.md in `workdir`; returns the results."""
  workdir = paths.resolve(workdir)
  results = json.loads((workdir / "results.json").read_text())
  old = (workdir / "report.md").read_text()
  if _ORACLE not in old:
    raise ValueError(f"{workdir / 'report.md'} has no '{_ORACLE}' section to keep.")
  oracle_md = old.split(_ORACLE, 1)[1].split("\n\n", 2)[2]  # past the heading and its note
  gaps = results["trajectory"]
  extra = {"regimes": results.get("regimes"), "sequence": results.get("sequence"),
           "stress": results.get("grpo_stress"), "off_policy_means": results["off_policy_means"],
           "warm_max_seq_log_ratio": _warm_max_seq_log_ratio(results)}
  results["warm_max_seq_log_ratio"] = extra["warm_max_seq_log_ratio"]
  bandit = {k.split(" @ ")[0]: d for k, d in results["bandit"].items() if k.endswith("exact")}
  results["verdicts"] = verdicts.verdicts(
      _rows(results["oracle"]), bandit, results["grpo"], results["grpo_off_policy"], gaps,
      [g["final_rel_param_distance"] for g in gaps], extra)
  settings = ml_collections.ConfigDict(results["meta"]["settings"])
  paths.write_atomic(workdir / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
  report.write_report(workdir / "report.md", settings, results, oracle_md)
  return results


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  for d in argv[1:]:
    rewrite(d)
    print(f"rewrote {d}/results.json (verdicts) and {d}/report.md")
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv))
