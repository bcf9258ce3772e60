"""The KL term as the trainer sees it: one interface whatever the term's kind.

The trainer asks a `KLObjective` the same few things at fixed points of a step, and never looks
at the term's kind itself:

  host, before the group normalization   shape_rewards(rewards_gk, beta, stats, mask)
  host, after it                         shape_advantages(advantages_bt, beta, stats, mask)
  in the loss (traced)                   loss_advantages(advantages, beta, logp, old, ref, mask)
                                         loss(inputs) -> (per-token KL loss or None, aux)
  host, the batch                        batch_extras(seed, step, rows)
  host, the metrics                      clamp_metrics(logp, ref_logp, mask)

and reads three facts: whether the rollout statistics pass must run on-policy
(`stats_on_policy`), whether the loss needs the reference's hidden states (`reference_states`),
and whether it needs the exact full-vocabulary KL columns (`exact_columns`). `of(options)` builds
the one object of a run at the config boundary: adding a kind of term means a class here, not a
branch in the trainer.

The kinds: no term (`NoKL`); a per-token term in the loss (`LossKL`); an in-reward term
subtracted after the group normalization (`AfterNormKL`) or from the reward before it
(`BeforeNormKL`); a term over the whole next-token distribution (`FullKL`, `kljax.full_kl`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kljax.full_kl import FullKLTerm
from kljax.kl import KLTerm
from kljax.train.devices import to_host

# Where an in-reward KL term (placement "reward") enters the advantage; k_t is the term's per-token
# value, c_t its coefficient (token or reward-to-go credit), σ_g the group's reward std:
#   "after_norm":  A_{i,t} = (r_i − mean_g r)/σ_g − β·c_{i,t}. The KL part of the gradient is
#                  β·E[c_t ∇log π(y_t)], independent of the group statistics, so k1_in_reward ≡
#                  k2_as_loss holds exactly (Thm 5.1). OpenRLHF's order (normalize, then add the
#                  per-token KL) with reward-to-go credit is k1_in_reward_rtg here.
#   "before_norm": r'_i = r_i − β·Σ_t k_{i,t}, then A_i = (r'_i − mean_g r')/σ'_g for every token
#                  (verl's order): whole-sequence credit, each token's score weighted by the whole
#                  sequence's KL; the effective β is β/σ'_g, so it changes from group to group and
#                  grows as the group's rewards agree.
REWARD_STAGES = ("after_norm", "before_norm")
# When an after-norm in-reward penalty c_t is computed, off-policy (epochs or minibatches > 1):
#   "rollout": once, from the rollout policy π_old's log-probs (on the host, `shape_advantages`),
#              and held over every epoch and minibatch, as verl's apply_kl_penalty does. The PPO
#              ratio ρ_t then weighs sg(c(π_old)): for k1 the expected gradient is
#              ∇RKL − ∇KL(π‖π_old) per position, biased as soon as π ≠ π_old.
#   "current": recomputed at the parameters being updated in every minibatch loss
#              (`loss_advantages`): sg(c(π_θ))·ρ_t. Token credit then follows each position's ∇RKL
#              with prefixes from π_old (one token: ∇RKL exactly); reward-to-go stays biased
#              off-policy, because its later tokens keep π_old's law (tests/test_reward_at.py
#              proves both by enumeration).
# On-policy the two are the same. Inside the PPO clip range only: a clipped token loses its
# penalty's gradient too.
REWARD_AT = ("rollout", "current")


class LossInputs(NamedTuple):
  """What the minibatch loss hands a term: the policy's `token_stats` and states, the
  reference's view (None when the loss does not run the reference), the log-probs and the batch."""
  stats: Any  # logprobs.TokenStats of the policy
  hidden_btd: jax.Array
  unembed_dv: jax.Array
  ref: Any  # loss.Reference, or None
  ref_logp: jax.Array
  old_logp: jax.Array
  mask: jax.Array
  batch: dict
  chunk_size: int


@dataclasses.dataclass(frozen=True)
class KLObjective:
  """No KL term: the defaults every kind starts from (nothing shaped, no loss, no extras)."""
  stats_on_policy = False  # the rollout statistics pass runs on-policy too
  reference_states = False  # the loss runs the reference's forward pass itself, on- and off-policy
  exact_columns = False  # the loss needs the exact full-vocabulary KL columns

  def shape_rewards(self, rewards_gk: np.ndarray, beta, stats, mask) -> np.ndarray:
    return rewards_gk

  def shape_advantages(self, advantages_bt: np.ndarray, beta, stats, mask) -> np.ndarray:
    return advantages_bt

  def loss_advantages(self, advantages_bt, beta, logp_bt, old_logp_bt, ref_logp_bt, mask_bt):
    return advantages_bt

  def loss(self, x: LossInputs) -> tuple[jax.Array | None, dict]:
    return None, {}

  def batch_extras(self, seed: int, step: int, rows: int) -> dict:
    return {}

  def clamp_metrics(self, logp, ref_logp, mask) -> dict:
    return {}


NoKL = KLObjective


@dataclasses.dataclass(frozen=True)
class _TokenKL(KLObjective):
  """A per-token `KLTerm`: counts what its value clamp touches, if it has one."""
  term: KLTerm

  def clamp_metrics(self, logp, ref_logp, mask) -> dict:
    if self.term.count_clamped is None:
      return {}
    return {"kl_value_clamped_tokens": float(self.term.count_clamped(logp, ref_logp, mask=mask))}


@dataclasses.dataclass(frozen=True)
class LossKL(_TokenKL):
  """A term placed in the loss: β·agg(surrogate(logp, ref_logp, old_logp))."""

  def loss(self, x: LossInputs) -> tuple[jax.Array, dict]:
    t = self.term
    return (t.surrogate(x.stats.logp, x.ref_logp, x.old_logp, mask=x.mask),
            {"kl_grad_zeroed_fraction": kl_grad_zeroed_fraction(t, x.stats.logp, x.ref_logp,
                                                                x.old_logp, x.mask)})


@dataclasses.dataclass(frozen=True)
class AfterNormKL(_TokenKL):
  """An in-reward term subtracted per token after the group normalization: in the loss on-policy
  or with reward_at="current" (at the parameters being updated), else once on the host from the
  rollout policy's log-probs (REWARD_AT)."""
  in_loss: bool = True  # on-policy, or reward_at="current"
  reward_at: str = "rollout"

  def shape_advantages(self, advantages_bt, beta, stats, mask):
    if self.in_loss:
      return advantages_bt
    return to_host(kl_in_advantages(self.term, advantages_bt, to_host(beta), stats["logp"],
                                    stats["ref_logp"], mask))

  def loss_advantages(self, advantages_bt, beta, logp_bt, old_logp_bt, ref_logp_bt, mask_bt):
    if not self.in_loss:
      return advantages_bt
    return penalized_advantages(self.term, advantages_bt, beta, logp_bt, old_logp_bt,
                                ref_logp_bt, mask_bt, reward_at=self.reward_at)


@dataclasses.dataclass(frozen=True)
class BeforeNormKL(_TokenKL):
  """An in-reward term subtracted from the reward before the group normalization (verl's order),
  which needs the rollout's statistics on-policy too."""
  stats_on_policy = True

  def shape_rewards(self, rewards_gk, beta, stats, mask):
    return kl_in_reward(self.term, rewards_gk, to_host(beta), stats["logp"], stats["ref_logp"],
                        mask)


@dataclasses.dataclass(frozen=True)
class FullKL(KLObjective):
  """A term over the whole next-token distribution (`kljax.full_kl`): β·agg(surrogate(KL_t, logp,
  old_logp)) with KL_t from the policy's and the reference's hidden states; off-policy the
  Rao-Blackwellized term corrects its prefixes with π_θ/π_old. A top-k estimate draws its tail
  with a seed a row (`batch_extras`)."""
  term: FullKLTerm
  on_policy: bool = True
  reference_states = True

  @property
  def exact_columns(self) -> bool:
    return self.term.top_k is None

  def loss(self, x: LossInputs) -> tuple[jax.Array, dict]:
    kl_bt = self._position_kl(x)
    n = jnp.maximum(jnp.sum(x.mask), 1)
    value = jnp.sum(jnp.where(x.mask, jax.lax.stop_gradient(kl_bt), 0.0)) / n
    return (self.term.surrogate(kl_bt, x.stats.logp, None if self.on_policy else x.old_logp,
                                mask=x.mask),
            {"kl_term_value": value})

  def _position_kl(self, x: LossInputs) -> jax.Array:
    """KL_t [B, N], differentiable in the policy: the exact column of the stats (computed with
    the reference), or the top-k + tail estimate keyed by the minibatch's first row's seed."""
    t = self.term
    if t.top_k is None:
      return x.stats.reverse_kl if t.direction == "reverse" else x.stats.forward_kl
    key = jax.random.fold_in(jax.random.PRNGKey(0), x.batch["kl_seed"][0])
    return t.position_kl(x.hidden_btd, x.unembed_dv, x.ref.hidden_btd, x.ref.unembed_dv, key=key,
                         chunk_size=x.chunk_size)

  def batch_extras(self, seed: int, step: int, rows: int) -> dict:
    return {} if self.term.top_k is None else {"kl_seed": kl_seeds(seed, step, rows)}


def of(term: KLTerm | FullKLTerm | None, *, on_policy: bool, reward_stage: str = "after_norm",
       reward_at: str = "rollout") -> KLObjective:
  """The objective of a run's KL term (None: no term), given how its updates see the rollout
  (`on_policy`) and, for an in-reward term, `reward_stage` and `reward_at`."""
  if term is None:
    return NoKL()
  if isinstance(term, FullKLTerm):
    return FullKL(term, on_policy)
  if term.placement == "loss":
    return LossKL(term)
  if reward_stage == "before_norm":
    return BeforeNormKL(term)
  return AfterNormKL(term, in_loss=on_policy or reward_at == "current", reward_at=reward_at)


def kl_in_advantages(term: KLTerm, advantages_bt, beta, logp_bt, ref_logp_bt, mask_bt):
  """In-reward KL after the group normalization ("after_norm"): A_{i,t} − β·c_{i,t}, with c_t the
  term's coefficient at the rollout policy (token or reward-to-go credit). [B, N]"""
  return advantages_bt - beta * term.coefficient(logp_bt, ref_logp_bt, mask=mask_bt)


def penalized_advantages(term: KLTerm, advantages_bt, beta, logp_bt, old_logp_bt, ref_logp_bt,
                         mask_bt, *, reward_at: str):
  """An after-norm in-reward penalty inside the loss: A − β·c(π_old) (`reward_at="rollout"`, the
  penalty of the rollout policy) or A − β·c(sg π_θ) (`"current"`, recomputed at the parameters
  being updated). See REWARD_AT. [B, N]"""
  at = old_logp_bt if reward_at == "rollout" else jax.lax.stop_gradient(logp_bt)
  return kl_in_advantages(term, advantages_bt, beta, at, ref_logp_bt, mask_bt)


def kl_in_reward(term: KLTerm, rewards_gk, beta, logp_bt, ref_logp_bt, mask_bt):
  """In-reward KL before the group normalization ("before_norm", verl's order):
  r'_i = r_i − β·Σ_t k_{i,t}, on the host. `rewards_gk` [prompts, G]."""
  k_bt = to_host(term.value(logp_bt, ref_logp_bt, mask=mask_bt))
  return rewards_gk - beta * (k_bt * mask_bt).sum(1).reshape(rewards_gk.shape)


def kl_grad_zeroed_fraction(term: KLTerm, logp, ref_logp, old, mask) -> jax.Array:
  """Tokens whose KL-term gradient is exactly zero although π ≠ π_ref there (e.g. the clipped
  head once the ratio has left the clip range): the fraction a correction removed."""
  lp0 = jax.lax.stop_gradient(logp)
  g = jax.grad(lambda l: jnp.sum(term.surrogate(l, ref_logp, old, mask=mask)))(lp0)
  live = mask.astype(bool) & (lp0 != ref_logp)
  return jnp.sum(live & (g == 0)) / jnp.maximum(jnp.sum(live), 1)


def kl_seeds(seed: int, step: int, n: int) -> np.ndarray:
  """int32 [n]: one seed per completion for a sampled (top-k) KL term's draws, a function of
  (seed, step) so that a resumed run draws what an uninterrupted one would."""
  return np.random.default_rng([seed, step, 7]).integers(0, 2**31 - 1, n, dtype=np.int32)
