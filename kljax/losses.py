"""The policy-gradient loss of a GRPO step: PPO's clipped surrogate and loss aggregation.

References:
  Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (2017), Eq. 7.
  Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729 (2020) (dual clip).
  Yu et al., "DAPO", arXiv:2503.14476 (2025) (asymmetric ε_low/ε_high, token-level aggregation).
  Liu et al., "Understanding R1-Zero-Like Training", arXiv:2503.20783 (2025) (seq-mean-token-sum-norm).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax import estimators as est

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"]


class PolicyLoss(NamedTuple):
  loss_bt: jax.Array  # float32 [B, T], per-token loss (0 where mask is False)
  clipped_bt: jax.Array  # bool [B, T], where the clip (or dual clip) cut the gradient
  ppo_kl_bt: jax.Array  # float32 [B, T], log π_old − log π_θ (its mean estimates KL(π_old‖π_θ))


def ppo_clip_loss(
    logp_bt: ArrayLike,
    old_logp_bt: ArrayLike,
    advantages_bt: ArrayLike,
    mask_bt: ArrayLike,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
) -> PolicyLoss:
  """Per-token PPO clipped surrogate, with the dual clip for negative advantages.

  ρ = exp(logp − sg(old_logp));  ℓ = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high));
  for A < 0 and a dual clip c > 1: ℓ = min(ℓ, −c·A), which bounds the loss of a token whose ratio
  exploded. Advantages are detached. Shapes [B, T]; float32 math.

  Args:
    logp_bt, old_logp_bt: log π_θ and log π_old of the sampled tokens.
    advantages_bt: per-token advantages (broadcast a per-sequence one over T).
    mask_bt: True for completion tokens.
    clip_eps_low, clip_eps_high: ε's in (0, 1). dual_clip: c > 1, or None to disable.
    clamp: log ρ above it is continued linearly (`kljax.estimators.exp_clamped`).
  """
  logp = _checks.as_float32(logp_bt, "logp_bt")
  old = _checks.as_float32(old_logp_bt, "old_logp_bt")
  adv = _checks.as_float32(advantages_bt, "advantages_bt")
  mask = jnp.asarray(mask_bt)
  _checks.same_shape(logp_bt=logp, old_logp_bt=old, advantages_bt=adv, mask_bt=mask)
  _checks.open_unit(clip_eps_low, "clip_eps_low")
  _checks.open_unit(clip_eps_high, "clip_eps_high")
  if dual_clip is not None and not float(dual_clip) > 1.0:
    raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip!r}.")
  mask = mask.astype(bool)
  adv = jax.lax.stop_gradient(adv)
  # Masked before the maths: a −inf log-prob at a padded position cannot reach exp() or its gradient.
  log_ratio = jnp.where(mask, logp - jax.lax.stop_gradient(old), 0.0)
  rho = est.exp_clamped(log_ratio, clamp)
  unclipped = -adv * rho
  clipped = -adv * jnp.clip(rho, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
  loss = jnp.maximum(unclipped, clipped)
  cut = clipped > unclipped
  if dual_clip is not None:
    bound = -adv * dual_clip
    dual = (adv < 0) & (loss > bound)
    loss = jnp.where(dual, bound, loss)
    cut = cut | dual
  return PolicyLoss(jnp.where(mask, loss, 0.0), cut & mask, jnp.where(mask, -log_ratio, 0.0))


def aggregate(
    values_bt: ArrayLike,
    mask_bt: ArrayLike,
    mode: Aggregation = "token-mean",
    *,
    num_tokens: ArrayLike | None = None,
    num_sequences: ArrayLike | None = None,
    norm_length: int | None = None,
) -> jax.Array:
  """Reduces per-token values to a scalar loss.

    token-mean               Σ m·x / Σ m
    seq-mean-token-mean      (1/S) Σ_s (Σ_t m·x / Σ_t m)
    seq-mean-token-sum       (1/S) Σ_s Σ_t m·x
    seq-mean-token-sum-norm  Σ m·x / (S · L), L a constant length (Dr. GRPO)

  With minibatches, pass the *global* batch's `num_tokens` (Σ m) and `num_sequences` (S) so that
  the minibatch losses sum to the full-batch loss whatever the split and the device count.

  Args:
    values_bt: float [B, T]; mask_bt: [B, T].
    mode: one of `AGGREGATIONS`.
    num_tokens, num_sequences: optional global denominators (default: this batch's).
    norm_length: L for "seq-mean-token-sum-norm" (default T).
  """
  x = _checks.as_float32(values_bt, "values_bt")
  mask = jnp.asarray(mask_bt)
  _checks.same_shape(values_bt=x, mask_bt=mask)
  if x.ndim != 2:
    raise ValueError(f"values_bt must be [B, T], got {list(x.shape)}.")
  if mode not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}.")
  m = mask.astype(jnp.float32)
  masked = x * m
  seqs = jnp.asarray(x.shape[0] if num_sequences is None else num_sequences, jnp.float32)
  if mode == "token-mean":
    tokens = jnp.sum(m) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    return jnp.sum(masked) / jnp.maximum(tokens, 1.0)
  if mode == "seq-mean-token-mean":
    per_seq = jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jnp.sum(per_seq) / seqs
  if mode == "seq-mean-token-sum":
    return jnp.sum(masked) / seqs
  length = x.shape[1] if norm_length is None else int(norm_length)
  return jnp.sum(masked) / (seqs * length)
