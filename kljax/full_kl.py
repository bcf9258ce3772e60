"""Exact per-position KL terms: the whole next-token distribution at each position, not one token.

A sampled-token estimator (k1, k2, k3) sees one token y_t ~ π_θ(·|y_<t); the exact per-position KL
sums over the vocabulary instead,

  KL_t  = Σ_v π_θ(v|y_<t) (log π_θ(v|y_<t) − log π_ref(v|y_<t))      (reverse)
  KL_t^F = Σ_v π_ref(v|y_<t) (log π_ref(v|y_<t) − log π_θ(v|y_<t))   (forward)

computed from the models' final hidden states in chunks (`kljax.logprobs.position_kl`), so no
[B, T, V] tensor exists in either pass. Per-token surrogates [B, T] (the trainer aggregates them):

  as loss            s_t = KL_t.  ∇ Σ_t KL_t(θ) is the frozen-prefix ∇RKL (∇FKL for KL_t^F): each
                     position's KL with the law of its prefix y_<t held fixed, and no sampling noise
                     over the current token. Off-policy (y ~ π_old) the prefixes follow π_old.
  Rao-Blackwellized  s_t = W_{<t}·KL_t with the live cumulative prefix ratio
  sequence ∇RKL      W_{<t} = Π_{s<t} π_θ(y_s|y_<s)/π_old(y_s|y_<s)  (on-policy ≡ 1, ∇W = Σ_{s<t} ∇logπ).
                     The sequence reverse KL is Σ_t E_{y_<t~P_θ}[KL_t(y_<t)] (chain rule over
                     prefixes), so its gradient is
                       E[Σ_t ∇KL_t] + E[Σ_s ∇log π(y_s|y_<s) · Σ_{t>s} KL_t]:
                     the exact per-position KL as loss plus the reward-to-go of the *future* exact
                     KLs as an in-reward term. It is k1-in-reward-rtg with each sampled
                     k1_t = log π(y_t)/π_ref(y_t) replaced by its conditional expectation KL_t
                     (Rao-Blackwell: the same expectation, ∇KL(P_θ‖P_ref), with less variance).
                     Off-policy, ∇ Σ_t E_old[W_{<t} KL_t] is the same gradient exactly (the product
                     rule on W_{<t}·KL_t); W is clamped only where exp would overflow.
  top-k + tail       KL_t estimated by the exact sum over the k tokens π_θ ranks first plus an
                     importance-sampled tail (`topk_tail_kl`): unbiased in value and gradient.

Prior art: Amini, Vieira & Cotterell introduced this Rao-Blackwellized estimator of the KL between
language models (the exact next-token KL at each sampled prefix, unbiased, with variance at most the
Monte Carlo estimator's) and the analogous Rao-Blackwellized estimator of its gradient; kljax's
`exact_rkl_rb` is that gradient estimator, written as a per-token surrogate for a GRPO loss (with
the live prefix ratio W_{<t} off-policy), and `exact_rkl_as_loss` its frozen-prefix part.

References:
  A. Amini, T. Vieira, R. Cotterell, "Better Estimation of the KL Divergence Between Language
  Models", NeurIPS 2025, arXiv:2504.10637 (reference code: rycolab/kl-rb).
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), §5 (token vs
  sequence level).
  Casella & Robert, "Rao-Blackwellisation of sampling schemes", Biometrika 83 (1996).
  Williams, "Simple statistical gradient-following algorithms", Machine Learning 8 (1992) (the
  score-function term).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax import estimators as est
from kljax import logprobs

Direction = Literal["reverse", "forward"]
Credit = Literal["position", "sequence"]


# ---- Per-token surrogates of a per-position KL [B, T] ----


def _masked_kl(kl_bt, mask):
  return _checks.masked_series(kl_bt, mask, name="kl_bt", mask_name="mask")


def position_surrogate(kl_bt: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
  """s_t = KL_t: the per-position KL as loss; ∇Σ_t s_t = frozen-prefix ∇KL. float32 [B, T]."""
  return _masked_kl(kl_bt, mask)[0]


def sequence_surrogate(
    kl_bt: ArrayLike,
    logp_bt: ArrayLike,
    old_logp_bt: ArrayLike | None = None,
    *,
    mask: ArrayLike | None = None,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
) -> jax.Array:
  """s_t = W_{<t}·KL_t, W_{<t} = exp(Σ_{s<t} (log π_θ(y_s) − sg(log π_old(y_s)))), live.

  ∇Σ_t s_t = Σ_t W_{<t} ∇KL_t + Σ_s ∇log π(y_s) · Σ_{t>s} W_{<t} KL_t, whose expectation over
  y ~ π_old (π_θ on-policy, `old_logp_bt=None`: W ≡ 1) is ∇ KL(P_θ‖P_ref) of the whole sequence
  when `kl_bt` is the exact per-position reverse KL. The time axis is the last; masked positions
  (False in `mask`) contribute neither a KL nor a ratio factor.

  The Rao-Blackwellized gradient estimator of Amini, Vieira & Cotterell (NeurIPS 2025,
  arXiv:2504.10637), as a per-token surrogate (`exact_rkl_rb`); `position_surrogate` is its
  frozen-prefix part (`exact_rkl_as_loss`).

  Args:
    kl_bt: per-position KL [..., T], differentiable (e.g. `logprobs.position_kl`'s reverse column).
    logp_bt: log π_θ(y_t|y_<t) of the sampled tokens, same shape, differentiable.
    old_logp_bt: log π_old of the same tokens (the sampler), or None on-policy. Detached.
    mask: valid tokens, same shape.
    clamp: a log W above it is continued linearly (`kljax.estimators.exp_clamped`).
  Returns:
    float32 [..., T].
  """
  kl, mask = _masked_kl(kl_bt, mask)
  logp = _checks.as_float32(logp_bt, "logp_bt")
  old = (jax.lax.stop_gradient(logp) if old_logp_bt is None
         else jax.lax.stop_gradient(_checks.as_float32(old_logp_bt, "old_logp_bt")))
  _checks.same_shape(kl_bt=kl, logp_bt=logp, old_logp_bt=old)
  _checks.positive(clamp, "clamp")
  log_ratio = logp - old
  if mask is not None:
    log_ratio = jnp.where(mask.astype(bool), log_ratio, 0.0)
  log_w = jnp.cumsum(log_ratio, axis=-1) - log_ratio  # Σ_{s<t}: exclusive
  return est.exp_clamped(log_w, clamp) * kl


# ---- Top-k + importance-sampled tail ----


def _topk_mask(logits_nv, k):
  _, top = jax.lax.top_k(jax.lax.stop_gradient(logits_nv), k)
  return jnp.zeros(logits_nv.shape, bool).at[jnp.arange(logits_nv.shape[0])[:, None], top].set(True)


def _check_topk(vocab, k, num_samples):
  if not 1 <= int(k) < vocab:
    raise ValueError(f"k must satisfy 1 <= k < V = {vocab} (a tail must remain), got k={k}.")
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")


def _check_rows(logits, name):
  if logits.ndim != 2:
    raise ValueError(f"{name} must have shape [N, V], got {list(logits.shape)}.")


def sample_tail(key: jax.Array, logits_nv: ArrayLike, *, k: int, num_samples: int = 1) -> jax.Array:
  """`num_samples` i.i.d. tokens per row from π_θ restricted to outside its top k: int32 [N, m].

  The proposal r(v) = π(v)/P_tail for v outside the top k (the tail's own law), detached.
  """
  logits = jax.lax.stop_gradient(_checks.as_float32(logits_nv, "logits_nv"))
  _check_rows(logits, "logits_nv")
  _check_topk(logits.shape[-1], k, num_samples)
  tail_logits = jnp.where(_topk_mask(logits, int(k)), -jnp.inf, logits)
  return jax.random.categorical(key, tail_logits, axis=-1,
                                shape=(int(num_samples), logits.shape[0])).T.astype(jnp.int32)


def topk_tail_kl(logits_nv: ArrayLike, ref_logits_nv: ArrayLike, tail_nm: ArrayLike, *,
                 k: int) -> jax.Array:
  """An unbiased estimate of KL(π_θ‖π_ref) per row from the top k tokens and m tail samples.

    KL̂ = Σ_{v∈S} π(v) d(v) + (1/m) Σ_j π(v_j) d(v_j) / r(v_j),  d = log π − log π_ref,
    S = the k tokens of largest π_θ (a piecewise-constant choice), v_j ~ r = π/P_tail on the tail.

  r is data (detached), so E_r[KL̂] = KL and E_r[∇KL̂] = ∇KL exactly: the tail term is
  P_tail·exp(log π(v) − sg(log π(v)))·d(v), whose value is P_tail·d(v) and whose gradient is
  P_tail·(d(v) + 1)·∇log π(v) = ∇(π(v) d(v))/r(v). π_ref is detached.

  Args:
    logits_nv: policy logits [N, V] (computed in float32).
    ref_logits_nv: reference logits [N, V].
    tail_nm: int [N, m], tokens drawn by `sample_tail` (each outside the row's top k).
    k: tokens summed exactly, 1 <= k < V.
  Returns:
    float32 [N].
  """
  logits = _checks.as_float32(logits_nv, "logits_nv")
  ref = jax.lax.stop_gradient(_checks.as_float32(ref_logits_nv, "ref_logits_nv"))
  tail = jnp.asarray(tail_nm)
  _checks.same_shape(logits_nv=logits, ref_logits_nv=ref)
  _check_rows(logits, "logits_nv")
  if tail.ndim != 2 or tail.shape[0] != logits.shape[0] or not jnp.issubdtype(tail.dtype,
                                                                              jnp.integer):
    raise ValueError(f"tail_nm must be an integer array [N, m] with N = {logits.shape[0]}, got "
                     f"{tail.dtype} {list(tail.shape)}.")
  _check_topk(logits.shape[-1], k, tail.shape[1])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  d = log_p - jax.nn.log_softmax(ref, axis=-1)
  in_top = _topk_mask(logits, int(k))
  head = jnp.sum(jnp.where(in_top, jnp.exp(log_p) * d, 0.0), axis=-1)
  log_p_tail = jax.lax.stop_gradient(
      jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_p), axis=-1))
  lp_j = jnp.take_along_axis(log_p, tail, axis=-1)
  d_j = jnp.take_along_axis(d, tail, axis=-1)
  tail_term = jnp.exp(lp_j - jax.lax.stop_gradient(lp_j)) * d_j
  return head + jnp.exp(log_p_tail) * jnp.mean(tail_term, axis=-1)


def topk_position_kl(
    key: jax.Array,
    hidden_btd: ArrayLike,
    unembed_dv: ArrayLike,
    ref_hidden_btd: ArrayLike,
    ref_unembed_dv: ArrayLike,
    *,
    k: int,
    num_samples: int = 1,
    chunk_size: int = 512,
) -> jax.Array:
  """`topk_tail_kl` per position from hidden states, in chunks: float32 [B, T].

  Each chunk's logits are formed, reduced and dropped inside a `jax.checkpoint`ed scan body, so the
  backward pass recomputes them and neither pass holds more than one chunk's [C, V] logits. Both
  models' full logits are still formed per chunk (the normalizers need them), so here the estimate
  costs more than the exact sum: a top-k selection and a draw on top of the same matmuls
  (benchmarks/topk_tail.py measures by how much). It is the estimator for a setting where a
  position's whole distribution is not at hand (e.g. a reference served as its k most likely
  log-probabilities plus sampled ones); this path is its reference implementation.
  """
  no_targets = jnp.zeros(jnp.shape(hidden_btd)[:2], jnp.int32)
  h, w, _, rh, rw = logprobs.checked_inputs(hidden_btd, unembed_dv, no_targets, ref_hidden_btd,
                                            ref_unembed_dv)
  if rh is None:
    raise ValueError("topk_position_kl needs ref_hidden_btd and ref_unembed_dv.")
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  _check_topk(w.shape[1], k, num_samples)
  b, t, d = h.shape
  n = b * t
  c = min(int(chunk_size), n)
  pad = (-n) % c

  def chunks(x):
    x = x.reshape(n, x.shape[-1])
    return jnp.pad(x, [(0, pad), (0, 0)]).reshape(-1, c, x.shape[-1])

  @jax.checkpoint
  def one(w_dv, h_cd, rh_cd, key_c):
    z = jnp.dot(h_cd, w_dv.astype(h_cd.dtype), preferred_element_type=jnp.float32)
    rz = jnp.dot(rh_cd, rw.astype(rh_cd.dtype), preferred_element_type=jnp.float32)
    tail = sample_tail(key_c, z, k=k, num_samples=num_samples)
    return topk_tail_kl(z, rz, tail, k=k)

  def body(carry, xs):
    i, hc, rhc = xs
    return carry, one(w, hc, rhc, jax.random.fold_in(key, i))

  hs, rhs = chunks(h), chunks(rh)
  _, out = jax.lax.scan(body, None, (jnp.arange(hs.shape[0]), hs, rhs))
  return out.reshape(-1)[:n].reshape(b, t)


# ---- Terms: names usable from a config ----


class FullKLTerm(NamedTuple):
  """A KL term built on the per-position KL over the whole vocabulary.

  position_kl(hidden_btd, unembed_dv, ref_hidden_btd, ref_unembed_dv, *, key, chunk_size)
      -> KL_t [B, T], differentiable in the policy (exact, or the top-k + tail estimate).
  surrogate(kl_bt, logp_bt, old_logp_bt=None, *, mask=None) -> per-token loss [B, T].
  follows: the divergence whose gradient the term's expected gradient equals.
  """

  name: str
  placement: Literal["full"]
  direction: Direction
  credit: Credit
  top_k: int | None
  position_kl: Callable[..., jax.Array]
  surrogate: Callable[..., jax.Array]
  follows: str


def full_kl_term(
    *,
    direction: Direction = "reverse",
    credit: Credit = "position",
    top_k: int | None = None,
    tail_samples: int = 1,
    clamp: float = est.DEFAULT_LOG_RATIO_CLAMP,
    name: str | None = None,
) -> FullKLTerm:
  """A per-position KL term: exact (top_k=None) or top-k + tail, as loss or Rao-Blackwellized.

  Args:
    direction: "reverse" (KL(π_θ‖π_ref) per position) or "forward" (KL(π_ref‖π_θ); exact only,
      credit "position" only: the sequence forward KL weighs prefixes by P_ref, not P_θ).
    credit: "position" (`position_surrogate`: frozen-prefix gradient) or "sequence"
      (`sequence_surrogate`: the Rao-Blackwellized sequence ∇RKL).
    top_k: None for the exact sum, else the k of `topk_tail_kl`.
    tail_samples: m, tail tokens per position for top_k.
    clamp: log-ratio clamp of the cumulative prefix ratio (credit "sequence").
    name: defaults to the config name, e.g. "exact_rkl_rb" or "top64_rkl_as_loss".
  """
  if direction not in ("reverse", "forward"):
    raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}.")
  if credit not in ("position", "sequence"):
    raise ValueError(f"credit must be 'position' or 'sequence', got {credit!r}.")
  if direction == "forward" and (credit == "sequence" or top_k is not None):
    raise ValueError("the forward direction is available exact with credit='position' only "
                     f"(got credit={credit!r}, top_k={top_k!r}).")
  if top_k is not None and int(top_k) < 1:
    raise ValueError(f"top_k must be None or >= 1, got {top_k}.")
  if int(tail_samples) < 1:
    raise ValueError(f"tail_samples must be >= 1, got {tail_samples}.")
  _checks.positive(clamp, "clamp")
  prefix = "exact" if top_k is None else f"top{int(top_k)}"
  suffix = "rb" if credit == "sequence" else "as_loss"
  name = name or f"{prefix}_{'rkl' if direction == 'reverse' else 'fkl'}_{suffix}"

  def position_kl(hidden_btd, unembed_dv, ref_hidden_btd, ref_unembed_dv, *, key=None,
                  chunk_size=512):
    if top_k is None:
      rev, fwd = logprobs.position_kl(hidden_btd, unembed_dv, ref_hidden_btd, ref_unembed_dv,
                                      chunk_size=chunk_size)
      return rev if direction == "reverse" else fwd
    if key is None:
      raise ValueError(f"{name}: the top-k tail is sampled, so position_kl needs a PRNG `key`.")
    return topk_position_kl(key, hidden_btd, unembed_dv, ref_hidden_btd, ref_unembed_dv,
                            k=int(top_k), num_samples=int(tail_samples), chunk_size=chunk_size)

  if credit == "sequence":
    def surrogate(kl_bt, logp_bt, old_logp_bt=None, *, mask=None):
      return sequence_surrogate(kl_bt, logp_bt, old_logp_bt, mask=mask, clamp=clamp)
    follows = "∇RKL (sequence)"
  else:
    def surrogate(kl_bt, logp_bt=None, old_logp_bt=None, *, mask=None):
      del logp_bt, old_logp_bt  # the prefixes are whatever sampled them
      return position_surrogate(kl_bt, mask=mask)
    follows = "frozen-prefix ∇RKL" if direction == "reverse" else "frozen-prefix ∇FKL"
  return FullKLTerm(name, "full", direction, credit, None if top_k is None else int(top_k),
                    position_kl, surrogate, follows)


def logits_surrogate(term: FullKLTerm, logits_btv: ArrayLike, ref_logits_btv: ArrayLike,
                     tokens_bt: ArrayLike, old_logp_bt: ArrayLike | None = None, *,
                     tail_btm: ArrayLike | None = None, mask: ArrayLike | None = None) -> jax.Array:
  """`term`'s per-token surrogate from full logits [B, T, V] (tabular policies and tests, where
  V is small): KL_t over the last axis (`tail_btm` gives the top-k terms' tail tokens), the
  sampled tokens' log-probs, then `term.surrogate`. float32 [B, T]."""
  logits = _checks.as_float32(logits_btv, "logits_btv")
  ref_logits = _checks.as_float32(ref_logits_btv, "ref_logits_btv")
  _checks.same_shape(logits_btv=logits, ref_logits_btv=ref_logits)
  if logits.ndim != 3:
    raise ValueError(f"logits_btv must have shape [B, T, V], got {list(logits.shape)}.")
  b, t, v = logits.shape
  if term.top_k is None:
    kl = est.exact_kl(logits, jax.lax.stop_gradient(ref_logits), direction=term.direction)
  else:
    if tail_btm is None:
      raise ValueError(f"{term.name}: give the tail tokens `tail_btm` [B, T, m].")
    tail = jnp.asarray(tail_btm)
    kl = topk_tail_kl(logits.reshape(b * t, v), ref_logits.reshape(b * t, v),
                      tail.reshape(b * t, -1), k=term.top_k).reshape(b, t)
  tokens = jnp.asarray(tokens_bt)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
  return term.surrogate(kl, logp, old_logp_bt, mask=mask)
