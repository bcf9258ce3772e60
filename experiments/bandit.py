"""Bandit experiment: which optimum does each KL term really converge to?

  python -m experiments.bandit --config configs/bandit.py --workdir DIR

Writes DIR/results.md (markdown table), DIR/results.json, DIR/final_distances.png, DIR/curves.png.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from experiments import figures
from experiments.reproduce.verdicts import nearest_optimum
from kljax import bandit, cli
from kljax.kl import kl_term, kl_term_names

_CONFIG = cli.define_config_file(
    "config", "configs/bandit.py", "Bandit config file.",
    docs=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "bandit.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the table, JSON and plots.")
flags.mark_flag_as_required("workdir")


def _split(value: str, what: str) -> list[str]:
  items = [s.strip() for s in str(value).split(",") if s.strip()]
  if not items:
    raise app.UsageError(f"--config.{what} is empty; give a comma-separated list.")
  return items


def resolve_terms(value: str) -> list[str]:
  """Comma-separated KL-term names, or "all"; every name checked before anything compiles."""
  if str(value).strip() == "all":
    return [n for n in kl_term_names() if not n.endswith("_rtg")]
  names = _split(value, "terms")
  for name in names:
    try:
      kl_term(name)
    except ValueError as err:
      raise app.UsageError(f"--config.terms: {err}") from None
  return names


def results_table(results: list[bandit.Run], problem: bandit.Problem) -> str:
  """A markdown table: one row per (term, mode), the nearest optimum in bold (none when every
  distance is ≥ the reproduction's threshold, `NEAREST_TV`)."""
  lines = [
      "| KL term | gradients | TV to π* (reverse-KL opt.) | TV to forward-KL opt. | TV to β=0 opt. "
      "| KL(π‖π_ref) | KL(π_ref‖π) | E[r] |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    d = bandit.final_distances(r, problem)
    nearest = nearest_optimum(d)
    cells = [f"**{v:.2e}**" if k == nearest else f"{v:.2e}" for k, v in d.items()]
    lines.append(
        f"| `{r.term}` | {r.mode} | " + " | ".join(cells)
        + f" | {r.curves['reverse_kl'][-1]:.4f} | {r.curves['forward_kl'][-1]:.4f}"
        f" | {r.curves['reward'][-1]:.4f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = _CONFIG.value
  terms = resolve_terms(config.terms)
  modes = _split(config.modes, "modes")
  try:
    for mode in modes:
      bandit.check_mode(mode)
    bandit.check_steps(config.num_steps, config.inner_steps)
  except ValueError as err:
    raise app.UsageError(f"--config: {err}") from None
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  try:
    problem = bandit.make_problem(**config.problem.to_dict())
  except ValueError as err:
    raise app.UsageError(f"--config.problem: {err}") from None

  start = time.time()
  results = bandit.run_all(
      problem,
      terms,
      modes=modes,
      num_steps=config.num_steps,
      learning_rate=config.learning_rate,
      final_lr_fraction=config.final_lr_fraction,
      num_samples=config.num_samples,
      inner_steps=config.inner_steps,
      seed=config.seed,
  )
  elapsed = time.time() - start

  table = results_table(results, problem)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(
        f"# Bandit: E[r] − β·KL, {config.problem.num_arms} arms, β = {problem.beta}\n\n"
        f"{config.num_steps} Adam steps per run; sampled gradients use {config.num_samples} actions "
        f"a step, each batch reused for {config.inner_steps} step(s). Total variation distance of "
        f"the final policy from each optimum; the nearest is in bold. π* ∝ π_ref·exp(r/β) is the "
        f"reverse-KL optimum, the forward-KL optimum maximizes E[r] − β·KL(π_ref‖π), the β=0 "
        f"optimum is argmax r. Distances between the optima: "
        f"TV(π*, forward) = {bandit.exact.tv_distance(problem.pi_star, problem.pi_fkl):.3f}, "
        f"TV(π*, β=0) = {bandit.exact.tv_distance(problem.pi_star, problem.pi_zero):.3f}.\n\n"
        f"{table}\n![final distances](final_distances.png)\n\n![curves](curves.png)\n"
    )
  summary = {
      "problem": {
          "rewards": problem.rewards.tolist(),
          "ref_probs": problem.ref_probs.tolist(),
          "beta": problem.beta,
          "pi_star": problem.pi_star.tolist(),
          "pi_fkl": problem.pi_fkl.tolist(),
          "pi_zero": problem.pi_zero.tolist(),
      },
      "config": config.to_dict(),
      "runs": [
          {"term": r.term, "mode": r.mode, **bandit.final_distances(r, problem),
           "final_probs": r.final_probs.tolist()}
          for r in results
      ],
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  figures.bandit_final(results, lambda r: bandit.final_distances(r, problem),
                       os.path.join(workdir, "final_distances.png"))
  figures.bandit_curves(results, os.path.join(workdir, "curves.png"))
  print(table)
  print(f"{len(results)} runs in {elapsed:.1f} s; results in {workdir}/results.md")
  logging.info("wrote %s", workdir)


if __name__ == "__main__":
  cli.run(main)
