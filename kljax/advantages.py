"""Credit assignment along the time axis.

References:
  R. J. Williams, "Simple statistical gradient-following algorithms for connectionist reinforcement
  learning", Machine Learning 8 (1992) (reward-to-go / causality of the score-function estimator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks


def reward_to_go(values_bt: ArrayLike, mask_bt: ArrayLike | None = None) -> jax.Array:
  """Reward-to-go over the last axis: out_t = Σ_{s≥t} mask_s · values_s, and 0 where mask_t is False.

  For per-token KL penalties k1_t this is the credit under which the per-token score-function
  surrogate follows the exact gradient of the *sequence* reverse KL.

  Args:
    values_bt: per-token values `[..., T]`, floating (computed in float32).
    mask_bt: optional `[..., T]` mask of valid tokens (bool or 0/1).
  Returns:
    float32 `[..., T]`.
  """
  values = _checks.as_float32(values_bt, "values_bt")
  if values.ndim < 1:
    raise ValueError(f"values_bt must have a time axis, got shape {list(values.shape)}.")
  if mask_bt is not None:
    mask = jnp.asarray(mask_bt)
    _checks.same_shape(values_bt=values, mask_bt=mask)
    values = jnp.where(mask.astype(bool), values, 0.0)
  rtg = jnp.flip(jnp.cumsum(jnp.flip(values, -1), axis=-1), -1)
  return rtg if mask_bt is None else jnp.where(mask.astype(bool), rtg, 0.0)
