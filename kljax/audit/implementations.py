"""A KL implementation in the audit's one form, from whatever the caller has.

`elementwise(fn, placement=..., credit=..., penalty_at=...)`, `sequence(fn)`, `from_term(term)`, or
`implementation(obj)` for any of them (see the `kljax.audit` docstring for what each models). An
`Implementation` carries the per-token surrogate whose exact expected gradient the audit measures
(`kljax.exact.expected_gradient` takes it as it takes a `KLTerm`) and the value the code reports.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kljax.advantages import reward_to_go
from kljax.kl import KLTerm, kl_term

Placement = Literal["loss", "reward"]
Credit = Literal["token", "reward_to_go"]
PenaltyAt = Literal["rollout", "current"]
PENALTY_AT = ("rollout", "current")


class AuditError(ValueError):
  """The callable cannot be audited as given (wrong signature, shape, dtype, non-finite output)."""


class Implementation(NamedTuple):
  """A KL implementation in the audit's one form.

  surrogate(logp, ref_logp, old_logp, mask) -> per-token loss, same shape [N, T]; `old_logp` None
    means on-policy. Computes in the dtype it is given (the robustness probe feeds bfloat16).
  value(logp, ref_logp) -> the per-token value the code reports, on-policy.
  """

  name: str
  kind: str
  surrogate: Callable[..., jax.Array]
  value: Callable[..., jax.Array]
  elementwise: bool  # True: it can also be applied to whole-sequence log-probs (level="sequence")
  # In-reward penalties: "rollout" (computed once from π_old, held fixed over the epochs) or
  # "current" (recomputed at the current parameters); None for other implementations.
  penalty_at: str | None = None


def _same_shape(out, like, name, expected):
  if not hasattr(out, "shape") or tuple(out.shape) != tuple(like.shape):
    raise AuditError(f"{name}: expected {expected} of shape {list(like.shape)} (the inputs' "
                     f"shape), got {getattr(out, 'shape', type(out).__name__)}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise AuditError(f"{name}: expected a floating result, got dtype {out.dtype}.")
  return out


def _on_policy_old(logp, old_logp):
  return jax.lax.stop_gradient(logp) if old_logp is None else jax.lax.stop_gradient(old_logp)


def _ratio(logp, old_logp):
  """ρ = π/π_old, live in logp; 1 with gradient ∇logp on-policy."""
  return jnp.exp(logp - _on_policy_old(logp, old_logp))


def _check_penalty_at(penalty_at, placement) -> str | None:
  """The mode of an in-reward penalty ("rollout" unless given); None for a loss."""
  if penalty_at is not None and penalty_at not in PENALTY_AT:
    raise ValueError(f"penalty_at must be one of {', '.join(PENALTY_AT)}, got {penalty_at!r}.")
  if placement != "reward":
    if penalty_at is not None:
      raise ValueError(f"penalty_at applies to in-reward penalties only; this one is placed in "
                       f"the {placement!r}.")
    return None
  return penalty_at or "rollout"


def penalty_kind(penalty_at: str) -> str:
  return ("penalty computed at rollout from π_old" if penalty_at == "rollout"
          else "penalty recomputed at the current parameters")


def elementwise(fn: Callable, *, placement: Placement = "loss", credit: Credit = "token",
                penalty_at: PenaltyAt | None = None, name: str | None = None) -> Implementation:
  """An elementwise penalty `fn(logp, ref_logp) -> value`, used as a loss or inside the reward.

  Args:
    fn: the penalty; any JAX-traceable function of two same-shape float arrays.
    placement: "loss" (differentiated) or "reward" (detached, multiplies the score).
    credit: for placement="reward": "token" (a token's own penalty) or "reward_to_go" (Σ_{s≥t}).
    penalty_at: for placement="reward": when the penalty is computed. "rollout" (the default, what
      verl, OpenRLHF and kljax's trainer run): once, from π_old's log-probs, and reused by every
      later epoch and minibatch, so off-policy the surrogate is sg(c(π_old))·ρ, whose expected
      gradient for k1 is ∇RKL − ∇KL(π‖π_old). "current": sg(c(π_θ))·ρ, recomputed at the
      parameters being updated (`kl.reward_at="current"` in kljax's trainer). On-policy the two
      are the same.
    name: a label (default: the function's name).
  """
  if placement not in ("loss", "reward"):
    raise ValueError(f"placement must be 'loss' or 'reward', got {placement!r}.")
  if credit not in ("token", "reward_to_go"):
    raise ValueError(f"credit must be 'token' or 'reward_to_go', got {credit!r}.")
  if placement == "loss" and credit != "token":
    raise ValueError("credit applies to placement='reward' only; a loss is credited to its token.")
  penalty_at = _check_penalty_at(penalty_at, placement)
  name = name or getattr(fn, "__name__", "fn")

  def masked_call(logp, ref_logp, mask):
    keep = mask.astype(bool)  # masked before the maths: padding cannot make a NaN
    out = _same_shape(fn(jnp.where(keep, logp, 0), jnp.where(keep, ref_logp, 0)), logp, name,
                      "fn(logp, ref_logp) -> array")
    return jnp.where(keep, out, 0)

  def surrogate(logp, ref_logp, old_logp, mask):
    if placement == "loss":
      return masked_call(logp, ref_logp, mask)
    at = logp if penalty_at == "current" or old_logp is None else old_logp
    c = jax.lax.stop_gradient(masked_call(at, ref_logp, mask))
    if credit == "reward_to_go":
      c = reward_to_go(c, mask).astype(c.dtype)
    return c * _ratio(logp, old_logp)

  kind = ("as loss" if placement == "loss" else
          f"in reward ({credit.replace('_', '-')} credit, {penalty_kind(penalty_at)})")
  return Implementation(name, f"elementwise, {kind}", surrogate, lambda lp, lq: fn(lp, lq), True,
                        penalty_at)


def sequence(fn: Callable, *, name: str | None = None) -> Implementation:
  """A per-sequence surrogate `fn(logp_t, ref_logp_t, old_logp_t, mask_t) -> per-token loss`.

  All arrays are [B, T]; `mask_t` marks valid tokens (float 0/1). On-policy, `old_logp_t` is
  sg(logp_t). The audit differentiates the returned loss (summed with the chosen aggregation).
  """
  name = name or getattr(fn, "__name__", "fn")

  def surrogate(logp, ref_logp, old_logp, mask):
    m = mask.astype(logp.dtype)
    out = fn(logp, ref_logp, _on_policy_old(logp, old_logp), m)
    return _same_shape(out, logp, name, "fn(logp_t, ref_logp_t, old_logp_t, mask_t) -> "
                       "per-token loss") * m

  def value(logp, ref_logp):
    return fn(logp, ref_logp, jax.lax.stop_gradient(logp), jnp.ones_like(logp))

  return Implementation(name, "per-sequence surrogate", surrogate, value, False)


def from_term(term: KLTerm | str, *, penalty_at: PenaltyAt | None = None) -> Implementation:
  """A kljax `KLTerm` (or a name for `kljax.kl_term`).

  An in-reward term (placement "reward") is audited as kljax's trainer runs it: with
  penalty_at="rollout" (the default, `kl.reward_at="rollout"`) its coefficient comes from the
  rollout policy π_old's log-probs, sg(c(π_old))·ρ; with "current" it is the term's own surrogate
  sg(c(π_θ))·ρ (`kl.reward_at="current"`).
  """
  term = kl_term(term) if isinstance(term, str) else term
  if not isinstance(term, KLTerm):
    raise AuditError(
        f"{term.name} is a term over the whole next-token distribution (placement "
        f"{term.placement!r}), not a function of per-token log-probabilities, so the audit cannot "
        "run it; its gradients are proved by exact enumeration in tests/test_full_kl.py "
        "(`kljax.exact.expected_gradient_full`).")

  penalty_at = _check_penalty_at(penalty_at, term.placement)

  def surrogate(logp, ref_logp, old_logp, mask):
    if penalty_at == "rollout" and old_logp is not None:
      c = jax.lax.stop_gradient(term.coefficient(old_logp, ref_logp, mask=mask))
      return jnp.where(mask.astype(bool), c * _ratio(logp, old_logp), 0.0)
    return term.surrogate(logp, ref_logp, old_logp, mask=mask)

  kind = f"kljax term ({term.placement}" + (
      f"; {penalty_kind(penalty_at)})" if penalty_at else ")")
  return Implementation(term.name, kind, surrogate, term.value, True, penalty_at)


def implementation(obj: Any, *, placement: Placement = "loss", credit: Credit = "token",
                   signature: Literal["elementwise", "sequence"] = "elementwise",
                   penalty_at: PenaltyAt | None = None,
                   name: str | None = None) -> Implementation:
  """Whatever the caller has, as an `Implementation` (see the module docstring)."""
  if isinstance(obj, Implementation):
    if penalty_at is not None and penalty_at != obj.penalty_at:
      raise ValueError(f"penalty_at={penalty_at!r} cannot change an Implementation already built "
                       f"({obj.name}: penalty_at={obj.penalty_at!r}); build it with penalty_at.")
    return obj
  if isinstance(obj, (KLTerm, str)):
    return from_term(obj, penalty_at=penalty_at)
  if not callable(obj):
    raise AuditError(f"expected a callable, a KLTerm or a kl_term name, got {type(obj).__name__}.")
  if signature == "sequence":
    if penalty_at is not None:
      raise ValueError("penalty_at applies to elementwise in-reward penalties; a per-sequence fn "
                       "computes its loss from the old_logp_t it is given.")
    return sequence(obj, name=name)
  if signature != "elementwise":
    raise ValueError(f"signature must be 'elementwise' or 'sequence', got {signature!r}.")
  return elementwise(obj, placement=placement, credit=credit, penalty_at=penalty_at, name=name)


def check(impl: Implementation) -> None:
  """Calls the implementation once on ordinary inputs; raises `AuditError` saying what is wrong."""
  lp = jnp.log(jnp.asarray([[0.2, 0.5, 0.1], [0.3, 0.05, 0.6]], jnp.float32))
  lq = jnp.log(jnp.asarray([[0.3, 0.4, 0.2], [0.1, 0.2, 0.5]], jnp.float32))
  mask = jnp.ones_like(lp)
  expected = ("fn(logp, ref_logp) -> array" if "elementwise" in impl.kind
              else "fn(logp_t, ref_logp_t, old_logp_t, mask_t) -> per-token loss"
              if impl.kind.startswith("per-sequence") else "a KLTerm")
  try:
    out = impl.surrogate(lp, lq, None, mask)
  except AuditError:
    raise
  except Exception as e:  # the user's code: any failure is reported with what was expected
    raise AuditError(
        f"{impl.name}: calling it as {expected} with [2, 3] float32 arrays raised "
        f"{type(e).__name__}: {e}") from e
  if not hasattr(out, "shape") or tuple(out.shape) != (2, 3):
    raise AuditError(f"{impl.name}: expected {expected} of shape [2, 3] (the inputs' shape), "
                     f"got {getattr(out, 'shape', type(out).__name__)}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise AuditError(f"{impl.name}: expected a floating result, got dtype {out.dtype}.")
  if not bool(jnp.all(jnp.isfinite(out))):
    raise AuditError(f"{impl.name}: non-finite output {np.asarray(out).tolist()} on ordinary "
                     f"log-probabilities (|log δ| < 2).")


def signature_of(fn: Callable) -> str:
  """"sequence" for a callable of 4 positional parameters, else "elementwise" (best effort)."""
  try:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
  except (TypeError, ValueError):
    return "elementwise"
  return "sequence" if len(params) == 4 else "elementwise"

