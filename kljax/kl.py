"""KL-term transforms: where an estimator is placed decides which gradient is followed.

A `KLTerm` bundles three pure functions of per-element log-probabilities:

  surrogate(logp, ref_logp, old_logp=None, *, mask=None)
      a per-element loss whose gradient w.r.t. `logp` is this choice's KL-gradient contribution
      (before β and aggregation). `old_logp=None` means on-policy (samples from π_θ itself).
  coefficient(logp, ref_logp, *, mask=None)
      the on-policy gradient coefficient of *this* surrogate: ∂Σ surrogate/∂logp = c elementwise,
      so its expected gradient is E[c·∇logp]. Tested against `jax.grad` for every name.
  value(logp, ref_logp, *, mask=None)
      the KL estimate reported as a metric.

Every placement is "coefficient × score" (Liu et al. 2025, §4):
  k_n in reward:  surrogate sg(k_n)·ρ            c = k_n
  k_n as loss:    surrogate k_n(logp)             c = ∂k_n/∂logp
with ρ = π_θ/π_old = exp(logp − sg(old_logp)) (equal to 1, with gradient ∇logp, on-policy).

Off-policy corrections for as-loss terms (y ~ π_old), with their on-policy coefficient c:
  "detached_ratio"  sg(ρ)·k_n                      c = ∂k_n/∂logp      (k2 → exact ∇RKL)
  "ratio"           ρ·k_n, ρ live                  c = ∂k_n/∂logp + k_n
                    A live ratio changes the gradient on-policy too (ρ ≡ 1 but ∇ρ = ∇logp, the
                    product rule): k3 → c = −log δ, exact ∇RKL (∇E_old[ρ k3] = ∇E_θ[k3] = ∇RKL);
                    k2 → c = k1 + k2, biased even on-policy; k1 → c = 1 + k1, ∇RKL (E[∇logp] = 0).
  "clipped"         max(ρ·c', clip(ρ, 1−ε_low, 1+ε_high)·c'),  c' = sg(∂k_n/∂logp), c = c'
                    (the paper's clipped head, a PPO head with "advantage" −c'). Its gradient is
                    sg(ρ)·c'·∇logp except where the clip is active *and* moving further would lower
                    the loss: for c' > 0 when ρ < 1 − ε_low, for c' < 0 when ρ > 1 + ε_high. There
                    it is cut to zero; on the other side of the range it flows, as in PPO.
In-reward terms are importance-weighted by ρ whenever `old_logp` is given.

Value clamp ("k3_as_loss+value_clamp", verl's default `low_var_kl` used as a loss): the surrogate is
clip(k3, −10, 10). Inside the clamp its gradient is k3's, so on-policy it follows the frozen-prefix
∇FKL like "k3_as_loss"; where k3 > 10 (log δ > ≈2.61 or < ≈−11) the gradient is zero, and
`term.count_clamped(logp, ref_logp, mask=...)` counts those tokens for the metrics.

Masks: where `mask` is False the inputs are replaced by 0 *before* any maths, so a −inf log-prob at
a padded position gives a 0 output and a 0 gradient, never a NaN. Clamps follow the rule of
`kljax.estimators` (only what would overflow; never a zero gradient that is finite in exact
arithmetic).

Stop-gradients: `ref_logp` and `old_logp` are always treated as data (`jax.lax.stop_gradient`), so a
reference computed from shared parameters never leaks gradient.

References:
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), Table 1, Thm 5.1, §6.
  Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (2017) (clipping).
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax import estimators as est
from kljax import full_kl
from kljax.advantages import reward_to_go
from kljax.estimators import importance_ratio

CorrectionName = Literal["detached_ratio", "ratio", "clipped"] | None
CORRECTIONS = ("detached_ratio", "ratio", "clipped")


class Estimator(Protocol):
  """An elementwise KL estimator `(logp, ref_logp) -> per-element estimate`, like `kljax.k3`."""

  def __call__(self, logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array: ...


class KLTerm(NamedTuple):
  """A KL implementation choice as pure functions. See the module docstring for the contract."""

  name: str
  placement: Literal["loss", "reward"]
  surrogate: Callable[..., jax.Array]
  coefficient: Callable[..., jax.Array]
  value: Callable[..., jax.Array]
  # (logp, ref_logp, *, mask=None) -> int32 count of the elements a value clamp cut (their
  # gradient is zero), for the terms that clamp their value ("k3_as_loss+value_clamp"); else None.
  count_clamped: Callable[..., jax.Array] | None = None


def _inputs(logp, ref_logp, old_logp=None, mask=None):
  """Float32 inputs with ref/old detached (`old_logp` stays None on-policy), masked to 0 where
  `mask` is False before any maths (so −inf there cannot make a NaN value or gradient)."""
  logp = _checks.as_float32(logp, "logp")
  ref_logp = _checks.as_float32(ref_logp, "ref_logp")
  if old_logp is not None:
    old_logp = jax.lax.stop_gradient(_checks.as_float32(old_logp, "old_logp"))
  if mask is not None:
    mask = jnp.asarray(mask)
  _checks.same_shape(logp=logp, ref_logp=ref_logp, old_logp=old_logp, mask=mask)
  if mask is not None:
    keep = mask.astype(bool)
    logp, ref_logp = jnp.where(keep, logp, 0.0), jnp.where(keep, ref_logp, 0.0)
    old_logp = None if old_logp is None else jnp.where(keep, old_logp, 0.0)
  return logp, jax.lax.stop_gradient(ref_logp), old_logp, mask


def _masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  return x if mask is None else jnp.where(mask.astype(bool), x, 0.0)


def score_coefficient(estimator: Estimator, logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """∂k/∂logp per element, by forward-mode autodiff of the (elementwise) estimator."""
  return jax.jvp(lambda lp: estimator(lp, ref_logp), (logp,), (jnp.ones_like(logp),))[1]


def _estimator_name(estimator: Estimator) -> str:
  base = estimator.func if isinstance(estimator, functools.partial) else estimator
  return getattr(base, "__name__", "estimator")


def as_loss(
    estimator: Estimator,
    *,
    correction: CorrectionName = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
    name: str | None = None,
) -> KLTerm:
  """"k_n as loss": differentiate the estimator itself; gradient E[(∂k_n/∂logp)·∇logp].

  On-policy: k1 → 0 (no regularization), k2 → ∇KL(π_θ‖π_ref), k3 → ∇KL(π_ref‖π_θ) (forward KL).

  Args:
    estimator: an elementwise estimator such as `kljax.k2`.
    correction: None, "detached_ratio", "ratio" or "clipped" (see the module docstring).
      "detached_ratio" and "clipped" change only the off-policy gradient; "ratio" (a live ρ)
      changes the on-policy gradient too: its coefficient is ∂k_n/∂logp + k_n.
    clip_eps_low, clip_eps_high: ε of the clipped head, each in (0, 1).
    clamp: log ρ above it is continued linearly (`kljax.estimators.exp_clamped`).
    name: the term's name (defaults to "<estimator>_as_loss[+correction]").
  """
  if correction is not None and correction not in CORRECTED:
    raise ValueError(
        f"correction must be None or one of {', '.join(CORRECTIONS)}; got {correction!r}."
    )
  _checks.open_unit(clip_eps_low, "clip_eps_low")
  _checks.open_unit(clip_eps_high, "clip_eps_high")
  _checks.positive(clamp, "clamp")
  if name is None:
    name = f"{_estimator_name(estimator)}_as_loss" + (f"+{correction}" if correction else "")
  corrected = CORRECTED[correction]
  clip = (1.0 - clip_eps_low, 1.0 + clip_eps_high)

  def value(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return _masked(estimator(logp, ref_logp), mask)

  def coefficient(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return _masked(jax.lax.stop_gradient(corrected.coefficient(estimator, logp, ref_logp)), mask)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    logp, ref_logp, old_logp, mask = _inputs(logp, ref_logp, old_logp, mask)
    rho = importance_ratio(logp, old_logp, clamp=clamp)
    return _masked(corrected.surrogate(estimator, logp, ref_logp, rho, clip), mask)

  return KLTerm(name, "loss", surrogate, coefficient, value)


class Correction(NamedTuple):
  """An off-policy correction of an as-loss term, as its two formulas."""

  # (k, logp, ref_logp, ρ, (1−ε_low, 1+ε_high)) -> per-element surrogate
  surrogate: Callable[..., jax.Array]
  # (k, logp, ref_logp) -> its on-policy coefficient ∂surrogate/∂logp (ρ ≡ 1, ∇ρ = ∇logp)
  coefficient: Callable[..., jax.Array]


def _uncorrected(k, logp, ref_logp, rho, clip):
  del rho, clip
  return k(logp, ref_logp)


def _detached_ratio(k, logp, ref_logp, rho, clip):
  del clip
  return jax.lax.stop_gradient(rho) * k(logp, ref_logp)


def _live_ratio(k, logp, ref_logp, rho, clip):
  del clip
  return rho * k(logp, ref_logp)


def _clipped_head(k, logp, ref_logp, rho, clip):
  # A PPO head with "advantage" −c'; max() because this is a loss.
  c = jax.lax.stop_gradient(score_coefficient(k, logp, ref_logp))
  return jnp.maximum(rho * c, jnp.clip(rho, *clip) * c)


def _score_plus_value(k, logp, ref_logp):
  # The product rule: ∇(ρ·k) = k·∇ρ + ρ·∇k, and ∇ρ = ∇logp on-policy.
  return score_coefficient(k, logp, ref_logp) + k(logp, ref_logp)


CORRECTED = {
    None: Correction(_uncorrected, score_coefficient),
    "detached_ratio": Correction(_detached_ratio, score_coefficient),
    "ratio": Correction(_live_ratio, _score_plus_value),
    "clipped": Correction(_clipped_head, score_coefficient),
}
"""Correction name (None: uncorrected) -> its `Correction`."""


def _reward_to_go(c, mask):
  if c.ndim < 1:
    raise ValueError("reward-to-go credit needs a time axis (the last axis), got a scalar.")
  return reward_to_go(c, mask)


CREDITED = {"token": _masked, "reward_to_go": _reward_to_go}
"""Credit name -> (per-token penalty, mask) -> the per-token coefficient of an in-reward term."""


def in_reward(
    estimator: Estimator,
    *,
    credit: Literal["token", "reward_to_go"] = "token",
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
    name: str | None = None,
) -> KLTerm:
  """"k_n in reward": a detached penalty times the score; gradient E[sg(c)·∇logp], c = k_n.

  With credit="reward_to_go" the coefficient of token t is Σ_{s≥t} k_n,s over the valid tokens of
  the last (time) axis, which for k1 makes the per-token surrogate follow the exact gradient of the
  *sequence* reverse KL. With `old_logp` the score is importance-weighted: sg(c)·ρ.

  Args:
    estimator: an elementwise estimator such as `kljax.k1`.
    credit: "token" (immediate) or "reward_to_go" (the last axis is time; `mask` marks valid tokens).
    clamp: log ρ above it is continued linearly (`kljax.estimators.exp_clamped`).
    name: defaults to "<estimator>_in_reward" (+"_rtg" for reward-to-go credit).
  """
  if credit not in CREDITED:
    raise ValueError(f"credit must be one of {', '.join(CREDITED)}; got {credit!r}.")
  _checks.positive(clamp, "clamp")
  credited = CREDITED[credit]
  if name is None:
    name = f"{_estimator_name(estimator)}_in_reward" + ("_rtg" if credit == "reward_to_go" else "")

  def value(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return _masked(estimator(logp, ref_logp), mask)

  def coefficient(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return credited(jax.lax.stop_gradient(estimator(logp, ref_logp)), mask)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    c = coefficient(logp, ref_logp, mask=mask)
    logp, _, old_logp, mask = _inputs(logp, ref_logp, old_logp, mask)
    return _masked(c * importance_ratio(logp, old_logp, clamp=clamp), mask)

  return KLTerm(name, "reward", surrogate, coefficient, value)


def straight_through(
    *,
    value: Estimator,
    grad: Estimator,
    correction: CorrectionName = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
    name: str | None = None,
) -> KLTerm:
  """"Value k_a, gradient k_b": an as-loss term whose forward value is k_a and gradient that of k_b.

  Estimator used: k_b + sg(k_a − k_b). E.g. value=k3, grad=k2 reports the unbiased, non-negative k3
  while following ∇KL(π_θ‖π_ref) like k2 as loss. Other arguments as for `as_loss`.
  """
  value_fn, grad_fn = value, grad

  def st_estimator(logp, ref_logp):
    g = grad_fn(logp, ref_logp)
    return g + jax.lax.stop_gradient(value_fn(logp, ref_logp) - g)

  if name is None:
    name = f"{_estimator_name(value_fn)}_value_{_estimator_name(grad_fn)}_grad" + (
        f"+{correction}" if correction else ""
    )
  return as_loss(
      st_estimator,
      correction=correction,
      clip_eps_low=clip_eps_low,
      clip_eps_high=clip_eps_high,
      clamp=clamp,
      name=name,
  )


# ---- The config boundary: the one place where names become functions. ----
# Each pattern maps straight to a factory `(name, estimators, correction, *, clip_eps_low,
# clip_eps_high, clamp) -> KLTerm`; the estimators are the `k[123]` groups of the name, in order.


def _as_loss_term(name, ks, correction, **options):
  return as_loss(ks[0], correction=correction, name=name, **options)


def _in_reward_term(credit):
  def make(name, ks, correction, *, clamp, **_):
    if correction:
      raise _unknown(
          name, "in-reward terms take no correction: with old_logp they are importance-weighted"
      )
    return in_reward(ks[0], credit=credit, clamp=clamp, name=name)

  return make


def _straight_through_term(name, ks, correction, **options):
  if _estimator_name(ks[0]) == _estimator_name(ks[1]):
    raise _unknown(name, "value and gradient estimators must differ; use the as-loss name")
  return straight_through(value=ks[0], grad=ks[1], correction=correction, name=name, **options)


def _value_clamped_k3_term(name, ks, correction, *, clamp, **options):
  """verl's `low_var_kl` as loss: k3 clipped to [−10, 10]; frozen-prefix ∇FKL inside the clamp,
  zero gradient outside it; `term.count_clamped` counts the clamped elements."""
  del ks, correction
  estimator = functools.partial(est.k3_value_clamped, clamp=clamp)
  term = as_loss(estimator, clamp=clamp, name=name, **options)

  def count_clamped(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return est.count_value_clamped(logp, ref_logp, mask=mask)

  return term._replace(count_clamped=count_clamped)


_EST = r"(k[123])"
_CORRECTION = rf"(?:\+({'|'.join(CORRECTIONS)}))?"
_PATTERNS = {
    re.compile(rf"^{_EST}_as_loss{_CORRECTION}$"): _as_loss_term,
    re.compile(rf"^{_EST}_in_reward{_CORRECTION}$"): _in_reward_term("token"),
    re.compile(rf"^{_EST}_in_reward_rtg{_CORRECTION}$"): _in_reward_term("reward_to_go"),
    re.compile(rf"^{_EST}_value_{_EST}_grad{_CORRECTION}$"): _straight_through_term,
    re.compile(r"^k3_as_loss\+value_clamp$"): _value_clamped_k3_term,
}
VALUE_CLAMPED = ("k3_as_loss+value_clamp",)
"""The names whose value is clamped (verl's `low_var_kl`), outside the estimator × placement grid."""


def kl_term_names() -> tuple[str, ...]:
  """Every name `kl_term` accepts."""
  names = []
  for k in est.ESTIMATORS:
    names += [f"{k}_as_loss", f"{k}_in_reward", f"{k}_in_reward_rtg"]
  names += [f"{a}_value_{b}_grad" for a in est.ESTIMATORS for b in est.ESTIMATORS if a != b]
  with_corrections = [n for n in names if "in_reward" not in n]
  names += [f"{n}+{c}" for n in with_corrections for c in CORRECTIONS]
  return tuple(names) + VALUE_CLAMPED


_FULL = re.compile(r"^(exact|top([1-9][0-9]*))_(rkl|fkl)_(as_loss|rb)$")
FULL_KL_NAMES = ("exact_rkl_as_loss", "exact_fkl_as_loss", "exact_rkl_rb", "top64_rkl_as_loss",
                 "top64_rkl_rb")
"""Terms over the whole next-token distribution (`kljax.full_kl.FullKLTerm`, placement "full"),
outside the per-token grid: they need hidden states, not per-token log-probs. "top<k>" takes any
k ≥ 1 (top8, top512, ...); the forward direction is exact and as loss only."""


def _full_kl_term(name: str, m: re.Match, clamp: float):
  top_k = None if m.group(1) == "exact" else int(m.group(2))
  direction = "reverse" if m.group(3) == "rkl" else "forward"
  credit = "sequence" if m.group(4) == "rb" else "position"
  try:
    return full_kl.full_kl_term(direction=direction, credit=credit, top_k=top_k, clamp=clamp,
                                name=name)
  except ValueError as err:
    raise _unknown(name, str(err)) from None


def _unknown(name: str, why: str) -> ValueError:
  bases = [n for n in kl_term_names() if "+" not in n]
  return ValueError(
      f"unknown KL term {name!r} ({why}). Valid names: {', '.join(bases)}; the as-loss and "
      f"straight-through ones optionally followed by one of "
      f"{', '.join('+' + c for c in CORRECTIONS)} (e.g. 'k2_as_loss+detached_ratio'); and "
      f"{', '.join(VALUE_CLAMPED)} (verl's value-clamped k3); and the per-position exact terms "
      f"{', '.join(FULL_KL_NAMES)} (top<k> for any k >= 1)."
  )


def kl_term(
    name: str,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
) -> KLTerm | full_kl.FullKLTerm:
  """Resolves a config string such as "k2_as_loss+detached_ratio" into a `KLTerm`, or a name of
  `FULL_KL_NAMES` into a `kljax.full_kl.FullKLTerm`.

  Args:
    name: "<k>_as_loss", "<k>_in_reward", "<k>_in_reward_rtg" or "<ka>_value_<kb>_grad" with
      k ∈ {k1, k2, k3}, the loss-placed ones optionally suffixed "+detached_ratio", "+ratio" or
      "+clipped"; or "k3_as_loss+value_clamp" (verl's `low_var_kl` as loss: k3 clipped to
      [−10, 10], `kljax.estimators.k3_value_clamped`; it follows the frozen-prefix ∇FKL inside the
      clamp and has zero gradient outside it, and `term.count_clamped` counts the clamped tokens).
      `kl_term_names()` lists them all. Or a term over the whole next-token distribution,
      `FULL_KL_NAMES` (a `kljax.full_kl.FullKLTerm`, placement "full"):
        exact_rkl_as_loss   Σ_t KL(π_θ‖π_ref) per position as loss → frozen-prefix ∇RKL
        exact_fkl_as_loss   Σ_t KL(π_ref‖π_θ) per position as loss → frozen-prefix ∇FKL
        exact_rkl_rb        + reward-to-go of the future exact KLs (Rao-Blackwellized) →
                            ∇RKL of the sequence, on-policy and (cumulative ratio) off-policy
        top<k>_rkl_as_loss, top<k>_rkl_rb   the same with the top-k + tail estimate of KL_t
    clip_eps_low, clip_eps_high: ε of the clipped head.
    clamp: the exponent above which k3's δ and every importance ratio are continued linearly
      (`kljax.estimators.exp_clamped`).
  Raises:
    ValueError naming the valid names for an unknown name.
  """
  if not isinstance(name, str):
    raise TypeError(f"name must be a string such as 'k2_as_loss', got {type(name).__name__}.")
  name = name.strip()
  full = _FULL.match(name)
  if full is not None:
    return _full_kl_term(name, full, clamp)
  for pattern, make in _PATTERNS.items():
    m = pattern.match(name)
    if m is None:
      continue
    *ks, correction = m.groups() if m.re.groups else (None,)
    fns = [est.ESTIMATORS[k] for k in ks]
    fns = [functools.partial(f, clamp=clamp) if f is est.k3 else f for f in fns]
    return make(name, fns, correction, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                clamp=clamp)
  _, _, correction = name.partition("+")
  if correction and correction not in CORRECTIONS:
    raise _unknown(name, f"unknown correction {correction!r}")
  raise _unknown(name, "no such estimator placement")
