"""Which divergence does this KL code descend? An exact audit of any KL implementation.

Give it a KL term as the code people actually write, and it measures, by exact enumeration of small
tabular policies (no sampling noise), the *expected* gradient that code makes an optimizer follow,
then names it:

  ∇RKL   ∇ KL(π‖π_ref), the reverse KL (the objective of KL-regularized RL)
  ∇FKL   ∇ KL(π_ref‖π), the forward KL
  frozen-prefix ∇RKL / ∇FKL  (sequences) Σ_t of each position's KL with its prefix law held fixed:
         what per-token penalties without reward-to-go credit follow. Off-policy there are two,
         named by their prefix law: "prefixes from π_θ" (the on-policy target, which a whole-
         sequence ratio Π_t π/π_old recovers) and "prefixes from π_old" (what per-token ratios
         give: a token's ratio fixes that token's law, not its prefix's)
  0      no regularization at all

A gradient "follows" a target when it equals a positive multiple s of it to relative precision `tol`
(s ≠ 1 is reported: it rescales β). Otherwise it is "biased", with the nearest target and distance.

Inputs (`implementation` dispatches on them):
  elementwise(fn, placement="loss"|"reward", credit="token"|"reward_to_go")
      fn(logp, ref_logp) -> per-element value. "loss": the framework differentiates fn. "reward":
      it adds −β·sg(fn) to the reward of that token (or to every earlier token, reward-to-go), so
      the gradient is E[sg(c)·∇logp], importance-weighted by ρ = π/π_old off-policy (the PPO ratio
      that multiplies the advantage). `penalty_at` says when c is computed: "rollout" (default)
      from π_old's log-probs, once, held over later epochs and minibatches (verl's
      `apply_kl_penalty`, kljax's trainer by default): off-policy k1 then follows
      ∇RKL − ∇KL(π‖π_old); "current" at the parameters being updated: ∇RKL for one token.
  sequence(fn)
      fn(logp_t, ref_logp_t, old_logp_t, mask_t) -> per-token loss [B, T], for code that needs the
      sampling policy or mixes tokens (live ratios, sequence-level geometric-mean ratios). On-policy
      the audit passes old_logp_t = sg(logp_t), as a trainer does.
  a `kljax.KLTerm`, or a name for `kljax.kl_term`.
  from_torch(fn, signature=...) makes a PyTorch function of either signature auditable: values and
      derivatives come from torch autograd, so the code a framework runs is what is measured.

Not audited: the per-position exact terms of `kljax.full_kl` ("exact_rkl_as_loss", "exact_rkl_rb",
"top64_rkl_as_loss", ...; placement "full"). They read the whole next-token distribution at each
position (hidden states and unembedding), which no per-token signature carries; `from_term` raises
`AuditError` for them. What they follow is proved by exact enumeration with
`kljax.exact.expected_gradient_full` (tests/test_full_kl.py) and listed in the README.

Settings: one token (V = 6) and autoregressive sequences (V = 3, T = 3) on- and off-policy (π_old = π
plus N(0, 0.15²) logit noise), and variable-length sequences that stop at an EOS token (token 0),
where the aggregation matters: "sum" (Σ_t), "token_mean" (Σ_t / E|y|: a constant, so a rescaling
only) and "seq_mean_token_mean" (Σ_t / |y| per sequence: a 1/|y| weight that changes the target).
π and π_ref have N(0, 0.5²) logits: ordinary log-ratios (|log δ| ≲ 2), so a value clamp of ±10 is
inactive there; the robustness section probes the extremes.

Also measured: the on-policy coefficient c(log δ) of the one-token gradient E[c·∇logp] on a grid,
identified against the known ones; the exact bias and spread of the value as an estimate of
KL(π‖π_ref) and KL(π_ref‖π); non-finite values or gradients for |log δ| up to 100 in float32 and
bfloat16; and gradients a clamp sets to zero where the coefficient is finite and non-zero nearer
to log δ = 0.

`--expect` / `assert_follows` check every setting the report runs, or those named (`--setting`).

References:
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), §4–§6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import sys
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kljax import estimators as est
from kljax import exact
from kljax.advantages import reward_to_go
from kljax.kl import KLTerm, kl_term

Placement = Literal["loss", "reward"]
Credit = Literal["token", "reward_to_go"]
PenaltyAt = Literal["rollout", "current"]
PENALTY_AT = ("rollout", "current")
PENALTY_NOTE = {
    "rollout": "In-reward penalty computed **at rollout**, from π_old's log-probs, and held fixed "
               "over every later epoch and minibatch (verl's `apply_kl_penalty`, kljax's "
               "`kl.reward_at=\"rollout\"`): off-policy the surrogate is sg(c(π_old))·ρ.",
    "current": "In-reward penalty recomputed **at the current parameters** in every epoch and "
               "minibatch (kljax's `kl.reward_at=\"current\"`): off-policy the surrogate is "
               "sg(c(π_θ))·ρ."}
Aggregation = Literal["sum", "token_mean", "seq_mean_token_mean"]
AGGREGATIONS = ("sum", "token_mean", "seq_mean_token_mean")
# Off-policy, a frozen-prefix target names the law its prefixes are drawn from: π_θ (what an
# on-policy per-token term follows, and a whole-sequence-ratio reweighting recovers) or π_old (what
# per-token importance ratios give: a token's ratio fixes the law of that token, not of its prefix).
PREFIX_THETA, PREFIX_OLD = ", prefixes from π_θ", ", prefixes from π_old"
EXPECTATIONS = {"reverse": "∇RKL", "forward": "∇FKL", "zero": "0",
                "frozen_reverse": "frozen-prefix ∇RKL", "frozen_forward": "frozen-prefix ∇FKL",
                "frozen_reverse_old": "frozen-prefix ∇RKL" + PREFIX_OLD,
                "frozen_forward_old": "frozen-prefix ∇FKL" + PREFIX_OLD}


class AuditError(ValueError):
  """The callable cannot be audited as given (wrong signature, shape, dtype, non-finite output)."""


# ---------------------------------------------------------------- implementations


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


def _penalty_kind(penalty_at: str) -> str:
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
          f"in reward ({credit.replace('_', '-')} credit, {_penalty_kind(penalty_at)})")
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
      f"; {_penalty_kind(penalty_at)})" if penalty_at else ")")
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


# ---------------------------------------------------------------- PyTorch functions


def from_torch(fn: Callable, *, signature: Literal["elementwise", "sequence"] = "elementwise"
               ) -> Callable:
  """A JAX-callable wrapper of a PyTorch KL function, for `elementwise` or `sequence`.

  Values and vector-Jacobian products are computed by torch (autograd) on CPU through
  `jax.pure_callback`, in the input's dtype (bfloat16 stays bfloat16 in torch), so what is
  audited is the exact code the framework runs. torch is imported here only.
  """
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is a test dependency
    raise ImportError("kljax.audit.from_torch needs PyTorch: pip install torch") from e
  arity = 2 if signature == "elementwise" else 4
  if signature not in ("elementwise", "sequence"):
    raise ValueError(f"signature must be 'elementwise' or 'sequence', got {signature!r}.")

  def to_torch(x, dtype):
    t = torch.from_numpy(np.asarray(x, np.float32).copy())
    return t.to(torch.bfloat16) if dtype == jnp.bfloat16 else t

  def run(args, dtype, cotangent=None):
    ts = [to_torch(a, dtype).requires_grad_(i < 3) for i, a in enumerate(args)]
    out = fn(*ts)
    if not isinstance(out, torch.Tensor):
      raise AuditError(f"the torch function returned {type(out).__name__}, expected a tensor.")
    if cotangent is None:
      return np.asarray(out.detach().float().numpy(), np.float32)
    grads = torch.autograd.grad(out, ts[:min(3, arity)], grad_outputs=to_torch(cotangent, dtype)
                                .to(out.dtype), allow_unused=True)
    return tuple(np.zeros(np.shape(a), np.float32) if g is None else
                 np.asarray(g.float().numpy(), np.float32) for a, g in zip(args, grads))

  def host_forward(*args):
    dtype = args[0].dtype
    return jax.pure_callback(lambda *a: run(a, dtype).astype(dtype),
                             jax.ShapeDtypeStruct(args[0].shape, dtype), *args)

  @jax.custom_vjp
  def wrapped(*args):
    return host_forward(*args)

  def fwd(*args):
    return host_forward(*args), args

  def bwd(args, cotangent):
    dtype = args[0].dtype
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, dtype) for a in args[:min(3, arity)])
    grads = jax.pure_callback(
        lambda c, *a: tuple(g.astype(dtype) for g in run(a, dtype, c)), shapes, cotangent, *args)
    return tuple(grads) + tuple(jnp.zeros_like(a) for a in args[len(grads):])

  wrapped.defvjp(fwd, bwd)

  @functools.wraps(fn)
  def call(*args):
    if len(args) != arity:
      raise AuditError(f"{signature} torch functions take {arity} arrays, got {len(args)}.")
    dtype = jnp.result_type(args[0])
    return wrapped(*(jnp.asarray(a, dtype) for a in args))

  return call


# ---------------------------------------------------------------- checks of the callable


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


# ---------------------------------------------------------------- enumeration (with EOS)


class Setting(NamedTuple):
  name: str
  vocab: int
  length: int
  off_policy: bool
  eos: bool  # token 0 ends a sequence: variable lengths, where the aggregation matters


SETTINGS = (
    Setting("one token, on-policy", 6, 1, False, False),
    Setting("one token, off-policy", 6, 1, True, False),
    Setting("sequences, on-policy", 3, 3, False, False),
    Setting("sequences, off-policy", 3, 3, True, False),
    Setting("variable-length sequences (EOS), on-policy", 3, 4, False, True),
)
POLICY_SCALE = 0.5  # logit scale of π and π_ref: ordinary log-ratios
OLD_SCALE = 0.15  # π_old = π + N(0, OLD_SCALE²) logit noise


class _Space(NamedTuple):
  seqs: jax.Array  # [N, T] int32
  mask: jax.Array  # [N, T] float32: 1 up to and including the first EOS
  keep: jax.Array  # [N] float32: 1 for the canonical copy of each variable-length sequence


def _space(s: Setting) -> _Space:
  seqs = exact.sequences(s.vocab, s.length)
  if not s.eos:
    return _Space(seqs, jnp.ones(seqs.shape, jnp.float32), jnp.ones(seqs.shape[0], jnp.float32))
  ended = jnp.cumsum(seqs == 0, axis=1) - (seqs == 0)  # EOS strictly before t
  mask = (ended == 0).astype(jnp.float32)
  keep = jnp.all((mask > 0) | (seqs == 0), axis=1).astype(jnp.float32)  # zeros after the EOS
  return _Space(seqs, mask, keep)


def _conditionals(policy, seqs):
  """log π(·|y_<t) at every enumerated prefix: [N, T, V]."""
  cols = []
  for t, table in enumerate(policy):
    cond = jax.nn.log_softmax(table, axis=-1)[tuple(seqs[:, :t].T)]
    cols.append(jnp.broadcast_to(cond, (seqs.shape[0], table.shape[-1])))
  return jnp.stack(cols, axis=1)


def _token_lp(policy, seqs):
  cond = _conditionals(policy, seqs)
  return jnp.take_along_axis(cond, seqs[..., None], axis=-1)[..., 0]


def _seq_prob(lp, space):
  return space.keep * jnp.exp(jnp.sum(space.mask * lp, axis=-1))


def _targets(policy, ref, old, space) -> dict[str, tuple]:
  """Analytic gradients from the definitions of the divergences (no surrogate)."""
  seqs, mask = space.seqs, space.mask
  ref_cond = _conditionals(ref, seqs)
  ref_lp = jnp.take_along_axis(ref_cond, seqs[..., None], axis=-1)[..., 0]

  def rkl(theta):
    lp = _token_lp(theta, seqs)
    return jnp.sum(_seq_prob(lp, space) * jnp.sum(mask * (lp - ref_lp), -1))

  def fkl(theta):
    lp = _token_lp(theta, seqs)
    return jnp.sum(_seq_prob(ref_lp, space) * jnp.sum(mask * (ref_lp - lp), -1))

  def frozen(direction, prefixes):
    def objective(theta):
      cond = _conditionals(theta, seqs)
      prefix_law = _token_lp(theta if prefixes is None else prefixes, seqs)
      w = jax.lax.stop_gradient(_seq_prob(prefix_law, space))
      p, q = (cond, ref_cond) if direction == "reverse" else (ref_cond, cond)
      kl_t = est.kl_from_log_probs(p, q)  # [N, T] per-position KL
      return jnp.sum(w * jnp.sum(mask * kl_t, -1))
    return objective

  out = {"∇RKL": jax.grad(rkl)(policy), "∇FKL": jax.grad(fkl)(policy)}
  if len(policy) > 1:
    # On-policy one prefix law; off-policy both, each named (PREFIX_THETA, PREFIX_OLD).
    laws = (("", None),) if old is None else ((PREFIX_THETA, None), (PREFIX_OLD, old))
    for direction, short in (("reverse", "RKL"), ("forward", "FKL")):
      for suffix, prefixes in laws:
        out[f"frozen-prefix ∇{short}{suffix}"] = jax.grad(frozen(direction, prefixes))(policy)
  return out


def expected_gradient(impl: Implementation, policy, ref, *, old=None, space: _Space,
                      aggregation: Aggregation = "sum", level: str = "token"):
  """Σ_y sg(P_s(y))·∇ agg_t surrogate(y), P_s = π (on-policy) or π_old: exact, by enumeration."""
  seqs, mask = space.seqs, space.mask
  ref_lp = _token_lp(ref, seqs)
  old_lp = None if old is None else _token_lp(old, seqs)
  length = jnp.sum(mask, -1)

  def objective(theta):
    lp = _token_lp(theta, seqs)
    w = jax.lax.stop_gradient(_seq_prob(lp if old_lp is None else old_lp, space))
    if level == "sequence":
      collapse = lambda x: None if x is None else jnp.sum(mask * x, -1, keepdims=True)  # noqa: E731
      per_token = impl.surrogate(collapse(lp), collapse(ref_lp), collapse(old_lp),
                                 jnp.ones((seqs.shape[0], 1), jnp.float32))
    else:
      per_token = impl.surrogate(lp, ref_lp, old_lp, mask)
    per_seq = jnp.sum(per_token.astype(jnp.float32), -1)
    if aggregation == "seq_mean_token_mean":
      per_seq = per_seq / length
    elif aggregation == "token_mean":
      per_seq = per_seq / jax.lax.stop_gradient(jnp.sum(w * length))
    return jnp.sum(w * per_seq)

  return jax.grad(objective)(policy)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in tree])


# ---------------------------------------------------------------- the report


@dataclasses.dataclass
class SettingResult:
  setting: str
  relative_norm: float  # max over seeds of ‖g‖/‖∇RKL‖
  distance: dict[str, float]  # target -> max over seeds of ‖g − t‖/‖t‖
  scale_free: dict[str, float]  # target -> max over seeds of min_{s>0} ‖g − s·t‖/‖g‖
  scale: dict[str, list[float]]  # target -> [min, max] over seeds of the best s
  verdict: str
  # "∇RKL", "∇FKL", "frozen-prefix ∇RKL", "frozen-prefix ∇FKL" (on-policy; off-policy with
  # PREFIX_THETA or PREFIX_OLD appended: the prefix law), "0" or "biased"
  follows: str


@dataclasses.dataclass
class AuditReport:
  """What an implementation's gradient follows, and how its value and numerics behave."""

  name: str
  kind: str
  aggregation: str
  level: str
  seeds: int
  tol: float
  settings: list[SettingResult]
  coefficient: dict[str, Any]
  value: dict[str, float]
  robustness: dict[str, Any]
  # In-reward penalties: "rollout" (from π_old, held over epochs) or "current"; None otherwise.
  penalty_at: str | None = None

  def result(self, setting: str) -> SettingResult:
    for r in self.settings:
      if r.setting == setting:
        return r
    raise KeyError(f"no setting {setting!r}; have {[r.setting for r in self.settings]}.")

  @property
  def on_policy(self) -> str:
    """The follows-label of the first setting (one token, on-policy, unless `settings` says else)."""
    return self.settings[0].follows

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def markdown(self) -> str:
    out = [f"## Audit of `{self.name}` ({self.kind})", "",
           f"Aggregation `{self.aggregation}`, {self.level}-level, {self.seeds} random policies "
           f"per setting, tolerance {self.tol:g} (relative).", ""]
    if self.penalty_at:
      out += [PENALTY_NOTE[self.penalty_at], ""]
    out += ["| setting | ‖g‖/‖∇RKL‖ | to ∇RKL | to ∇FKL | to frozen ∇RKL | to frozen ∇FKL | verdict |",
            "|---|---|---|---|---|---|---|"]

    def cell(r, k):
      if k in r.distance:
        return f"{r.distance[k]:.1e}"
      laws = [(law, r.distance[k + suffix]) for law, suffix in (("π_θ", PREFIX_THETA),
                                                                 ("π_old", PREFIX_OLD))
              if k + suffix in r.distance]
      return " / ".join(f"{d:.1e} (prefixes {law})" for law, d in laws) or "—"

    for r in self.settings:
      d = [cell(r, k) for k in ("∇RKL", "∇FKL", "frozen-prefix ∇RKL", "frozen-prefix ∇FKL")]
      out.append(f"| {r.setting} | {r.relative_norm:.3g} | " + " | ".join(d) + f" | {r.verdict} |")
    c = self.coefficient
    out += ["", f"**On-policy coefficient** (gradient = E[c·∇logp], one token): c(log δ) "
            f"{c['identified']}."]
    v = self.value
    out += ["", "**Value as an estimate** (exact expectation over one-token policies): bias "
            f"{v['relative_bias_rkl']:+.2%} of KL(π‖π_ref), {v['relative_bias_fkl']:+.2%} of "
            f"KL(π_ref‖π); single-sample std {v['relative_std_rkl']:.2f}× KL(π‖π_ref)."]
    out += ["", "**Numerics** (|log δ| ≤ 100): " + robustness_summary(self.robustness) + "."]
    return "\n".join(out) + "\n"


def _verdict(g, targets, tol):
  gn = np.linalg.norm(g)
  res = {"norm": gn / max(np.linalg.norm(targets["∇RKL"]), 1e-30), "distance": {},
         "scale_free": {}, "scale": {}}
  for k, t in targets.items():
    tn2 = float(t @ t)
    s = max(float(g @ t) / max(tn2, 1e-60), 0.0)
    res["distance"][k] = float(np.linalg.norm(g - t) / max(np.sqrt(tn2), 1e-30))
    res["scale_free"][k] = float(np.linalg.norm(g - s * t) / max(gn, 1e-30)) if s > 0 else 1.0
    res["scale"][k] = s
  return res


def _label(per_seed: list[dict], tol: float) -> tuple[str, str, dict, dict, dict, float]:
  keys = per_seed[0]["distance"].keys()
  distance = {k: max(r["distance"][k] for r in per_seed) for k in keys}
  scale_free = {k: max(r["scale_free"][k] for r in per_seed) for k in keys}
  scale = {k: [min(r["scale"][k] for r in per_seed), max(r["scale"][k] for r in per_seed)]
           for k in keys}
  norm = max(r["norm"] for r in per_seed)
  if norm <= tol:
    return "zero (no regularization)", "0", distance, scale_free, scale, norm
  for k in keys:
    if scale_free[k] <= tol and scale[k][0] > 0:
      lo, hi = scale[k]
      extra = "" if max(abs(lo - 1), abs(hi - 1)) <= 1e-3 else (
          f" (×{lo:.3g})" if abs(hi - lo) <= 1e-3 * hi else f" (×{lo:.3g}…{hi:.3g})")
      return f"follows {k}{extra}", k, distance, scale_free, scale, norm
  nearest = min(keys, key=lambda k: scale_free[k])
  at = ", at" if "," in nearest else " at"
  return (f"biased: nearest {nearest}{at} {scale_free[nearest]:.2g}", "biased", distance,
          scale_free, scale, norm)


def _policies(s: Setting, seed: int):
  kp, kq, ko = jax.random.split(jax.random.PRNGKey(seed), 3)
  policy = exact.random_tabular(kp, vocab=s.vocab, length=s.length, scale=POLICY_SCALE)
  ref = exact.random_tabular(kq, vocab=s.vocab, length=s.length, scale=POLICY_SCALE)
  old = None
  if s.off_policy:
    noise = exact.random_tabular(ko, vocab=s.vocab, length=s.length, scale=OLD_SCALE)
    old = tuple(p + n for p, n in zip(policy, noise))
  return policy, ref, old


@functools.lru_cache(maxsize=64)
def _setting_data(s: Setting, seed: int):
  policy, ref, old = _policies(s, seed)
  space = _space(s)
  targets = {k: _flat(v) for k, v in _targets(policy, ref, old, space).items()}
  return policy, ref, old, space, targets


COEFFICIENT_GRID = tuple(float(x) for x in np.linspace(-10.0, 10.0, 81))
_KNOWN = {  # c − c(0) as a function of log δ: the on-policy coefficients with a name
    "log π − log π_ref (∇RKL)": lambda ld: -ld,
    "1 − δ (∇FKL)": lambda ld: 1.0 - np.exp(ld),
    "constant (zero expected gradient)": lambda ld: np.zeros_like(ld),
}


def _probe_logps(log_delta: np.ndarray, dtype):
  """Valid log-prob pairs (both ≤ −1) with ref_logp − logp = log δ."""
  ld = np.asarray(log_delta, np.float64)
  logp = -1.0 - np.maximum(ld, 0.0)
  ref = -1.0 + np.minimum(ld, 0.0)
  return jnp.asarray(logp, dtype)[:, None], jnp.asarray(ref, dtype)[:, None]


def _coefficients(impl: Implementation, log_delta, dtype=jnp.float32):
  """On-policy one-token coefficient c = ∂surrogate/∂logp, and the value, on a log δ grid."""
  lp, lq = _probe_logps(log_delta, dtype)
  mask = jnp.ones(lp.shape, jnp.float32)

  def total(x):
    return jnp.sum(impl.surrogate(x, lq, None, mask).astype(jnp.float32))

  c = jax.grad(total)(lp)[:, 0].astype(jnp.float32)
  value = impl.value(lp, lq)[:, 0].astype(jnp.float32)
  return np.asarray(c, np.float64), np.asarray(value, np.float64)


def _identify(log_delta: np.ndarray, c: np.ndarray) -> dict[str, Any]:
  """Matches c(log δ) − c(0) against a positive multiple of each known form on |log δ| ≤ 2 (where
  no reasonable clamp acts). A constant shift changes nothing in expectation: E[∇logp] = 0."""
  zero = int(np.argmin(np.abs(log_delta)))
  shifted = c - c[zero]
  core = np.abs(log_delta) <= 2.0
  scale = max(float(np.max(np.abs(c[core]))), 1e-12)
  errors, factors = {}, {}
  for k, f in _KNOWN.items():
    ref = f(log_delta[core])
    a = max(float(shifted[core] @ ref) / float(ref @ ref), 0.0) if np.any(ref) else 0.0
    errors[k] = float(np.max(np.abs(shifted[core] - a * ref))) / scale
    factors[k] = a
  constant = "constant (zero expected gradient)"
  best = constant if errors[constant] <= 1e-4 else min(errors, key=errors.get)
  if errors[best] <= 1e-4:
    label = best if best.startswith("constant") or abs(factors[best] - 1) <= 1e-4 else (
        f"{factors[best]:.3g} × ({best.replace(' (', ') (', 1)}")
    const = c[zero]
    identified = "= " + (label if abs(const) < 1e-6 or best == constant
                         else f"{const:.3g} + {label}")
  else:
    identified = f"matches none of the known forms (nearest: {best}, max error {errors[best]:.2g})"
  return {"grid": [float(x) for x in log_delta], "values": [float(x) for x in c],
          "errors": errors, "identified": identified}


def _robustness(impl: Implementation) -> dict[str, Any]:
  grid = np.round(np.arange(-100.0, 100.0 + 1e-9, 0.5), 6)
  out: dict[str, Any] = {}
  for dtype, label in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")):
    c, v = _coefficients(impl, grid, dtype)
    bad_v, bad_c = ~np.isfinite(v), ~np.isfinite(c)
    out[label] = {"nonfinite_value": int(bad_v.sum()), "nonfinite_grad": int(bad_c.sum()),
                  "nonfinite_at": [float(x) for x in grid[bad_v | bad_c]][:6]}
    if label == "float32":
      out["zeroed"] = _zeroed(grid, c)
  return out


def _zeroed(grid: np.ndarray, c: np.ndarray, *, run: int = 3) -> dict[str, float | None]:
  """Per side of log δ = 0: where a gradient that is finite and non-zero nearer to 0 becomes exactly
  0 for `run` grid points in a row (a clamp's silent zero; an isolated root of c is not one)."""
  out = {}
  for side, order in (("above", np.where(grid > 0)[0]), ("below", np.where(grid < 0)[0][::-1])):
    seen_nonzero, at = False, None
    for j, i in enumerate(order):
      if np.isfinite(c[i]) and c[i] != 0:
        seen_nonzero = True
      elif seen_nonzero and c[i] == 0 and np.all(c[order[j:j + run]] == 0):
        at = float(grid[i])
        break
    out[side] = at
  return out


def robustness_summary(r: dict[str, Any]) -> str:
  parts = []
  for dtype in ("float32", "bfloat16"):
    d = r[dtype]
    if d["nonfinite_value"] or d["nonfinite_grad"]:
      parts.append(f"{dtype}: non-finite value at {d['nonfinite_value']} and gradient at "
                   f"{d['nonfinite_grad']} of 401 log δ (e.g. {d['nonfinite_at'][:3]})")
  z = r["zeroed"]
  if z["above"] is not None:
    parts.append(f"gradient silently 0 for log δ ≥ {z['above']:g}")
  if z["below"] is not None:
    parts.append(f"gradient silently 0 for log δ ≤ {z['below']:g}")
  return "; ".join(parts) if parts else "finite in float32 and bfloat16, no gradient cut to 0"


def _value_stats(impl: Implementation, seeds: int) -> dict[str, float]:
  rb, fb, sd = [], [], []
  for seed in range(seeds):
    policy, ref, _ = _policies(SETTINGS[0], seed)
    lp = jax.nn.log_softmax(policy[0])
    lq = jax.nn.log_softmax(ref[0])
    p = np.exp(np.asarray(lp, np.float64))
    v = np.asarray(impl.value(lp[:, None], lq[:, None])[:, 0], np.float64)
    lp64, lq64 = np.asarray(lp, np.float64), np.asarray(lq, np.float64)
    rkl, fkl = float(est.kl_from_log_probs(lp64, lq64)), float(est.kl_from_log_probs(lq64, lp64))
    mean = float(np.sum(p * v))
    rb.append((mean - rkl) / rkl)
    fb.append((mean - fkl) / fkl)
    sd.append(float(np.sqrt(max(np.sum(p * v * v) - mean**2, 0.0))) / rkl)
  return {"relative_bias_rkl": float(np.mean(rb)), "relative_bias_fkl": float(np.mean(fb)),
          "relative_std_rkl": float(np.mean(sd))}


def audit(obj: Any, *, placement: Placement = "loss", credit: Credit = "token",
          signature: Literal["elementwise", "sequence"] = "elementwise",
          aggregation: Aggregation = "sum", level: Literal["token", "sequence"] = "token",
          settings: Sequence[Setting] = SETTINGS, seeds: int = 3, tol: float = 1e-4,
          penalty_at: PenaltyAt | None = None, name: str | None = None,
          progress: Callable[[str], None] | None = None) -> AuditReport:
  """Audits a KL implementation: what its exact expected gradient follows in every setting.

  Args:
    obj: an elementwise `fn(logp, ref_logp)`, a per-sequence `fn(logp_t, ref_logp_t, old_logp_t,
      mask_t)` (with signature="sequence"), a `KLTerm`, a `kl_term` name, or an `Implementation`.
    placement, credit: how an elementwise fn is used (see `elementwise`).
    signature: "elementwise" or "sequence" for a plain callable.
    aggregation: "sum", "token_mean" or "seq_mean_token_mean" over the tokens of a sequence.
    level: "token" (per-token log-probs) or "sequence" (the fn applied to Σ_t logp; elementwise only).
    settings: the `Setting`s; seeds: random policies per setting; tol: relative tolerance.
    penalty_at: for in-reward penalties (placement="reward", or an in-reward kljax term): "rollout"
      (default: computed once from π_old and reused over epochs, as verl and kljax's trainer do)
      or "current" (recomputed at the current parameters). See `elementwise`.
    name: a label.
    progress: called with a line before each stage (the checks, each setting, the coefficient).
  Raises:
    AuditError when the callable has the wrong signature, shape or dtype, or is not finite.
  """
  say = progress or (lambda line: None)
  key = (obj, placement, credit, signature, aggregation, level, tuple(settings), seeds, tol,
         penalty_at, name)
  if isinstance(obj, str) and key in _MEMO:  # kljax names are pure: audit each once per process
    return _MEMO[key]
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}.")
  if level not in ("token", "sequence"):
    raise ValueError(f"level must be 'token' or 'sequence', got {level!r}.")
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}.")
  impl = implementation(obj, placement=placement, credit=credit, signature=signature,
                        penalty_at=penalty_at, name=name)
  if level == "sequence" and not impl.elementwise:
    raise ValueError("level='sequence' applies an elementwise penalty to whole-sequence log-probs; "
                     f"{impl.name} is a per-sequence surrogate already.")
  say(f"{impl.name}: checking its signature, shapes and values")
  check(impl)
  results = []
  for i, s in enumerate(settings):
    say(f"{impl.name}: setting {i + 1} of {len(settings)}, {s.name} ({seeds} seeds)")
    per_seed = []
    for seed in range(seeds):
      policy, ref, old, space, targets = _setting_data(s, seed)
      # Eager on purpose: each audit's graph differs, and op-by-op dispatch (whose per-primitive
      # compiles are cached across audits) is faster here than compiling every audit whole.
      g = expected_gradient(impl, policy, ref, old=old, space=space, aggregation=aggregation,
                            level=level if s.length > 1 else "token")
      per_seed.append(_verdict(_flat(g), targets, tol))
    verdict, follows, distance, scale_free, scale, norm = _label(per_seed, tol)
    results.append(SettingResult(s.name, norm, distance, scale_free, scale, verdict, follows))
  say(f"{impl.name}: the coefficient c(log δ), value statistics and robustness")
  grid = np.asarray(COEFFICIENT_GRID)
  coefficient = _identify(grid, _coefficients(impl, grid)[0])
  report = AuditReport(impl.name, impl.kind, aggregation, level, seeds, tol, results, coefficient,
                       _value_stats(impl, seeds), _robustness(impl), impl.penalty_at)
  if isinstance(obj, str):
    _MEMO[key] = report
  return report


_MEMO: dict[tuple, AuditReport] = {}


# Short names of the settings for the command line (`--setting seq-on`); full names work too.
SETTING_KEYS = {"token-on": SETTINGS[0].name, "token-off": SETTINGS[1].name,
                "seq-on": SETTINGS[2].name, "seq-off": SETTINGS[3].name, "eos-on": SETTINGS[4].name}


def accepted(expected: str, setting: Setting) -> str:
  """The follows-label that agrees with `expected` in `setting`.

  "reverse", "forward", "zero": ∇RKL, ∇FKL, 0 in every setting. "frozen_reverse"/"frozen_forward":
  the frozen-prefix gradient with prefixes from π_θ (what a per-token term follows on-policy), which
  for one token is ∇RKL/∇FKL itself; "frozen_reverse_old"/"frozen_forward_old": with prefixes from
  π_old off-policy (per-token importance ratios), the same as the former on-policy.
  """
  if expected not in EXPECTATIONS:
    raise ValueError(f"expected must be one of {', '.join(EXPECTATIONS)}, got {expected!r}.")
  if not expected.startswith("frozen_"):
    return EXPECTATIONS[expected]
  short = "RKL" if expected.startswith("frozen_reverse") else "FKL"
  if setting.length == 1:
    return f"∇{short}"
  if not setting.off_policy:
    return f"frozen-prefix ∇{short}"
  return f"frozen-prefix ∇{short}" + (PREFIX_OLD if expected.endswith("_old") else PREFIX_THETA)


def resolve_settings(names: str | Sequence[str] | None,
                     settings: Sequence[Setting] = SETTINGS) -> tuple[Setting, ...]:
  """The `Setting`s named (full names or SETTING_KEYS); None: all of `settings`."""
  if names is None:
    return tuple(settings)
  by_name = {s.name: s for s in settings}
  out = []
  for n in [names] if isinstance(names, str) else names:
    full = SETTING_KEYS.get(n, n)
    if full not in by_name:
      raise ValueError(f"setting must be one of {list(by_name)} or the short names "
                       f"{', '.join(k for k, v in SETTING_KEYS.items() if v in by_name)}, got {n!r}.")
    out.append(by_name[full])
  return tuple(out)


def disagreements(report: AuditReport, expected: str, settings: Sequence[Setting]
                  ) -> list[tuple[str, str, str]]:
  """[(setting, verdict, expected label)] for each setting of `settings` whose verdict is not
  `expected` (see `accepted`)."""
  out = []
  for s in settings:
    want = accepted(expected, s)
    r = report.result(s.name)
    if r.follows != want:
      out.append((s.name, r.verdict, want))
  return out


def assert_follows(obj: Any, expected: str, *, setting: str | Sequence[str] | None = None,
                   **kwargs) -> AuditReport:
  """Raises AssertionError (naming each setting that disagrees, with the audit table) unless the
  gradient follows `expected` in every setting checked.

  Args:
    obj: as for `audit`.
    expected: "reverse", "forward", "zero", "frozen_reverse", "frozen_forward",
      "frozen_reverse_old" or "frozen_forward_old" (see `accepted`).
    setting: the `Setting` name(s) (or SETTING_KEYS) to check; None (default): every setting the
      audit runs (`settings=` in kwargs, else all of SETTINGS).
    **kwargs: passed to `audit` (placement, credit, signature, aggregation, penalty_at, ...).
  """
  if expected not in EXPECTATIONS:
    raise ValueError(f"expected must be one of {', '.join(EXPECTATIONS)}, got {expected!r}.")
  checked = resolve_settings(setting, kwargs.get("settings", SETTINGS))
  report = audit(obj, **kwargs)
  bad = disagreements(report, expected, checked)
  if bad:
    lines = "\n".join(f"  {name}: the gradient {verdict}, not {want}" for name, verdict, want in bad)
    raise AssertionError(f"{report.name} does not follow {expected} in {len(bad)} of "
                         f"{len(checked)} settings:\n{lines}\n\n" + report.markdown())
  return report


def signature_of(fn: Callable) -> str:
  """"sequence" for a callable of 4 positional parameters, else "elementwise" (best effort)."""
  try:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
  except (TypeError, ValueError):
    return "elementwise"
  return "sequence" if len(params) == 4 else "elementwise"


def to_json(report: AuditReport) -> str:
  return json.dumps(report.to_json(), indent=1, ensure_ascii=False)


# ---------------------------------------------------------------- generated tables


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def terms_table(names: Sequence[str]) -> str:
  """Markdown table: what each kljax KL term's gradient follows (generated, see `update_docs`)."""
  rows = ["| `kljax.kl_term(...)` | on-policy coefficient c | one token, on-policy | one token, "
          "off-policy | sequence, per-token, on-policy | sequence, off-policy | value bias vs "
          "KL(π‖π_ref) |", "|---|---|---|---|---|---|---|"]
  for name in names:
    modes = PENALTY_AT if kl_term(name).placement == "reward" else (None,)
    for at in modes:
      r = audit(name, penalty_at=at)
      label = f"`{name}`" + (f" (penalty at {'rollout' if at == 'rollout' else 'current θ'})"
                             if at else "")
      rows.append(f"| {label} | {_cell(r.coefficient['identified'].removeprefix('= '))} | "
                  + " | ".join(_cell(r.settings[i].verdict) for i in range(4))
                  + f" | {r.value['relative_bias_rkl']:+.0%} |")
  return "\n".join(rows) + "\n"


def gallery_table(entries=None, *, each: Callable[[str], Any] | None = None) -> str:
  """Markdown table of the frameworks' KL terms as audited (entries: kljax.audit_gallery.GALLERY).
  `each(label)`, when given, is entered as a context around each entry's audit (the command line's
  progress line and timeout)."""
  if entries is None:
    from kljax.audit_gallery import GALLERY as entries  # noqa: N811
  rows = ["| framework | option | what it computes | on-policy gradient follows | off-policy "
          "(one token) | per-token in a sequence | numerics (measured; notes) |",
          "|---|---|---|---|---|---|---|"]
  for e in entries:
    with (each or (lambda label: contextlib.nullcontext()))(f"{e.framework} {e.option}"):
      r = audit(e.impl)
    numerics = robustness_summary(r.robustness) + (f"; {e.numerics}" if e.numerics else "")
    computes = e.computes + (f"; {_penalty_kind(r.penalty_at)}" if r.penalty_at else "")
    rows.append(f"| {e.framework} | {_cell(e.option)} | {_cell(computes)} | "
                f"{_cell(r.settings[0].verdict)} | {_cell(r.settings[1].verdict)} | "
                f"{_cell(r.settings[2].verdict)} | {_cell(numerics)} |")
  return "\n".join(rows) + "\n"


README_TERMS = ("k1_as_loss", "k2_as_loss", "k3_as_loss", "k1_in_reward", "k1_in_reward_rtg",
                "k2_in_reward", "k3_in_reward", "k3_value_k2_grad", "k2_as_loss+detached_ratio",
                "k2_as_loss+ratio", "k2_as_loss+clipped", "k3_as_loss+ratio", "k1_as_loss+ratio")
_HEADER = ("<!-- Generated by `python -m kljax.audit --update-docs`; a test fails when this differs "
           "from what it produces. Do not edit by hand. -->\n")


def generated_docs() -> dict[str, str]:
  """{path: content} of every generated document, and of the README block (key 'README.md#terms')."""
  from kljax.audit_gallery import CHANGE_NOTE, GALLERY
  from kljax.estimators import k3 as _k3
  from kljax.kl import kl_term_names
  settings = "; ".join(s.name for s in SETTINGS)
  note = (f"\nExact expected gradients by enumeration over {len(SETTINGS)} settings ({settings}); "
          f"{3} random policies each, relative tolerance 1e-4. A verdict \"follows X (×s)\" means "
          "a positive multiple s of ∇X (a rescaled β). Off-policy, a frozen-prefix verdict names "
          "its prefix law (π_θ: the on-policy target; π_old: what per-token ratios give). "
          "In-reward penalties are audited as they run: computed at rollout from π_old and held "
          "over later epochs (verl, OpenRLHF and kljax's default `kl.reward_at=\"rollout\"`; off-"
          "policy k1 then follows ∇RKL − ∇KL(π‖π_old)), or recomputed at the current θ "
          "(`kl.reward_at=\"current\"`); each row says which.\n")
  return {
      "docs/kl_terms.md": _HEADER + "\n# Every kljax KL term, audited\n" + note + "\n"
                          + terms_table(kl_term_names()),
      "docs/frameworks.md": _HEADER + "\n# The KL terms other frameworks ship, audited\n" + note
                            + "\nEach row is re-derived from the framework's source; the file and "
                              "version verified are cited next to each function in "
                              "`kljax/audit_gallery.py`.\n\n" + gallery_table(GALLERY)
                            + "\n" + CHANGE_NOTE,
      "docs/audit_kljax_k3.md": _HEADER.replace("--update-docs", "kljax:k3 --placement loss")
                                + "\n" + audit(elementwise(_k3, name="kljax:k3")).markdown(),
      "README.md#terms": terms_table(README_TERMS),
  }


_BEGIN, _END = "<!-- BEGIN audit:terms -->\n", "<!-- END audit:terms -->\n"


def readme_block(readme: str) -> str:
  """The generated block of README.md (between the audit:terms markers)."""
  if _BEGIN not in readme or _END not in readme:
    raise ValueError("README.md has no audit:terms block (markers '<!-- BEGIN audit:terms -->' and "
                     "'<!-- END audit:terms -->').")
  return readme.split(_BEGIN, 1)[1].split(_END, 1)[0]


def update_docs(root: str = ".") -> list[str]:
  """Rewrites the generated documents under `root`; returns the paths written."""
  written = []
  for path, content in generated_docs().items():
    if path.startswith("README.md#"):
      full = os.path.join(root, "README.md")
      with open(full) as f:
        readme = f.read()
      old = readme_block(readme)
      content = readme.replace(_BEGIN + old + _END, _BEGIN + content + _END)
    else:
      full = os.path.join(root, path)
      os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
      f.write(content)
    written.append(full)
  return written


# ---------------------------------------------------------------- command line


def _load(spec: str) -> Callable:
  import importlib

  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise AuditError(f"expected MODULE:FUNCTION (e.g. 'kljax:k3' or 'mykl:penalty'), got {spec!r}.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except Exception as e:
    raise AuditError(f"cannot import module {module_name!r} (searched the current directory and "
                     f"PYTHONPATH): {type(e).__name__}: {e}") from e
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      public = sorted(n for n in dir(module) if not n.startswith("_"))
      raise AuditError(f"module {module_name!r} has no attribute {attr!r}; it has: "
                       f"{', '.join(public[:30])}.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise AuditError(f"{spec} is a {type(obj).__name__}, not a function.")
  return obj


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  p = argparse.ArgumentParser(
      # the console script `kljax-audit` or `python -m kljax.audit`, as invoked
      prog=("kljax-audit" if os.path.basename(sys.argv[0]) == "kljax-audit"
            else "python -m kljax.audit"),
      description="Which divergence does a KL implementation's gradient descend? Exact audit.")
  p.add_argument("function", nargs="?", help="MODULE:FUNCTION, an elementwise fn(logp, ref_logp) "
                 "(or, with --signature sequence, fn(logp_t, ref_logp_t, old_logp_t, mask_t))")
  p.add_argument("--placement", choices=("loss", "reward"), default="loss",
                 help="loss: the code differentiates fn; reward: it subtracts β·sg(fn) from rewards")
  p.add_argument("--credit", choices=("token", "reward_to_go"), default="token",
                 help="for --placement reward: a token's own penalty, or the sum of later ones")
  p.add_argument("--penalty-at", choices=PENALTY_AT, default=None,
                 help="in-reward penalties (--placement reward, or an in-reward --term): computed "
                      "once at rollout from π_old and held over epochs (default, what verl and "
                      "kljax's trainer do), or recomputed at the current parameters")
  p.add_argument("--expect", choices=tuple(EXPECTATIONS),
                 help="exit 0 when the gradient follows this in every setting checked (all that "
                      "the report runs, or those of --setting), 1 otherwise, naming each setting "
                      "that disagrees; frozen_*: the frozen-prefix gradient (prefixes from π_θ; "
                      "_old: from π_old), which for one token is the divergence's own")
  p.add_argument("--setting", action="append", metavar="NAME",
                 help="with --expect: check this setting only (repeatable): "
                      + ", ".join(f"{k} ({v})" for k, v in SETTING_KEYS.items()))
  p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
  p.add_argument("--signature", choices=("elementwise", "sequence"), default=None,
                 help="the function's signature (default: 4 positional parameters -> sequence)")
  p.add_argument("--torch", action="store_true", help="FUNCTION is a PyTorch function")
  p.add_argument("--term", help="audit a kljax term by name, e.g. k3_as_loss+ratio")
  p.add_argument("--aggregation", choices=AGGREGATIONS, default="sum")
  p.add_argument("--level", choices=("token", "sequence"), default="token")
  p.add_argument("--seeds", type=int, default=3, help="random policies per setting")
  p.add_argument("--gallery", action="store_true",
                 help="print the audited table of what other frameworks ship")
  p.add_argument("--update-docs", action="store_true",
                 help="rewrite docs/frameworks.md, docs/kl_terms.md and README.md's terms table")
  p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                 help="the most seconds one implementation's audit may take (0: no limit); one "
                      "that takes longer stops the audit with one line naming it, exit status 3")
  p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  args = p.parse_args(argv)
  if not args.timeout >= 0:
    p.error(f"--timeout must be a number of seconds >= 0 (0: no limit), got {args.timeout}")
  each = functools.partial(_evaluating, timeout=args.timeout, quiet=args.quiet)
  progress = None if args.quiet else (lambda line: print(f"kljax.audit: {line}", file=sys.stderr,
                                                         flush=True))
  try:
    if args.update_docs:
      for path in update_docs():
        print(f"wrote {path}")
      return 0
    if args.gallery:
      print(gallery_table(each=each), end="")
      return 0
    checked = resolve_settings(args.setting)
    if args.setting and not args.expect:
      raise ValueError("--setting names the settings --expect checks; give --expect too.")
    if args.term:
      obj = implementation(args.term, penalty_at=args.penalty_at)
    elif args.function:
      obj = _load(args.function)
      signature = args.signature or signature_of(obj)
      if args.torch:
        obj = from_torch(obj, signature=signature)
      obj = implementation(obj, placement=args.placement, credit=args.credit, signature=signature,
                           penalty_at=args.penalty_at, name=args.function)
    else:
      p.error("give MODULE:FUNCTION, --term NAME, --gallery or --update-docs")
    with each(args.term or args.function):
      report = audit(obj, aggregation=args.aggregation, level=args.level, seeds=args.seeds,
                     progress=progress)
  except (AuditError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.markdown(), end="")
  if args.json:
    with open(args.json, "w") as f:
      f.write(to_json(report))
  if args.expect:
    bad = disagreements(report, args.expect, checked)
    print(f"\n--expect {args.expect}: {'NO' if bad else 'yes'} ({len(checked) - len(bad)} of "
          f"{len(checked)} settings agree)")
    for name, verdict, want in bad:
      print(f"  {name}: the gradient {verdict}, not {want}")
    return 1 if bad else 0
  return 0


TIMEOUT_STATUS = 3  # the command line's exit status when an implementation exceeds --timeout


@contextlib.contextmanager
def _evaluating(label: str, *, timeout: float, quiet: bool):
  """The command line around one implementation's audit: a progress line, and with `timeout` > 0
  a watchdog that, past it, prints one line naming `label` and ends the process with
  TIMEOUT_STATUS. A thread, not a signal: it stops a function blocked in native code too (a
  signal handler runs only once that returns)."""
  import threading
  import time

  if not quiet:
    print(f"kljax.audit: evaluating {label}", file=sys.stderr, flush=True)
  start = time.monotonic()

  def expire():
    sys.stdout.flush()
    print(f"kljax.audit: {label}: timed out after {timeout:g} s (--timeout); stopping.",
          file=sys.stderr, flush=True)
    os._exit(TIMEOUT_STATUS)

  timer = threading.Timer(timeout, expire) if timeout > 0 else None
  if timer is not None:
    timer.daemon = True
    timer.start()
  try:
    yield
  finally:
    if timer is not None:
      timer.cancel()
  if not quiet:
    print(f"kljax.audit: {label}: done in {time.monotonic() - start:.1f} s", file=sys.stderr,
          flush=True)


if __name__ == "__main__":
  # Run the imported module's main, so that classes are those of `kljax.audit` (the gallery
  # imports it), not of a second copy named __main__.
  from kljax import audit as _self

  raise SystemExit(_self.main())
