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
from kljax.advantages import reward_to_go

Correction = Literal["detached_ratio", "ratio", "clipped"] | None
CORRECTIONS = ("detached_ratio", "ratio", "clipped")
CREDITS = ("token", "reward_to_go")


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


def importance_ratio(
    logp: jax.Array, old_logp: jax.Array | None, *, clamp: float = est.DEFAULT_LOG_RATIO_CLAMP
) -> jax.Array:
  """ρ = π_θ/π_old = exp(logp − old_logp), differentiable through `logp`.

  A log-ratio above `clamp` is continued linearly (`kljax.estimators.exp_clamped`: finite, non-zero
  gradient; count with `kljax.count_clamped(old_logp, logp, clamp=clamp)`). On-policy (`old_logp=None`) ρ is
  1 + logp − sg(logp): exactly 1 with gradient ∇logp, the first-order behaviour of
  exp(logp − sg(logp)) without evaluating an `exp` per token.
  """
  if old_logp is None:
    return 1.0 + (logp - jax.lax.stop_gradient(logp))
  return est.exp_clamped(logp - jax.lax.stop_gradient(old_logp), clamp)


def score_coefficient(estimator: Estimator, logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """∂k/∂logp per element, by forward-mode autodiff of the (elementwise) estimator."""
  return jax.jvp(lambda lp: estimator(lp, ref_logp), (logp,), (jnp.ones_like(logp),))[1]


def _estimator_name(estimator: Estimator) -> str:
  base = estimator.func if isinstance(estimator, functools.partial) else estimator
  return getattr(base, "__name__", "estimator")


def as_loss(
    estimator: Estimator,
    *,
    correction: Correction = None,
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
  if correction is not None and correction not in _CORRECTED:
    raise ValueError(
        f"correction must be None or one of {', '.join(CORRECTIONS)}; got {correction!r}."
    )
  _checks.open_unit(clip_eps_low, "clip_eps_low")
  _checks.open_unit(clip_eps_high, "clip_eps_high")
  _checks.positive(clamp, "clamp")
  if name is None:
    name = f"{_estimator_name(estimator)}_as_loss" + (f"+{correction}" if correction else "")
  corrected = _CORRECTED[correction]
  clip = (1.0 - clip_eps_low, 1.0 + clip_eps_high)

  def value(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return _masked(estimator(logp, ref_logp), mask)

  def coefficient(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    c = score_coefficient(estimator, logp, ref_logp)
    if correction == "ratio":  # product rule: ∇(ρ·k) = k·∇ρ + ρ·∇k, and ∇ρ = ∇logp on-policy
      c = c + estimator(logp, ref_logp)
    return _masked(jax.lax.stop_gradient(c), mask)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    logp, ref_logp, old_logp, mask = _inputs(logp, ref_logp, old_logp, mask)
    rho = importance_ratio(logp, old_logp, clamp=clamp)
    return _masked(corrected(estimator, logp, ref_logp, rho, clip), mask)

  return KLTerm(name, "loss", surrogate, coefficient, value)


# Each correction: (estimator, logp, ref_logp, ρ, (1−ε_low, 1+ε_high)) -> per-element surrogate.
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


_CORRECTED = {
    None: _uncorrected,
    "detached_ratio": _detached_ratio,
    "ratio": _live_ratio,
    "clipped": _clipped_head,
}


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
  if credit not in CREDITS:
    raise ValueError(f"credit must be one of {', '.join(CREDITS)}; got {credit!r}.")
  _checks.positive(clamp, "clamp")
  if name is None:
    name = f"{_estimator_name(estimator)}_in_reward" + ("_rtg" if credit == "reward_to_go" else "")

  def value(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    return _masked(estimator(logp, ref_logp), mask)

  def coefficient(logp, ref_logp, *, mask=None):
    logp, ref_logp, _, mask = _inputs(logp, ref_logp, mask=mask)
    c = jax.lax.stop_gradient(estimator(logp, ref_logp))
    if credit == "reward_to_go":
      if c.ndim < 1:
        raise ValueError("reward-to-go credit needs a time axis (the last axis), got a scalar.")
      return reward_to_go(c, mask)
    return _masked(c, mask)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    c = coefficient(logp, ref_logp, mask=mask)
    logp, _, old_logp, mask = _inputs(logp, ref_logp, old_logp, mask)
    return _masked(c * importance_ratio(logp, old_logp, clamp=clamp), mask)

  return KLTerm(name, "reward", surrogate, coefficient, value)


def straight_through(
    *,
    value: Estimator,
    grad: Estimator,
    correction: Correction = None,
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

_EST = r"(k[123])"
_PATTERNS = (
    (re.compile(rf"^{_EST}_as_loss$"), "as_loss"),
    (re.compile(rf"^{_EST}_in_reward$"), "in_reward"),
    (re.compile(rf"^{_EST}_in_reward_rtg$"), "in_reward_rtg"),
    (re.compile(rf"^{_EST}_value_{_EST}_grad$"), "straight_through"),
)


def kl_term_names() -> tuple[str, ...]:
  """Every name `kl_term` accepts."""
  names = []
  for k in est.ESTIMATORS:
    names += [f"{k}_as_loss", f"{k}_in_reward", f"{k}_in_reward_rtg"]
  names += [f"{a}_value_{b}_grad" for a in est.ESTIMATORS for b in est.ESTIMATORS if a != b]
  with_corrections = [n for n in names if "in_reward" not in n]
  names += [f"{n}+{c}" for n in with_corrections for c in CORRECTIONS]
  return tuple(names)


def _unknown(name: str, why: str) -> ValueError:
  bases = [n for n in kl_term_names() if "+" not in n]
  return ValueError(
      f"unknown KL term {name!r} ({why}). Valid names: {', '.join(bases)}; the as-loss and "
      f"straight-through ones optionally followed by one of "
      f"{', '.join('+' + c for c in CORRECTIONS)} (e.g. 'k2_as_loss+detached_ratio')."
  )


def kl_term(
    name: str,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
) -> KLTerm:
  """Resolves a config string such as "k2_as_loss+detached_ratio" into a `KLTerm`.

  Args:
    name: "<k>_as_loss", "<k>_in_reward", "<k>_in_reward_rtg" or "<ka>_value_<kb>_grad" with
      k ∈ {k1, k2, k3}, the loss-placed ones optionally suffixed "+detached_ratio", "+ratio" or
      "+clipped". `kl_term_names()` lists them all.
    clip_eps_low, clip_eps_high: ε of the clipped head.
    clamp: the exponent above which k3's δ and every importance ratio are continued linearly
      (`kljax.estimators.exp_clamped`).
  Raises:
    ValueError naming the valid names for an unknown name.
  """
  if not isinstance(name, str):
    raise TypeError(f"name must be a string such as 'k2_as_loss', got {type(name).__name__}.")
  base, _, correction = name.strip().partition("+")
  if correction and correction not in CORRECTIONS:
    raise _unknown(name, f"unknown correction {correction!r}")
  for pattern, kind in _PATTERNS:
    m = pattern.match(base)
    if m is None:
      continue
    fns = [est.ESTIMATORS[k] for k in m.groups()]
    fns = [functools.partial(f, clamp=clamp) if f is est.k3 else f for f in fns]
    clip = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    if kind.startswith("in_reward"):
      if correction:
        raise _unknown(
            name, "in-reward terms take no correction: with old_logp they are importance-weighted"
        )
      credit = "reward_to_go" if kind == "in_reward_rtg" else "token"
      return in_reward(fns[0], credit=credit, clamp=clamp, name=name)
    if kind == "straight_through":
      if m.group(1) == m.group(2):
        raise _unknown(name, "value and gradient estimators must differ; use the as-loss name")
      return straight_through(
          value=fns[0], grad=fns[1], correction=correction or None, clamp=clamp, name=name, **clip
      )
    return as_loss(fns[0], correction=correction or None, clamp=clamp, name=name, **clip)
  raise _unknown(name, "no such estimator placement")
