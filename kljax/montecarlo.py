"""Monte-Carlo helpers: bias and spread of KL estimates and of sampled KL-term gradients.

For a categorical policy the exact expected gradient is known (`kljax.exact`), so the bias and the
standard deviation of the N-sample gradient can be measured, not guessed.

References:
  J. Schulman, "Approximating KL Divergence" (2020) (the Gaussian bias/std table).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax import exact
from kljax.kl import KLTerm


class ValueStats(NamedTuple):
  """Statistics of an N-sample mean estimate of a quantity whose true value is known."""

  mean: float  # mean of the per-sample values (the MC estimate of E[k])
  bias: float  # mean − true
  std: float  # standard deviation of the N-sample mean (single-sample std / √N)
  relative_bias: float  # bias / true
  relative_std: float  # std / true
  stderr: float  # standard error of `mean` itself, from all the samples given


def value_stats(values: ArrayLike, true_value: float, *, num_samples: int = 1) -> ValueStats:
  """Bias and std of an N-sample estimate, from many single-sample values.

  Args:
    values: `[M]` single-sample estimates, e.g. `kljax.k3(logp, ref_logp)` for M draws.
    true_value: the quantity being estimated (the relative figures are NaN when it is 0).
    num_samples: N, the number of samples one estimate averages.
  """
  v = _checks.as_float32(values, "values").reshape(-1)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  true_value = float(true_value)
  mean = float(jnp.mean(v))
  single_std = float(jnp.std(v))
  std = single_std / num_samples**0.5
  return ValueStats(
      mean=mean,
      bias=mean - true_value,
      std=std,
      relative_bias=(mean - true_value) / true_value if true_value else float("nan"),
      relative_std=std / true_value if true_value else float("nan"),
      stderr=single_std / v.size**0.5,
  )


def sampled_gradient(
    term: KLTerm,
    logits: ArrayLike,
    ref_logits: ArrayLike,
    key: jax.Array,
    *,
    num_samples: int,
    old_logits: ArrayLike | None = None,
) -> jax.Array:
  """The gradient w.r.t. `logits [V]` of the mean surrogate over N actions sampled from π_θ or π_old.

  On-policy the actions come from softmax(logits) (treated as data, as a sampler's output is).
  """
  logits = _checks.as_float32(logits, "logits")
  ref_logp = jax.nn.log_softmax(_checks.as_float32(ref_logits, "ref_logits"))
  _checks.same_shape(logits=logits, ref_logits=ref_logp)
  sample_logits = logits if old_logits is None else _checks.as_float32(old_logits, "old_logits")
  actions = jax.random.categorical(key, jax.lax.stop_gradient(sample_logits), shape=(num_samples,))
  old_lp = None if old_logits is None else jax.nn.log_softmax(sample_logits)[actions]

  def loss(theta):
    lp = jax.nn.log_softmax(theta)[actions]
    return jnp.mean(term.surrogate(lp, ref_logp[actions], old_lp))

  return jax.grad(loss)(logits)


class GradientStats(NamedTuple):
  bias_norm: float  # ‖E_MC[ĝ] − g‖
  std_norm: float  # √(E‖ĝ − E_MC[ĝ]‖²), the spread of one N-sample gradient
  exact_norm: float  # ‖g‖


def gradient_stats(
    term: KLTerm,
    logits: ArrayLike,
    ref_logits: ArrayLike,
    key: jax.Array,
    *,
    num_samples: int,
    num_trials: int = 1000,
    old_logits: ArrayLike | None = None,
) -> GradientStats:
  """Bias and spread of the N-sample gradient of a KL term against its exact expectation."""
  if num_samples < 1 or num_trials < 2:
    raise ValueError(
        f"need num_samples >= 1 and num_trials >= 2, got {num_samples} and {num_trials}."
    )
  keys = jax.random.split(key, num_trials)
  grads = jax.vmap(
      lambda k: sampled_gradient(
          term, logits, ref_logits, k, num_samples=num_samples, old_logits=old_logits
      )
  )(keys)
  policy = exact.categorical(logits)
  ref = exact.categorical(ref_logits)
  old = None if old_logits is None else exact.categorical(old_logits)
  g = exact.expected_gradient(term, policy, ref, old=old)[0]
  mean = jnp.mean(grads, axis=0)
  return GradientStats(
      bias_norm=float(jnp.linalg.norm(mean - g)),
      std_norm=float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads - mean), axis=-1)))),
      exact_norm=float(jnp.linalg.norm(g)),
  )
