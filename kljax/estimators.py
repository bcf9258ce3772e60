"""KL estimators: per-element estimates of KL(π_θ‖π_ref) from log-probabilities of samples y ~ π_θ.

Notation: `logp = log π_θ(y)`, `ref_logp = log π_ref(y)`, `log δ = ref_logp − logp`, δ = π_ref/π_θ.

Every function computes in float32 (float64 stays float64) whatever the input dtype, returns that
float32 array, and checks shapes and dtypes at trace time.

The clamp rule (`exp_clamped`, used for k3's δ and for every importance ratio): only an `exp` that
could overflow is clamped, and no gradient that is finite in exact arithmetic is set to zero.
  x ≤ clamp:  exp(x), unchanged; x → −∞ needs no clamp (exp → 0, and k3's coefficient 1 − δ → 1
              stays exact).
  x > clamp:  e^clamp · (1 + x − clamp), the tangent line at the clamp: value and slope continuous,
              slope e^clamp (finite, non-zero, the right sign), never an overflow.
`count_clamped` counts the elements with x > clamp so a trainer can log them.

References:
  J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), §3.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kljax import _checks

# exp(20) ≈ 4.9e8: far beyond any log-ratio a healthy run sees, far below float32 overflow (e^88.7).
DEFAULT_LOG_RATIO_CLAMP = 20.0
# verl's value clamp of `low_var_kl` (k3 clipped to [−10, 10]).
VALUE_CLAMP_BOUND = 10.0


def _pair(logp: ArrayLike, ref_logp: ArrayLike) -> tuple[jax.Array, jax.Array]:
  logp = _checks.as_float32(logp, "logp")
  ref_logp = _checks.as_float32(ref_logp, "ref_logp")
  _checks.same_shape(logp=logp, ref_logp=ref_logp)
  dtype = jnp.promote_types(logp.dtype, ref_logp.dtype)
  return logp.astype(dtype), ref_logp.astype(dtype)


def exp_clamped(x: jax.Array, clamp: float) -> jax.Array:
  """exp(x) for x ≤ clamp, continued by its tangent line e^clamp·(1 + x − clamp) above it.

  The gradient is exp(min(x, clamp)): never zero, never NaN (x = −inf gives 0 and gradient 0;
  x = +inf gives +inf with gradient e^clamp), so a clamped element still pulls the right way.
  """
  # A sum, not exp(min)·(1 + max): at x = +inf a product's derivative would be 0·inf = NaN.
  return jnp.exp(jnp.minimum(x, clamp)) + jnp.exp(clamp) * jnp.maximum(x - clamp, 0.0)


def _expm1_clamped(x: jax.Array, clamp: float) -> jax.Array:
  """expm1(x) with the same tangent-line continuation above `clamp` (precise where x ≈ 0)."""
  return jnp.expm1(jnp.minimum(x, clamp)) + jnp.exp(clamp) * jnp.maximum(x - clamp, 0.0)


def count_clamped(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    *,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    mask: ArrayLike | None = None,
) -> jax.Array:
  """Number of elements whose exponent ref_logp − logp exceeds `clamp` (int32 scalar).

  These are the elements `exp_clamped` continues linearly (k3's δ = exp(ref_logp − logp)). Use the
  same pair of arguments as the estimator or ratio being clamped (for an importance ratio
  ρ = π_θ/π_old = exp(logp − old_logp) pass `(old_logp, logp)`). Elements where `mask` is False are
  not counted. The lower side is never clamped, so it is never counted.
  """
  logp, ref_logp = _pair(logp, ref_logp)
  _checks.positive(clamp, "clamp")
  hit = (ref_logp - logp) > clamp
  if mask is not None:
    mask = jnp.asarray(mask)
    _checks.same_shape(logp=logp, mask=mask)
    hit = hit & mask.astype(bool)
  return jnp.sum(hit, dtype=jnp.int32)


def k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """k1 = −log δ = logp − ref_logp. Unbiased for KL(π_θ‖π_ref), high variance, can be negative.

  Args:
    logp: log π_θ(y), any shape, e.g. `[B, T]`, floating.
    ref_logp: log π_ref(y), same shape.
  Returns:
    float32 array of that shape.
  """
  logp, ref_logp = _pair(logp, ref_logp)
  return logp - ref_logp


def k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """k2 = ½ (log δ)². Biased (E[k2] ≠ KL), low variance, non-negative.

  Args and returns as for `k1`. ∂k2/∂logp = logp − ref_logp, so "k2 as loss" has the coefficient of
  "k1 in reward" (Liu et al. 2025, Thm 5.1).
  """
  logp, ref_logp = _pair(logp, ref_logp)
  return 0.5 * jnp.square(ref_logp - logp)


def k3(logp: ArrayLike, ref_logp: ArrayLike, *, clamp: float = DEFAULT_LOG_RATIO_CLAMP) -> jax.Array:
  """k3 = δ − 1 − log δ, δ = exp(log δ). Unbiased, non-negative.

  Args and returns as for `k1`. Where log δ > clamp, δ follows the clamp rule of the module
  docstring (its tangent line: the value stays finite and the gradient is 1 − e^clamp, not zero);
  `count_clamped(logp, ref_logp, clamp=clamp)` counts those elements. log δ → −∞ is exact: the
  coefficient ∂k3/∂logp = 1 − δ tends to 1.
  """
  logp, ref_logp = _pair(logp, ref_logp)
  log_delta = ref_logp - logp
  # expm1(x) − x keeps precision where δ ≈ 1 (the regime that matters near convergence).
  return _expm1_clamped(log_delta, clamp) - log_delta


def k3_value_clamped(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    *,
    bound: float = VALUE_CLAMP_BOUND,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
) -> jax.Array:
  """clip(k3, −bound, bound): verl's `low_var_kl` (its default `kl_loss_type`), k3 with a value clamp.

  k3 ≥ 0, so only the upper side acts: where k3 > bound (log δ > ≈2.61 or log δ < ≈−11 for
  bound = 10) the value is `bound` and the gradient is zero — a clamped token stops pulling. Inside
  the clamp it is k3, so "as loss" it follows the frozen-prefix ∇FKL, like `k3`. verl also clips
  log δ to [−20, 20] before the exp; that changes nothing here, since |log δ| > 20 gives k3 > 10,
  clamped either way. `count_value_clamped` counts the clamped elements.

  Args and returns as for `k1`; `clamp` as for `k3`.
  References: verl, `verl/trainer/ppo/core_algos.py`, `kl_penalty_forward` ("low_var_kl").
  """
  return jnp.clip(k3(logp, ref_logp, clamp=clamp), -bound, bound)


def count_value_clamped(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    *,
    bound: float = VALUE_CLAMP_BOUND,
    mask: ArrayLike | None = None,
) -> jax.Array:
  """Number of elements whose k3 value `k3_value_clamped` cuts at `bound` (int32 scalar).

  Their gradient is zero. Elements where `mask` is False are not counted.
  """
  _checks.positive(bound, "bound")
  hit = k3(logp, ref_logp) > bound
  if mask is not None:
    mask = jnp.asarray(mask)
    _checks.same_shape(logp=hit, mask=mask)
    hit = hit & mask.astype(bool)
  return jnp.sum(hit, dtype=jnp.int32)


def importance_ratio(
    logp: jax.Array, old_logp: jax.Array | None, *, clamp: float = DEFAULT_LOG_RATIO_CLAMP
) -> jax.Array:
  """ρ = π_θ/π_old = exp(logp − sg(old_logp)), differentiable through `logp` (the one definition:
  the KL terms' corrections and the bandit call it; the PPO head of `kljax.losses` uses the same
  clamp rule on its masked log-ratio).

  A log-ratio above `clamp` is continued linearly (`exp_clamped`: finite, non-zero gradient; count
  with `count_clamped(old_logp, logp, clamp=clamp)`). On-policy (`old_logp=None`) ρ is
  1 + logp − sg(logp): exactly 1 with gradient ∇logp, the first-order behaviour of
  exp(logp − sg(logp)) without evaluating an `exp` per token.
  """
  if old_logp is None:
    return 1.0 + (logp - jax.lax.stop_gradient(logp))
  return exp_clamped(logp - jax.lax.stop_gradient(old_logp), clamp)


def kl_from_log_probs(log_p, log_q):
  """KL(p‖q) = Σ_v p(v) (log p(v) − log q(v)) over the last axis, from normalized log-probabilities.

  The one place the exact (full-support) KL is written: `exact_kl`, the naive reference of
  `kljax.logprobs`, `kljax.exact.per_prefix_kl` and the bandit's metrics all call it. Terms with
  p(v) = 0 contribute 0, so a −inf log-probability where p vanishes gives neither a NaN value nor a
  NaN gradient. NumPy arrays in, a NumPy float64 result out (host-side reports); JAX arrays in, a
  JAX array out (traceable; the caller chooses the dtype).
  """
  xp = np if isinstance(log_p, np.ndarray) and isinstance(log_q, np.ndarray) else jnp
  p = xp.exp(log_p)
  # where() on both branches: 0·(−inf) would otherwise give NaN values and NaN gradients.
  safe_diff = xp.where(p > 0, log_p - log_q, 0.0)
  return xp.sum(xp.where(p > 0, p * safe_diff, 0.0), axis=-1)


def exact_kl(
    logits: ArrayLike,
    ref_logits: ArrayLike,
    *,
    direction: Literal["reverse", "forward"] = "reverse",
    mask: ArrayLike | None = None,
) -> jax.Array:
  """Exact KL between the softmax distributions of two logit arrays, over the last (vocabulary) axis.

  reverse: KL(π_θ‖π_ref) = Σ_v π_θ(v) (log π_θ(v) − log π_ref(v))
  forward: KL(π_ref‖π_θ) = Σ_v π_ref(v) (log π_ref(v) − log π_θ(v))
  Terms with zero probability under the weighting distribution contribute 0 (so −inf logits, e.g. a
  masked vocabulary entry, are allowed there). The formula: `kl_from_log_probs`.

  Args:
    logits: policy logits `[..., V]`, floating (any dtype; computed in float32).
    ref_logits: reference logits, same shape.
    direction: "reverse" or "forward".
    mask: optional boolean `[...]` (logits.shape[:-1]); masked-out positions give 0.
  Returns:
    float32 `[...]`.
  """
  logits = _checks.as_float32(logits, "logits")
  ref_logits = _checks.as_float32(ref_logits, "ref_logits")
  _checks.same_shape(logits=logits, ref_logits=ref_logits)
  if logits.ndim < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {list(logits.shape)}.")
  if direction not in _DIRECTIONS:
    raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}.")
  p_logits, q_logits = _DIRECTIONS[direction](logits, ref_logits)
  kl = kl_from_log_probs(jax.nn.log_softmax(p_logits, axis=-1),
                         jax.nn.log_softmax(q_logits, axis=-1))
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != kl.shape:
      raise ValueError(
          f"mask must have shape logits.shape[:-1] = {list(kl.shape)}, got {list(mask.shape)}."
      )
    kl = jnp.where(mask.astype(bool), kl, 0.0)
  return kl


# direction -> (policy, reference) logits -> (weighting p, other q) of KL(p‖q)
_DIRECTIONS = {"reverse": lambda a, b: (a, b), "forward": lambda a, b: (b, a)}


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
