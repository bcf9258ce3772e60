"""What the reproduction compares, and the GRPO config of each of its runs.

The settings themselves are `configs/reproduce.py` (`get_config("quick" | "full")`, dotted
overrides on the command line); `validate` checks them before anything runs.
"""

from __future__ import annotations

import importlib
import math
import os

import ml_collections

from kljax import paths

ON_POLICY = ("none", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k1_in_reward", "k1_in_reward_rtg",
             "k1_in_reward@before_norm")  # variant@reward_stage (see grpo.REWARD_STAGES)
OFF_POLICY = ("k2_as_loss", "k2_as_loss+detached_ratio", "k2_as_loss+ratio", "k2_as_loss+clipped")
# k1 in reward off-policy with the penalty computed at rollout (held over the epochs, kljax's
# default) or recomputed at the current parameters: variant@reward_at (see grpo.REWARD_AT)
REWARD_AT_ROLLOUT, REWARD_AT_CURRENT = "k1_in_reward@rollout", "k1_in_reward@current"
OFF_POLICY_REWARD_AT = (REWARD_AT_ROLLOUT, REWARD_AT_CURRENT)
ORACLE_CORE = ("k1_as_loss", "k1_in_reward", "k1_in_reward_rtg", "k2_as_loss", "k2_in_reward",
               "k3_as_loss", "k3_in_reward", "k3_value_k2_grad", "k2_as_loss+detached_ratio",
               "k2_as_loss+ratio", "k2_as_loss+clipped", "k3_as_loss+ratio")
BANDIT_TERMS = ("k1_in_reward", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k2_in_reward",
                "k3_in_reward", "k3_value_k2_grad", "k2_as_loss+detached_ratio",
                "k2_as_loss+clipped", "k2_as_loss+ratio", "k3_as_loss+ratio")
BANDIT_PROBLEM = {"num_arms": 10, "beta": 0.3, "seed": 0}
BANDIT_LEARNING_RATE = 0.1

NEAREST_TV = 0.05  # a final policy farther (TV) than this from every optimum is near "none"
ALPHA = 0.05  # significance level of the Welch t-tests behind "differs"
REGIME_PI_REF = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
REGIME_BETAS = (0.05, 0.1, 0.2, 0.5, 1.0)
VERL_K3 = "k3_as_loss (verl clamp ±10)"
REGIME_TERMS = ("k2_as_loss", "k1_in_reward", "k3_as_loss", "k3_as_loss+ratio", VERL_K3)
REGIME_PAIRS = ("k3_as_loss", "k3_as_loss+ratio", VERL_K3, "k1_in_reward")  # each / k2_as_loss
BEFORE_NORM = "k1_in_reward@before_norm"
SEQUENCE_TERMS = ("k2_as_loss", "k3_as_loss", "k1_in_reward_rtg", VERL_K3)
SEQUENCE = {"vocab": 4, "length": 6, "ref_prob_target": 1e-3, "beta": 0.2, "num_samples": 64,
            "learning_rate": 0.05, "grad_clip": 1.0}

_POSITIVE = ("seeds", "steps", "off_policy_epochs", "off_policy_minibatches", "final_window",
             "bandit_steps", "sft_steps", "regime_steps", "sequence_seeds", "sequence_steps",
             "stress_seeds")


def load_config(preset: str) -> ml_collections.ConfigDict:
  """configs/reproduce.py's preset ("quick" or "full")."""
  from configs import reproduce

  return reproduce.get_config(preset)


def split(value: str) -> tuple[str, ...]:
  """A comma-separated setting as a tuple of names."""
  return tuple(s.strip() for s in str(value).split(",") if s.strip())


def validate(settings: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the setting and what it must be."""
  from kljax import bandit

  for name in _POSITIVE:
    if not isinstance(settings[name], int) or settings[name] < 1:
      raise ValueError(f"{name} must be >= 1, got {settings[name]}.")
  if not isinstance(settings.stress_steps, int) or settings.stress_steps < 0:
    raise ValueError(f"stress_steps must be >= 0 (0: the stress config's own num_steps), got "
                     f"{settings.stress_steps}.")
  if not (settings.beta > 0 and math.isfinite(settings.beta)):
    raise ValueError(f"beta must be a finite number > 0, got {settings.beta}.")
  if settings.oracle_terms not in ("core", "all"):
    raise ValueError(f"oracle_terms must be 'core' or 'all', got {settings.oracle_terms!r}.")
  modes = split(settings.bandit_modes)
  if not modes or any(m not in bandit.MODES for m in modes):
    raise ValueError(f"bandit_modes must be a comma-separated list of {', '.join(bandit.MODES)}, "
                     f"got {settings.bandit_modes!r}.")
  if settings.get("studies", "quick") not in ("quick", "full", "none"):
    raise ValueError(f"studies must be 'quick', 'full' or 'none', got {settings.studies!r}.")
  if not split(settings.stress_variants):
    raise ValueError("stress_variants must name at least one variant (comma-separated).")
  for name in ("grpo_config", "stress_config"):
    _grpo_module(settings[name], name)


def oracle_terms(settings) -> tuple[str, ...] | None:
  """The terms of the gradient table (None: every name of `kljax.kl_term_names()`)."""
  return ORACLE_CORE if settings.oracle_terms == "core" else None


def modifications(settings) -> dict:
  """{setting: value} where `settings` differs from its preset (empty for a preset as it is)."""
  preset = load_config(settings.label).to_dict()
  return {k: v for k, v in settings.to_dict().items() if preset.get(k) != v}


def _grpo_module(name: str, setting: str):
  try:
    return importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError:
    raise ValueError(f"{setting} must name a module of configs/ (e.g. grpo_tiny), got "
                     f"{name!r}.") from None


def grpo_config(settings, term: str, seed: int, *, off_policy: bool = False,
                stress: bool = False) -> ml_collections.ConfigDict:
  """The GRPO config of one run: `settings.grpo_config` (the tiny arithmetic setup) with β, the
  warm start, the term and the seed; `term` may end in "@<reward_stage>" or "@<reward_at>"
  (grpo.REWARD_STAGES, grpo.REWARD_AT).

  `stress`: `settings.stress_config` instead (its own warm start, reward, learning rate, β and
  number of steps; `settings.stress_steps` > 0 overrides the latter)."""
  if stress:
    c = _grpo_module(settings.stress_config, "stress_config").get_config()
    c.num_steps = settings.stress_steps or c.num_steps
  else:
    c = _grpo_module(settings.grpo_config, "grpo_config").get_config()
    c.num_steps = settings.steps
    c.sft.steps = settings.sft_steps
    c.kl.beta = settings.beta
  c.seed = seed
  c.checkpoint_every = max(c.num_steps // 4, 1)
  c.data.data_dir = os.fspath(paths.resolve(settings.data_dir))
  from kljax.train import grpo

  term, _, suffix = term.partition("@")
  c.kl.term = term
  c.kl.reward_stage = suffix if suffix in grpo.REWARD_STAGES else "after_norm"
  c.kl.reward_at = suffix if suffix in grpo.REWARD_AT else "rollout"
  if suffix and suffix not in grpo.REWARD_STAGES + grpo.REWARD_AT:
    raise ValueError(f"variant {term}@{suffix}: the part after '@' must be one of "
                     f"{', '.join(grpo.REWARD_STAGES + grpo.REWARD_AT)}.")
  c.mesh.devices = 1
  c.metrics.tensorboard = False
  if off_policy:
    c.loss.epochs = settings.off_policy_epochs
    c.loss.minibatches = settings.off_policy_minibatches
  return c
