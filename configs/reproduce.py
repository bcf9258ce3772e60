"""The reproduction of Liu et al. (arXiv:2510.01555): `get_config("quick")` is the README's main job
(its measured cost is in experiments/results/quick/results.json, `meta.seconds`), `get_config("full")`
the full comparison.

  python -m experiments.reproduce --quick --workdir runs/reproduce
  python -m experiments.reproduce --workdir runs/reproduce_full      # = --config=configs/reproduce.py:full

Dotted overrides change one setting, e.g. three seeds of 200 steps:

  python -m experiments.reproduce --quick --workdir runs/r3 --config.seeds=3 --config.steps=200

The GRPO runs start from the config file `grpo_config` names (the tiny arithmetic setup) with the
settings below; the stressing runs for claim 3 from `stress_config` (its own warm start, learning
rate, β and number of steps; `stress_steps` > 0 overrides the number of steps).
"""

import ml_collections

PRESETS = ("quick", "full")


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"configs/reproduce.py: the preset must be one of {', '.join(PRESETS)}, "
                     f"got {preset!r} (e.g. --config=configs/reproduce.py:quick).")
  quick = preset == "quick"
  c = ml_collections.ConfigDict()
  c.label = preset  # the report says "quick (modified: ...)" when an override changed a setting

  # GRPO on arithmetic from one supervised warm start, the same seeds for every variant.
  c.grpo_config = "grpo_tiny"  # a module of configs/
  c.seeds = 2 if quick else 4  # per variant
  c.steps = 150 if quick else 400  # GRPO steps per run
  c.beta = 0.5  # the paper's β
  c.sft_steps = 200  # the warm start
  c.off_policy_epochs = 2  # the off-policy runs: epochs × minibatches per rollout
  c.off_policy_minibatches = 2
  c.final_window = 30  # a run's final value is its mean over the last final_window steps
  c.data_dir = "~/.cache/kljax/tfds"

  # Exact gradients and the bandit.
  c.oracle_terms = "core" if quick else "all"  # "core": the paper's terms; "all": kl_term_names()
  c.bandit_modes = "exact,sampled"
  c.bandit_steps = 3000  # Adam steps per (term, mode)
  c.regime_steps = 3000  # regime map: Adam steps per (term, π_ref(best), β, mode)

  # Claim 3 where it can fail: exact sequences and GRPO from a weak warm start.
  c.sequence_seeds = 5 if quick else 8
  c.sequence_steps = 250 if quick else 400
  c.stress_config = "grpo_stress"  # a module of configs/
  c.stress_seeds = 2 if quick else 4
  c.stress_steps = 0 if quick else 300  # 0: the stress config's own num_steps
  c.stress_variants = "k2_as_loss,k3_as_loss" if quick else "none,k2_as_loss,k3_as_loss"

  # Beyond the paper (experiments/studies): sequence ∇RKL variance, GRPO under stale rollouts.
  c.studies = "quick"  # size of both studies: quick | full | none (full: longer, not yet timed)
  return c
