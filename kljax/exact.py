"""Exact enumeration: tabular policies, exact expected gradients, analytic divergence gradients, optima.

A *tabular policy* is a tuple of conditional-logit tables `(θ_0, …, θ_{T−1})` with
θ_t of shape `(V,)*(t+1)`: π(y_t | y_<t) = softmax(θ_t[y_0, …, y_{t−1}, :]). A categorical policy is
the case T = 1 (`categorical(logits)`). All V^T sequences are enumerated, so every expectation here
is exact (no sampling): keep V^T small (e.g. V ≤ 8, T ≤ 4).

The expected gradient of a `KLTerm` is what the term makes an optimizer follow *on average*:

  g = Σ_y sg(P_s(y)) · ∇_θ Σ_t surrogate(log π_θ(y_t|y_<t), log π_ref(y_t|y_<t), log π_old(…))

with P_s = π_θ (on-policy; the sampling weights are detached, as in any Monte-Carlo gradient) or a
fixed π_old (off-policy). At level="sequence" the surrogate is applied once per sequence to the
summed log-probabilities. It is compared with the *analytic* gradients of the divergences, which are
computed here from their own definitions (the KL chain rule over prefixes), not through any surrogate.

A `Space` enumerates either every length-T sequence or, with an EOS token (token 0), the
variable-length sequences that stop at it: a mask marks the tokens up to and including the first
EOS, and one canonical copy of each shorter sequence is kept. That is where the aggregation over a
sequence's tokens ("sum", "token_mean", "seq_mean_token_mean") can change what a term follows;
`divergence_gradients` gives the targets over such a space. `kljax.audit` and
`kljax.gradient_table` both run on this one engine.

References:
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), §4–§6.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from kljax import _checks
from kljax.estimators import kl_from_log_probs

Policy = tuple[jax.Array, ...]


# ---- Policies ----


def categorical(logits: ArrayLike) -> Policy:
  """A one-step policy from logits `[V]`."""
  logits = _checks.as_float32(logits, "logits")
  if logits.ndim != 1:
    raise ValueError(f"logits must have shape [V], got {list(logits.shape)}.")
  return (logits,)


def categorical_from_probs(probs: ArrayLike, *, name: str = "probs") -> Policy:
  """A one-step policy from a probability vector `[V]` (checked to be normalized)."""
  probs = _checks.check_distribution(probs, name)
  if probs.ndim != 1:
    raise ValueError(f"{name} must have shape [V], got {list(probs.shape)}.")
  return (jnp.log(_checks.as_float32(probs, name)),)


def random_tabular(key: jax.Array, *, vocab: int, length: int, scale: float = 1.0) -> Policy:
  """A tabular policy with i.i.d. N(0, scale²) logits."""
  if vocab < 2 or length < 1:
    raise ValueError(f"need vocab >= 2 and length >= 1, got vocab={vocab}, length={length}.")
  keys = jax.random.split(key, length)
  return tuple(scale * jax.random.normal(keys[t], (vocab,) * (t + 1)) for t in range(length))


def shape_of(policy: Sequence[ArrayLike], name: str = "policy") -> tuple[int, int]:
  """(V, T) of a tabular policy; raises ValueError if the tables are not (V,)*(t+1)."""
  if not isinstance(policy, (tuple, list)) or not policy:
    raise TypeError(f"{name} must be a non-empty tuple of logit tables, got {type(policy).__name__}.")
  vocab = np.shape(policy[0])[-1] if np.ndim(policy[0]) else 0
  for t, table in enumerate(policy):
    if np.shape(table) != (vocab,) * (t + 1):
      raise ValueError(
          f"{name}[{t}] must have shape {[vocab] * (t + 1)} (vocab {vocab}, position {t}), "
          f"got {list(np.shape(table))}."
      )
  return vocab, len(policy)


def _same_shape(policy, name, vocab, length):
  if shape_of(policy, name) != (vocab, length):
    raise ValueError(
        f"{name} has (vocab, length) {shape_of(policy, name)}, expected {(vocab, length)}."
    )


def sequences(vocab: int, length: int) -> jax.Array:
  """All vocab^length sequences, int32 `[N, T]`, in lexicographic order."""
  return jnp.asarray(list(itertools.product(range(vocab), repeat=length)), jnp.int32).reshape(
      -1, length
  )


class Space(NamedTuple):
  """The enumerated sequences and which of their tokens count."""

  seqs: jax.Array  # [N, T] int32
  mask: jax.Array  # [N, T] float32: 1 up to and including the first EOS (all 1 without EOS)
  keep: jax.Array  # [N] float32: 1 for the canonical copy of each variable-length sequence


EOS = 0  # the token that ends a sequence in a variable-length space
AGGREGATIONS = ("sum", "token_mean", "seq_mean_token_mean")


def sequence_space(vocab: int, length: int, *, eos: bool = False) -> Space:
  """All vocab^length sequences; with `eos`, read as variable-length sequences ending at EOS.

  With EOS the enumeration still holds [N, T] rows, so that every sequence has one shape: the
  tokens after the first EOS are masked out, and of the rows that agree up to it only the one
  padded with EOS is kept, so that Σ_y P(y) = 1 over the kept rows.
  """
  seqs = sequences(vocab, length)
  if not eos:
    return Space(seqs, jnp.ones(seqs.shape, jnp.float32), jnp.ones(seqs.shape[0], jnp.float32))
  ended = jnp.cumsum(seqs == EOS, axis=1) - (seqs == EOS)  # EOS strictly before t
  mask = (ended == 0).astype(jnp.float32)
  keep = jnp.all((mask > 0) | (seqs == EOS), axis=1).astype(jnp.float32)
  return Space(seqs, mask, keep)


def conditional_logprobs(policy: Policy, seqs: jax.Array) -> jax.Array:
  """log π(·|y_<t) at every prefix of `seqs` `[N, T]`: float32 `[N, T, V]`."""
  cols = []
  for t, table in enumerate(policy):
    cond = jax.nn.log_softmax(_checks.as_float32(table, "policy"), axis=-1)[tuple(seqs[:, :t].T)]
    cols.append(jnp.broadcast_to(cond, (seqs.shape[0], table.shape[-1])))
  return jnp.stack(cols, axis=1)


def token_logprobs(policy: Policy, seqs: jax.Array | None = None) -> jax.Array:
  """log π(y_t | y_<t) for every sequence of `seqs` (default: all of them): float32 `[N, T]`."""
  if seqs is None:
    seqs = sequences(*shape_of(policy))
  cond = conditional_logprobs(policy, seqs)
  return jnp.take_along_axis(cond, seqs[..., None], axis=-1)[..., 0]


def space_probs(logp: jax.Array, where: Space) -> jax.Array:
  """P(y) of the sequences of a `Space` from their token log-probs `[N, T]`: `[N]`, 0 for the rows
  a variable-length space does not keep, summing to 1 over the rest."""
  return where.keep * jnp.exp(jnp.sum(where.mask * logp, axis=-1))


# ---- Exact expectations of a KL term ----


def expected_gradient(
    term,
    policy: Policy,
    ref: Policy,
    *,
    old: Policy | None = None,
    level: Literal["token", "sequence"] = "token",
    space: Space | None = None,
    aggregation: str = "sum",
) -> Policy:
  """Exact expected gradient (w.r.t. every logit table) of a KL term's surrogate.

  Args:
    term: anything with `surrogate(logp, ref_logp, old_logp, mask=mask) -> [N, T]`: a `KLTerm`
      (e.g. `kljax.kl_term("k2_as_loss")`) or a `kljax.audit.Implementation`.
    policy: π_θ, the policy being differentiated.
    ref: π_ref.
    old: π_old that sampled the data (off-policy), or None (on-policy: samples from π_θ).
    level: "token": the surrogate on per-token log-probs `[N, T]`, summed over t (for in-reward
      terms with reward-to-go credit the coefficients run along t). "sequence": the surrogate on
      the sequence log-probs `[N, 1]` (the masked sum over t).
    space: the sequences to enumerate (default `sequence_space(V, T)`: all, of one length).
    aggregation: how a sequence's per-token losses combine: "sum"; "token_mean" (Σ_t / E|y|, the
      batch's token count: a constant, so a rescaling only); "seq_mean_token_mean" (Σ_t / |y| per
      sequence: a 1/|y| weight on each sequence, which can change the target).
  Returns:
    a tuple of gradient tables shaped like `policy`.
  """
  vocab, length = shape_of(policy)
  _same_shape(ref, "ref", vocab, length)
  if old is not None:
    _same_shape(old, "old", vocab, length)
  if level not in ("token", "sequence"):
    raise ValueError(f"level must be 'token' or 'sequence', got {level!r}.")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}.")
  where = space if space is not None else sequence_space(vocab, length)
  seqs, mask = where.seqs, where.mask
  ref_lp = token_logprobs(ref, seqs)
  old_lp = None if old is None else token_logprobs(old, seqs)
  n_tokens = jnp.sum(mask, -1)

  def per_token(lp):
    if level == "token":
      return term.surrogate(lp, ref_lp, old_lp, mask=mask)
    collapse = lambda x: None if x is None else jnp.sum(mask * x, -1, keepdims=True)  # noqa: E731
    return term.surrogate(collapse(lp), collapse(ref_lp), collapse(old_lp),
                          mask=jnp.ones((seqs.shape[0], 1), jnp.float32))

  def objective(theta):
    lp = token_logprobs(theta, seqs)
    weights = jax.lax.stop_gradient(space_probs(lp if old_lp is None else old_lp, where))
    per_seq = jnp.sum(per_token(lp).astype(jnp.float32), -1)
    if aggregation == "seq_mean_token_mean":
      per_seq = per_seq / n_tokens
    elif aggregation == "token_mean":
      per_seq = per_seq / jax.lax.stop_gradient(jnp.sum(weights * n_tokens))
    return jnp.sum(weights * per_seq)

  return jax.grad(objective)(tuple(_checks.as_float32(t, "policy") for t in policy))


def conditional_logits(policy: Policy) -> jax.Array:
  """The logits of π(·|y_<t) at every position of every enumerated sequence: float32 `[N, T, V]`
  (row n, position t: the table of position t at the prefix of sequence n)."""
  vocab, length = shape_of(policy)
  seqs = sequences(vocab, length)
  rows = [jnp.broadcast_to(_checks.as_float32(table, "policy")[tuple(seqs[:, :t].T)],
                           (seqs.shape[0], vocab)) for t, table in enumerate(policy)]
  return jnp.stack(rows, axis=1)


def expected_gradient_full(surrogate, policy: Policy, ref: Policy, *,
                           old: Policy | None = None) -> Policy:
  """Exact expected gradient of a surrogate that sees whole next-token distributions.

  g = Σ_y sg(P_s(y)) · ∇_θ Σ_t surrogate(logits, ref_logits, tokens, old_logp)[y, t], with P_s = π_θ
  (on-policy, `old=None`, and then old_logp is None) or π_old, as in `expected_gradient`.

  Args:
    surrogate: `(logits [N, T, V], ref_logits [N, T, V], tokens int [N, T], old_logp [N, T] | None)
      -> per-token loss [N, T]`, differentiable in `logits` (the conditional logits of π_θ).
    policy, ref, old: tabular policies of one (V, T).
  """
  vocab, length = shape_of(policy)
  _same_shape(ref, "ref", vocab, length)
  if old is not None:
    _same_shape(old, "old", vocab, length)
  seqs = sequences(vocab, length)
  ref_logits = conditional_logits(ref)
  old_lp = None if old is None else token_logprobs(old)

  def objective(theta):
    lp = token_logprobs(theta)
    weights = jax.lax.stop_gradient(jnp.exp(jnp.sum(lp if old_lp is None else old_lp, axis=-1)))
    per_token = surrogate(conditional_logits(theta), ref_logits, seqs, old_lp)
    return jnp.sum(weights * jnp.sum(per_token, axis=-1))

  return jax.grad(objective)(tuple(_checks.as_float32(t, "policy") for t in policy))


# ---- Analytic divergences and their gradients (from the definitions, no surrogate) ----


def _conditionals(policy: Policy) -> list[jax.Array]:
  return [jax.nn.log_softmax(_checks.as_float32(t, "policy"), axis=-1) for t in policy]


def _prefix_probs(policy: Policy) -> list[jax.Array]:
  """P(y_<t) as tables of shape (V,)*t, t = 0..T−1."""
  out, prob = [], jnp.ones(())
  for logp_t in _conditionals(policy):
    out.append(prob)
    prob = prob[..., None] * jnp.exp(logp_t)
  return out


def per_prefix_kl(policy: Policy, ref: Policy) -> list[jax.Array]:
  """KL(π(·|y_<t) ‖ π_ref(·|y_<t)) for every prefix: tables of shape (V,)*t."""
  return [kl_from_log_probs(lp, lq) for lp, lq in zip(_conditionals(policy), _conditionals(ref))]


def reverse_kl(policy: Policy, ref: Policy) -> jax.Array:
  """Sequence KL(P_θ‖P_ref) by the chain rule: Σ_t Σ_{y<t} P_θ(y_<t) KL_t(y_<t)."""
  return sum(
      jnp.sum(w * kl) for w, kl in zip(_prefix_probs(policy), per_prefix_kl(policy, ref))
  )


def forward_kl(policy: Policy, ref: Policy) -> jax.Array:
  """Sequence KL(P_ref‖P_θ)."""
  return reverse_kl(ref, policy)


def rkl_grad(policy: Policy, ref: Policy) -> Policy:
  """∇_θ KL(P_θ‖P_ref)."""
  return jax.grad(reverse_kl)(tuple(_checks.as_float32(t, "policy") for t in policy), ref)


def fkl_grad(policy: Policy, ref: Policy) -> Policy:
  """∇_θ KL(P_ref‖P_θ)."""
  return jax.grad(lambda p: forward_kl(p, ref))(tuple(_checks.as_float32(t, "policy") for t in policy))


def frozen_prefix_rkl_grad(policy: Policy, ref: Policy, *, prefixes: Policy | None = None) -> Policy:
  """∇_θ Σ_t Σ_{y<t} sg(P(y_<t)) KL(π(·|y_<t) ‖ π_ref(·|y_<t)): each position's reverse KL with its
  prefix law frozen.

  This is what per-token "k2 as loss" (and per-token "k1 in reward" without reward-to-go) follows
  on-policy; it misses the part of ∇ sequence-KL that flows through the prefix distribution.
  `prefixes`: the policy whose prefix law weighs the positions (default P = P_θ). Off-policy with
  per-token importance ratios, the corrected terms follow this with `prefixes=π_old`: a token's
  ratio fixes the law of that token, not of the prefix that led to it.
  """
  return _frozen_prefix_grad(policy, ref, prefixes, per_prefix_kl)


def frozen_prefix_fkl_grad(policy: Policy, ref: Policy, *, prefixes: Policy | None = None) -> Policy:
  """∇_θ Σ_t Σ_{y<t} sg(P(y_<t)) KL(π_ref(·|y_<t) ‖ π(·|y_<t)): the forward-KL counterpart.

  Per-token "k3 as loss" follows this exactly on-policy: at each position E_{y_t~π}[(1 − δ)∇logπ]
  = Σ_v (π(v) − π_ref(v)) ∇logπ(v) = ∇ KL(π_ref‖π) of that position, with the prefix law sampled
  (so frozen) by π. `prefixes` as for `frozen_prefix_rkl_grad`.
  """
  return _frozen_prefix_grad(policy, ref, prefixes, lambda p, q: per_prefix_kl(q, p))


def _frozen_prefix_grad(policy, ref, prefixes, kl_tables):
  if prefixes is not None:
    _same_shape(prefixes, "prefixes", *shape_of(policy))

  def objective(theta):
    weights = [jax.lax.stop_gradient(w) for w in _prefix_probs(theta if prefixes is None
                                                                 else prefixes)]
    return sum(jnp.sum(w * kl) for w, kl in zip(weights, kl_tables(theta, ref)))

  return jax.grad(objective)(tuple(_checks.as_float32(t, "policy") for t in policy))


# Off-policy, a frozen-prefix target names the law its prefixes are drawn from: π_θ (what an
# on-policy per-token term follows, and a whole-sequence-ratio reweighting recovers) or π_old (what
# per-token importance ratios give: a token's ratio fixes the law of that token, not of its prefix).
PREFIX_THETA, PREFIX_OLD = ", prefixes from π_θ", ", prefixes from π_old"


def divergence_gradients(policy: Policy, ref: Policy, *, old: Policy | None = None,
                         space: Space | None = None) -> dict[str, Policy]:
  """The targets a KL term's expected gradient is compared with, by enumeration over `space`.

  Each is the gradient of a divergence computed from its definition (a sum over the enumerated
  sequences, no surrogate), so that it holds on a variable-length space too, where the
  prefix-table chain rule of `rkl_grad` and friends does not apply:
    "∇RKL", "∇FKL": the sequence reverse and forward KL;
    for T > 1, "frozen-prefix ∇RKL" and "frozen-prefix ∇FKL": Σ_t of each position's KL with its
    prefix law held fixed; off-policy once per prefix law, named with PREFIX_THETA (π_θ) or
    PREFIX_OLD (π_old) appended.
  """
  vocab, length = shape_of(policy)
  where = space if space is not None else sequence_space(vocab, length)
  seqs, mask = where.seqs, where.mask
  ref_cond = conditional_logprobs(ref, seqs)
  ref_lp = jnp.take_along_axis(ref_cond, seqs[..., None], axis=-1)[..., 0]

  def rkl(theta):
    lp = token_logprobs(theta, seqs)
    return jnp.sum(space_probs(lp, where) * jnp.sum(mask * (lp - ref_lp), -1))

  def fkl(theta):
    lp = token_logprobs(theta, seqs)
    return jnp.sum(space_probs(ref_lp, where) * jnp.sum(mask * (ref_lp - lp), -1))

  def frozen(direction, prefixes):
    def objective(theta):
      cond = conditional_logprobs(theta, seqs)
      prefix_law = token_logprobs(theta if prefixes is None else prefixes, seqs)
      w = jax.lax.stop_gradient(space_probs(prefix_law, where))
      p, q = (cond, ref_cond) if direction == "reverse" else (ref_cond, cond)
      return jnp.sum(w * jnp.sum(mask * kl_from_log_probs(p, q), -1))  # [N, T] per position
    return objective

  out = {"∇RKL": jax.grad(rkl)(policy), "∇FKL": jax.grad(fkl)(policy)}
  if length > 1:
    laws = (("", None),) if old is None else ((PREFIX_THETA, None), (PREFIX_OLD, old))
    for direction, short in (("reverse", "RKL"), ("forward", "FKL")):
      for suffix, prefixes in laws:
        out[f"frozen-prefix ∇{short}{suffix}"] = jax.grad(frozen(direction, prefixes))(policy)
  return out


def categorical_rkl_grad(logits: ArrayLike, ref_probs: ArrayLike) -> jax.Array:
  """Closed form ∂KL(p‖q)/∂logits_j = p_j (log p_j − log q_j − KL(p‖q)), p = softmax(logits)."""
  logits = _checks.as_float32(logits, "logits")
  q = _checks.check_distribution(ref_probs, "ref_probs")
  _checks.same_shape(logits=logits, ref_probs=q)
  log_p = jax.nn.log_softmax(logits)
  p = jnp.exp(log_p)
  diff = log_p - jnp.log(q)
  return p * (diff - jnp.sum(p * diff))


def categorical_fkl_grad(logits: ArrayLike, ref_probs: ArrayLike) -> jax.Array:
  """Closed form ∂KL(q‖p)/∂logits_j = p_j − q_j."""
  logits = _checks.as_float32(logits, "logits")
  q = _checks.check_distribution(ref_probs, "ref_probs")
  _checks.same_shape(logits=logits, ref_probs=q)
  return jax.nn.softmax(logits) - q


def tree_distance(a: Policy, b: Policy) -> float:
  """max |a − b| over all tables (for comparing gradients)."""
  return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(a, b)))


def tree_norm(a: Policy) -> float:
  """The L2 norm of all tables together (for comparing gradients)."""
  return float(optax.tree.norm(a))


# ---- Closed-form optima of  E_π[r] − β·D  for a categorical policy (NumPy, float64) ----


def _optimum_inputs(ref_probs, rewards, beta):
  q = np.asarray(_checks.check_distribution(ref_probs, "ref_probs"), np.float64)
  r = np.asarray(rewards, np.float64)
  if q.ndim != 1 or r.shape != q.shape:
    raise ValueError(
        f"ref_probs and rewards must both have shape [V], got {list(q.shape)} and {list(r.shape)}."
    )
  return q / q.sum(), r, _checks.positive(beta, "beta")


def optimum_reverse(ref_probs: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
  """argmax_π E_π[r] − β KL(π‖π_ref) = π_ref·exp(r/β) / Z (Gibbs / Donsker–Varadhan)."""
  q, r, beta = _optimum_inputs(ref_probs, rewards, beta)
  z = np.log(np.maximum(q, 1e-300)) + r / beta
  z = np.where(q > 0, z, -np.inf)
  w = np.exp(z - z.max())
  return w / w.sum()


def optimum_forward(ref_probs: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
  """argmax_π E_π[r] − β KL(π_ref‖π), found from its stationarity condition.

  Stationarity: r_i + β q_i/π_i = λ, so π_i = β q_i / (λ − r_i) with λ > max r chosen so that
  Σ π_i = 1. Writing λ = max r + β s, s ∈ (0, 1] solves Σ q_i / (s + (max r − r_i)/β) = 1, whose
  left side decreases in s; s is found by bisection on log s to float64 precision.
  """
  q, r, beta = _optimum_inputs(ref_probs, rewards, beta)
  a = (r.max() - r) / beta

  def total(log_s):
    return np.sum(q / (np.exp(log_s) + a))

  lo, hi = -700.0, 0.0  # total(lo) >= 1 unless q vanishes on every argmax arm
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if total(mid) > 1.0 else (lo, mid)
  pi = q / (np.exp(0.5 * (lo + hi)) + a)
  return pi / pi.sum()


def optimum_unregularized(rewards: ArrayLike) -> np.ndarray:
  """argmax_π E_π[r] (β = 0): uniform over the arms of maximal reward."""
  r = np.asarray(rewards, np.float64)
  best = np.isclose(r, r.max(), rtol=0, atol=1e-12)
  return best / best.sum()


def total_variation(p, q):
  """½ Σ_v |p(v) − q(v)| over the last axis (unchecked; NumPy or JAX arrays, traceable)."""
  return 0.5 * abs(p - q).sum(axis=-1)


def tv_distance(p: ArrayLike, q: ArrayLike) -> float:
  """Total variation `total_variation` between two probability vectors (both checked), float64;
  the largest over any leading axes."""
  p = np.asarray(_checks.check_distribution(p, "p"), np.float64)
  q = np.asarray(_checks.check_distribution(q, "q"), np.float64)
  if p.shape != q.shape:
    raise ValueError(f"p and q must have one shape, got {list(p.shape)} and {list(q.shape)}.")
  return float(total_variation(p, q).max())
