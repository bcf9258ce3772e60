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


# Suffix sums by blocks: a [b, b] triangular matmul inside each block of `_BLOCK` tokens plus a
# [n, n] one across block totals. XLA lowers cumsum to a reduce-window that is ~3× slower on CPU at
# T = 4096; two small matmuls at HIGHEST precision keep float32 accuracy on TPU/GPU as well.
_BLOCK = 64
_MAX_BLOCKS = 1024


def _suffix_sum(x: jax.Array) -> jax.Array:
  """out_t = Σ_{s≥t} x_s along the last axis."""
  t = x.shape[-1]
  n = -(-t // _BLOCK)
  if t <= 2 * _BLOCK or n > _MAX_BLOCKS:
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)
  lead = x.shape[:-1]
  padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n * _BLOCK - t)])
  blocks = padded.reshape(*lead, n, _BLOCK)
  hi = jax.lax.Precision.HIGHEST
  # within[i] = Σ_{j≥i} block[j]: tril has a 1 at [j, i] for j ≥ i.
  within = jnp.matmul(blocks, jnp.tril(jnp.ones((_BLOCK, _BLOCK), x.dtype)), precision=hi)
  # later[k] = Σ_{m>k} total[m].
  later = jnp.matmul(blocks.sum(-1), jnp.tril(jnp.ones((n, n), x.dtype), -1), precision=hi)
  return (within + later[..., None]).reshape(*lead, n * _BLOCK)[..., :t]


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
  rtg = _suffix_sum(values)
  return rtg if mask_bt is None else jnp.where(mask.astype(bool), rtg, 0.0)
