"""Credit assignment: reward-to-go along the time axis, and group advantages for GRPO and relatives.

References:
  R. J. Williams, "Simple statistical gradient-following algorithms for connectionist reinforcement
  learning", Machine Learning 8 (1992) (reward-to-go / causality of the score-function estimator).
"""

from __future__ import annotations

from typing import NamedTuple

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
  values, mask = _checks.masked_series(values_bt, mask_bt, name="values_bt", mask_name="mask_bt")
  rtg = _suffix_sum(values)
  return rtg if mask_bt is None else jnp.where(mask.astype(bool), rtg, 0.0)


# ---- Group advantages (one group = the G completions of one prompt) ----


class GroupAdvantages(NamedTuple):
  advantages_pg: jax.Array  # float32 [P, G]
  zero_variance_fraction: jax.Array  # float32 scalar: groups whose rewards are all equal


def _group_inputs(rewards_pg: ArrayLike) -> jax.Array:
  r = _checks.as_float32(rewards_pg, "rewards_pg")
  if r.ndim != 2 or r.shape[1] < 2:
    raise ValueError(
        f"rewards_pg must be [num_prompts, group_size] with group_size >= 2, got {list(r.shape)}."
    )
  return r


def _zero_variance(r: jax.Array) -> jax.Array:
  return jnp.mean(jnp.all(r == r[:, :1], axis=1).astype(jnp.float32))


def grpo_advantages(rewards_pg: ArrayLike, *, std_floor: float = 1e-6) -> GroupAdvantages:
  """GRPO: A_i = (r_i − mean_g) / max(std_g, std_floor), std with Bessel's correction (as torch).

  References: Shao et al., "DeepSeekMath", arXiv:2402.03300 (2024), §4.1.2.
  """
  r = _group_inputs(rewards_pg)
  _checks.positive(std_floor, "std_floor")
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  std = jnp.std(r, axis=1, keepdims=True, ddof=1)
  return GroupAdvantages(centered / jnp.maximum(std, std_floor), _zero_variance(r))


def dr_grpo_advantages(rewards_pg: ArrayLike) -> GroupAdvantages:
  """Dr. GRPO: A_i = r_i − mean_g (no division by the group's std, which biases toward easy/hard
  prompts).

  References: Liu et al., "Understanding R1-Zero-Like Training", arXiv:2503.20783 (2025), §3.
  """
  r = _group_inputs(rewards_pg)
  return GroupAdvantages(r - jnp.mean(r, axis=1, keepdims=True), _zero_variance(r))


def leave_one_out(rewards: ArrayLike, *, axis: int = -1) -> jax.Array:
  """r_i − mean_{j≠i} r_j along `axis`: the reward minus the mean of the others (an unbiased
  baseline, unlike the plain mean). The one definition: RLOO, the bandit and the tabular study.

  Args:
    rewards: floating, at least 2 entries along `axis` (computed in float32).
  Returns:
    float32, the shape of `rewards`.
  """
  r = _checks.as_float32(rewards, "rewards")
  n = r.shape[axis] if r.ndim else 0
  if n < 2:
    raise ValueError(f"rewards needs >= 2 entries along axis {axis} for a leave-one-out baseline, "
                     f"got shape {list(r.shape)}.")
  return r - (jnp.sum(r, axis=axis, keepdims=True) - r) / (n - 1)


def rloo_advantages(rewards_pg: ArrayLike) -> GroupAdvantages:
  """RLOO: A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_g) (leave-one-out, unbiased).

  References: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization",
  arXiv:2402.14740 (2024).
  """
  r = _group_inputs(rewards_pg)
  return GroupAdvantages(leave_one_out(r, axis=1), _zero_variance(r))


def reinforce_pp_baseline_advantages(rewards_pg: ArrayLike, *, std_floor: float = 1e-6
                                     ) -> GroupAdvantages:
  """REINFORCE++-baseline: subtract the group mean, then divide by the std over the whole batch.

  The batch statistics are global (under `jax.jit` with a sharded batch, over every device), so
  the result does not depend on the number of devices.
  References: Hu et al., "REINFORCE++", arXiv:2501.03262 (2025).
  """
  r = _group_inputs(rewards_pg)
  _checks.positive(std_floor, "std_floor")
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  return GroupAdvantages(centered / jnp.maximum(jnp.std(centered, ddof=1), std_floor),
                         _zero_variance(r))


ADVANTAGES = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def group_advantages(name: str):
  """The advantage estimator called `name` (the config boundary); ValueError lists the valid ones."""
  if name not in ADVANTAGES:
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ADVANTAGES)}.")
  return ADVANTAGES[name]
