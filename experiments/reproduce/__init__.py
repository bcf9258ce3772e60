"""Reproduce Liu et al. (arXiv:2510.01555) end to end: the oracle table, the bandit, GRPO, report.

  python -m experiments.reproduce --quick --workdir runs/reproduce   # the README's main job
  python -m experiments.reproduce --workdir runs/reproduce_full      # the full comparison

`settings` (what is compared; the values are configs/reproduce.py), `running` (the runs and
studies, `run` the whole job), `verdicts` (one per claim of the paper, from the measurements),
`report` (report.md); the figures are `experiments.figures`. GRPO runs, summaries and statistics
come from `kljax.study`.
"""

from experiments.reproduce.running import run
from experiments.reproduce.settings import load_config

__all__ = ["load_config", "run"]
