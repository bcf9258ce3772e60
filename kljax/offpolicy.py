"""Three policies: the sampler μ, the old policy π_old and the current policy π_θ.

Rollouts may come from a policy μ that is not π_old, the policy whose log-probs the trainer
computes at the start of a step: μ may sample in bfloat16 while the trainer runs in float32, use
the parameters of k steps ago (asynchronous rollouts), or reshape π_old's distribution (a rollout
temperature ≠ 1, top_k or top_p < 1: μ ∝ filtered softmax(logits / T), whose log-probs the sampler
returns, so the same corrections apply). PPO's ratio ρ = π_θ/π_old then no longer
corrects for the sampling distribution, and every term of the loss (the policy gradient *and* the
KL term) is an expectation under μ, not π_old. The corrections here reweight each sampled token
(or sequence) by a function of the sampler→trainer ratio

  r_t = π_old(y_t | y_<t) / μ(y_t | y_<t)              (token level)
  R   = Π_t r_t = P_old(y) / P_μ(y)                      (sequence level)

and the trainer multiplies every per-token loss (PPO-clip surrogate and KL-term surrogate) by the
detached weight w before aggregating, so that E_μ[w · ∇ℓ] ≈ E_old[∇ℓ]:

  none           w = 1                                   (biased when μ ≠ π_old)
  tis_token      w_t = min(r_t, C)                       truncated IS per token
  tis_sequence   w = min(R, C), for every token of y    truncated IS per sequence
  mis_token      w_t = r_t · 1[1/C ≤ r_t ≤ C]            masked IS per token: drop the token
  mis_sequence   w = R · 1[1/C ≤ R ≤ C]                  masked IS per sequence: drop the sequence

Truncation bounds the variance at the price of a bias (towards tokens μ over-samples); masking
keeps the exact IS weight where it is moderate and removes the rest. Only sequence-level weights
are unbiased for a sequence-level objective at C = ∞ (token-level ones ignore the prefix law).

`prefix_rtg_coefficient` is the prefix-aware off-policy estimator of ∇ KL(P_θ‖P_ref) for
sequences: reward-to-go credit of k1 in which each future term carries its own cumulative
per-prefix ratio (truncated at C), unbiased at C = ∞.

References:
  Espeholt et al., "IMPALA: Scalable Distributed Deep-RL with Importance Weighted Actor-Learner
    Architectures", arXiv:1802.01561 (2018) (V-trace: truncated per-step importance weights).
  Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025, blog)
    (truncated importance sampling, TIS, for the sampler/trainer mismatch).
  Ling Team, IcePop (2025), and Liu, Li et al., "When Speed Kills Stability: Demystifying RL
    Collapse from the Training-Inference Mismatch" (2025, blog) (masked IS, token and sequence).
  Precup, Sutton, Singh, "Eligibility Traces for Off-Policy Policy Evaluation", ICML (2000)
    (per-decision importance sampling: each reward weighted by the ratio of its own prefix).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax.kl import KLTerm

Level = Literal["token", "sequence"]


class SamplerWeights(NamedTuple):
  """A correction's output for a batch `[B, T]`."""

  weights_bt: jax.Array  # float32 [B, T]: detached weight of each token's loss (0 where masked)
  corrected_fraction: jax.Array  # float32 []: tokens (or sequences) truncated/masked, of the valid


def _inputs(old_logp, sampler_logp, mask):
  old = jax.lax.stop_gradient(_checks.as_float32(old_logp, "old_logp"))
  mu = jax.lax.stop_gradient(_checks.as_float32(sampler_logp, "sampler_logp"))
  mask = jnp.ones(old.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  _checks.same_shape(old_logp=old, sampler_logp=mu, mask=mask)
  if old.ndim != 2:
    raise ValueError(f"old_logp must be [B, T], got shape {list(old.shape)}.")
  # Masked before the maths: a −inf log-prob at a padded position cannot reach exp().
  return jnp.where(mask, old - mu, 0.0), mask


def _check_cap(cap: float) -> float:
  c = float(cap)
  if not c > 1.0:  # also rejects NaN
    raise ValueError(f"cap must be a number > 1 (the ratio bound C; inf: plain IS), got {cap!r}.")
  return c


def sampler_log_ratio(old_logp: ArrayLike, sampler_logp: ArrayLike,
                      mask: ArrayLike | None = None) -> jax.Array:
  """log r_t = log π_old(y_t) − log μ(y_t), float32 `[B, T]`, 0 where `mask` is False; detached."""
  return _inputs(old_logp, sampler_logp, mask)[0]


def _level_log_ratio(log_r, mask, level):
  if level == "token":
    return log_r, mask
  if level == "sequence":
    return jnp.sum(log_r, axis=-1, keepdims=True), jnp.any(mask, axis=-1, keepdims=True)
  raise ValueError(f"level must be 'token' or 'sequence', got {level!r}.")


def _fraction(flag, valid):
  return jnp.sum(flag & valid) / jnp.maximum(jnp.sum(valid), 1)


def no_correction(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike | None = None,
                  *, cap: float = math.inf, level: Level = "token") -> SamplerWeights:
  """w = 1 at every valid token: the sampler's samples taken as π_old's. `[B, T]`."""
  del cap, level
  _, m = _inputs(old_logp, sampler_logp, mask)
  return SamplerWeights(m.astype(jnp.float32), jnp.zeros((), jnp.float32))


def truncated_is(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike | None = None,
                 *, cap: float, level: Level = "token") -> SamplerWeights:
  """Truncated importance sampling: w = min(r, C), r the token ratio r_t or the sequence ratio R.

  w_t = min(π_old(y_t)/μ(y_t), C) (level "token"), or w = min(Π_t r_t, C) on every token of the
  sequence (level "sequence"). Computed as exp(min(log r, log C)): no overflow at any ratio.
  Shapes `[B, T]`; the weights are detached.

  References: Espeholt et al. 2018 (IMPALA, V-trace's ρ̄ truncation); Yao et al. 2025 (TIS).
  """
  cap = _check_cap(cap)
  log_r, mask = _inputs(old_logp, sampler_logp, mask)
  lr, valid = _level_log_ratio(log_r, mask, level)
  w = jnp.exp(jnp.minimum(lr, math.log(cap)))
  frac = _fraction(lr > math.log(cap), valid)
  return SamplerWeights(jnp.where(mask, jnp.broadcast_to(w, mask.shape), 0.0), frac)


def masked_is(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike | None = None,
              *, cap: float, level: Level = "token") -> SamplerWeights:
  """Masked importance sampling: w = r · 1[1/C ≤ r ≤ C]; a token (or sequence) whose ratio leaves
  [1/C, C] is dropped from the loss, the others keep their exact IS weight.

  Level "token" uses r_t, level "sequence" R = Π_t r_t on every token of the sequence. Shapes
  `[B, T]`; the weights are detached.

  References: Ling Team 2025 (IcePop); Liu, Li et al. 2025 ("When Speed Kills Stability").
  """
  cap = _check_cap(cap)
  log_r, mask = _inputs(old_logp, sampler_logp, mask)
  lr, valid = _level_log_ratio(log_r, mask, level)
  keep = jnp.abs(lr) <= math.log(cap)
  w = jnp.where(keep, jnp.exp(jnp.where(keep, lr, 0.0)), 0.0)
  frac = _fraction(~keep, valid)
  return SamplerWeights(jnp.where(mask, jnp.broadcast_to(w, mask.shape), 0.0), frac)


# The config boundary: `rollout.correction` names → functions.
CORRECTIONS: dict[str, Callable[..., SamplerWeights]] = {
    "none": no_correction,
    "tis_token": functools.partial(truncated_is, level="token"),
    "tis_sequence": functools.partial(truncated_is, level="sequence"),
    "mis_token": functools.partial(masked_is, level="token"),
    "mis_sequence": functools.partial(masked_is, level="sequence"),
}


def sampler_correction(name: str, *, cap: float) -> Callable[..., SamplerWeights]:
  """The correction `name` (one of `CORRECTIONS`) with cap C, as
  `fn(old_logp, sampler_logp, mask) -> SamplerWeights`. Raises ValueError naming the valid names
  for an unknown name, and for a cap ≤ 1."""
  if name not in CORRECTIONS:
    raise ValueError(f"unknown sampler correction {name!r}; choose one of "
                     f"{', '.join(CORRECTIONS)}.")
  return functools.partial(CORRECTIONS[name], cap=_check_cap(cap))


def effective_sample_size(log_weights: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
  """Kish's effective sample size as a fraction of the sample: (Σ w)² / (n · Σ w²) ∈ (0, 1].

  From log-weights (any shape; `mask` selects the n samples), computed as
  exp(2·logsumexp(log w) − logsumexp(2·log w) − log n), so that sequence ratios far beyond the
  float range still give a finite value. It is 1 exactly when all weights are equal (μ = π_old);
  1 for an empty sample.
  """
  lw = _checks.as_float32(log_weights, "log_weights")
  m = jnp.ones(lw.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  _checks.same_shape(log_weights=lw, mask=m)
  n = jnp.sum(m)
  lw = jnp.where(m, lw, -jnp.inf)
  top = jnp.max(lw)
  lw = lw - jnp.where(n > 0, top, 0.0)  # ESS is scale-free; equal weights become exactly 0 here
  s1 = jax.nn.logsumexp(lw, where=m)
  s2 = jax.nn.logsumexp(2.0 * lw, where=m)
  ess = jnp.exp(2.0 * s1 - s2 - jnp.log(jnp.maximum(n, 1)))
  return jnp.where(n > 0, jnp.minimum(ess, 1.0), 1.0)


def diagnostics(old_logp: ArrayLike, sampler_logp: ArrayLike, mask: ArrayLike,
                weights: SamplerWeights) -> dict[str, jax.Array]:
  """Per-step sampler→trainer diagnostics (scalars):

  sampler_ess                ESS fraction of the token ratios r_t over the valid tokens
  sampler_ess_seq            ESS fraction of the sequence ratios R over the sequences
  sampler_corrected_fraction tokens (or sequences) the correction truncated or masked
  sampler_weight_mean        mean correction weight over the valid tokens
  The mean |log μ − log π_old| is the trainer's `sampler_logprob_gap`.
  """
  log_r, m = _inputs(old_logp, sampler_logp, mask)
  seq_lr, seq_m = _level_log_ratio(log_r, m, "sequence")
  w = weights.weights_bt
  return {
      "sampler_ess": effective_sample_size(log_r, m),
      "sampler_ess_seq": effective_sample_size(seq_lr, seq_m),
      "sampler_corrected_fraction": weights.corrected_fraction,
      "sampler_weight_mean": jnp.sum(jnp.where(m, w, 0.0)) / jnp.maximum(jnp.sum(m), 1),
  }


# ---- A prefix-aware off-policy sequence ∇RKL ----


def prefix_rtg_coefficient(logp: ArrayLike, sampler_logp: ArrayLike, ref_logp: ArrayLike,
                           mask: ArrayLike | None = None, *, cap: float = math.inf) -> jax.Array:
  """Per-token coefficients of an off-policy estimator of ∇ KL(P_θ‖P_ref) from y ~ μ:

    c_t = Σ_{s≥t} min(W_s, C) · k1_s,   W_s = Π_{u≤s} π_θ(y_u|y_<u)/μ(y_u|y_<u),
    k1_s = log π_θ(y_s|y_<s) − log π_ref(y_s|y_<s),

  and the gradient estimate is Σ_t c_t ∇log π_θ(y_t|y_<t) (surrogate sg(c_t)·logp_t). Why: on
  policy, ∇KL = E[Σ_t ∇log π_t · Σ_{s≥t} k1_s] (reward-to-go); the term ∇log π_t · k1_s depends
  only on y_≤s, so its expectation under μ needs the ratio of that prefix alone, W_s (per-decision
  importance sampling, Precup et al. 2000). At C = ∞ the estimator is unbiased; a finite C bounds
  each weight (IMPALA-style truncation) and trades bias for variance. Using the per-token ratio
  r_t instead of W_s ("k1_in_reward_rtg" with old_logp) is biased at any C.

  Shapes `[B, T]` (time last); float32; the coefficients are detached; 0 where `mask` is False.
  """
  cap = _check_cap(cap)
  lp = _checks.as_float32(logp, "logp")
  mu = _checks.as_float32(sampler_logp, "sampler_logp")
  ref = _checks.as_float32(ref_logp, "ref_logp")
  m = jnp.ones(lp.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  _checks.same_shape(logp=lp, sampler_logp=mu, ref_logp=ref, mask=m)
  if lp.ndim < 1:
    raise ValueError("prefix_rtg_coefficient needs a time axis (the last axis), got a scalar.")
  lp, mu, ref = (jnp.where(m, x, 0.0) for x in (lp, mu, ref))
  log_w = jnp.cumsum(lp - mu, axis=-1)  # log W_s, the prefix y_≤s
  w = jnp.exp(jnp.minimum(log_w, math.log(cap)))
  terms = jnp.where(m, w * (lp - ref), 0.0)
  c = jnp.flip(jnp.cumsum(jnp.flip(terms, -1), axis=-1), -1)
  return jax.lax.stop_gradient(jnp.where(m, c, 0.0))


def prefix_rtg_term(*, cap: float = math.inf) -> KLTerm:
  """`prefix_rtg_coefficient` as a `KLTerm` for the exact harness (`kljax.exact.expected_gradient`
  with `old=μ`): surrogate sg(c_t)·logp_t, with `old_logp` the sampler's log-probs (None: on
  policy, c_t = Σ_{s≥t} k1_s). Its coefficient and value are k1 reward-to-go and k1."""
  cap = _check_cap(cap)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    lp = _checks.as_float32(logp, "logp")
    mu = jax.lax.stop_gradient(lp) if old_logp is None else old_logp
    c = prefix_rtg_coefficient(jax.lax.stop_gradient(lp), mu, ref_logp, mask, cap=cap)
    return c * (lp if mask is None else jnp.where(jnp.asarray(mask).astype(bool), lp, 0.0))

  def coefficient(logp, ref_logp, *, mask=None):
    lp = jax.lax.stop_gradient(_checks.as_float32(logp, "logp"))
    return prefix_rtg_coefficient(lp, lp, ref_logp, mask, cap=cap)

  def value(logp, ref_logp, *, mask=None):
    k = _checks.as_float32(logp, "logp") - _checks.as_float32(ref_logp, "ref_logp")
    return k if mask is None else jnp.where(jnp.asarray(mask).astype(bool), k, 0.0)

  name = "k1_in_reward_rtg+prefix_is" + ("" if math.isinf(cap) else f"(C={cap:g})")
  return KLTerm(name, "reward", surrogate, coefficient, value)
