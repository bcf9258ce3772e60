"""kljax: KL-regularized RL fine-tuning in JAX, where the KL you configure is the KL you descend.

The public surface (README "Using it"; kljax.audit for "which divergence does this code descend?"):
  estimators   k1, k2, k3, exact_kl, count_clamped
  KL terms     as_loss, in_reward, straight_through, kl_term, kl_term_names, KLTerm
  credit       reward_to_go
  β            constant_beta, scheduled_beta, adaptive_beta, beta_controller
  exact check  kljax.exact (enumeration), kljax.gradient_table (which divergence each term follows)
  full vocab   kljax.full_kl (exact per-position KL terms, Rao-Blackwellized sequence ∇RKL, top-k)
  audit        kljax.audit (python -m kljax.audit; other frameworks: kljax.audit.gallery)
"""

from kljax import exact
from kljax import full_kl
from kljax import montecarlo
from kljax.advantages import reward_to_go
from kljax.beta import (
    BetaController,
    BetaState,
    adaptive_beta,
    beta_controller,
    constant_beta,
    scheduled_beta,
)
from kljax.estimators import DEFAULT_LOG_RATIO_CLAMP, count_clamped, exact_kl, k1, k2, k3
from kljax.kl import (
    KLTerm,
    as_loss,
    importance_ratio,
    in_reward,
    kl_term,
    kl_term_names,
    straight_through,
)

__version__ = "0.1.0"

__all__ = [
    "BetaController",
    "BetaState",
    "DEFAULT_LOG_RATIO_CLAMP",
    "KLTerm",
    "adaptive_beta",
    "as_loss",
    "beta_controller",
    "constant_beta",
    "count_clamped",
    "exact",
    "exact_kl",
    "full_kl",
    "montecarlo",
    "importance_ratio",
    "in_reward",
    "k1",
    "k2",
    "k3",
    "kl_term",
    "kl_term_names",
    "reward_to_go",
    "scheduled_beta",
    "straight_through",
]
