"""Per-token log-probabilities, entropy and exact KL from hidden states, without [B, T, V] logits.

The tokens are cut into chunks of `chunk_size`; each chunk's logits [C, V] are computed in float32,
reduced to per-token statistics and dropped. A custom VJP saves only per-token residuals and
recomputes each chunk's logits in the backward pass, so the backward pass too holds one chunk's
logits at a time: peak memory is O(C·V) instead of O(B·T·V), for the price of recomputing the
chunk's logits matmul(s) once.

  log π(y_t)          = z_y − logsumexp(z)
  entropy             = −Σ_v π(v) log π(v)
  reverse KL (exact)  = Σ_v π(v) (log π(v) − log π_ref(v))
  forward KL (exact)  = Σ_v π_ref(v) (log π_ref(v) − log π(v))

Gradients flow to the policy's hidden states and unembedding; the reference side is detached.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import _checks
from kljax import estimators as est


class TokenStats(NamedTuple):
  logp: jax.Array  # [B, T] float32
  entropy: jax.Array  # [B, T] float32
  reverse_kl: jax.Array | None  # [B, T] float32, when a reference is given
  forward_kl: jax.Array | None


def _stats(h_nd, w_dv, y_n, ref_h_nd, ref_w_dv):
  """The statistics of N tokens from their logits, written plainly (the reference the chunked path
  is tested against); the KLs are `kljax.estimators.kl_from_log_probs`."""
  logits = jnp.dot(h_nd, w_dv.astype(h_nd.dtype), preferred_element_type=jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  logp = jnp.take_along_axis(log_probs, y_n[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(probs * log_probs, axis=-1)
  if ref_h_nd is None:
    return logp, entropy, None, None
  ref_logits = jnp.dot(ref_h_nd, ref_w_dv.astype(ref_h_nd.dtype), preferred_element_type=jnp.float32)
  ref_log_probs = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, axis=-1))
  reverse = est.kl_from_log_probs(log_probs, ref_log_probs)
  forward = est.kl_from_log_probs(ref_log_probs, log_probs)
  return logp, entropy, reverse, forward


def checked_inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd, ref_unembed_dv):
  """The inputs of `token_stats` as arrays, their shapes checked against each other (a
  ValueError names what disagrees), the reference's under stop_gradient (None when not given)."""
  h = _checks.as_float(hidden_btd, "hidden_btd")
  w = _checks.as_float(unembed_dv, "unembed_dv")
  y = jnp.asarray(targets_bt)
  if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0]:
    raise ValueError(
        f"expected hidden_btd [B, T, D] and unembed_dv [D, V], got {list(h.shape)} and "
        f"{list(w.shape)}."
    )
  if y.shape != h.shape[:2] or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(
        f"targets_bt must be an integer array of shape {list(h.shape[:2])}, got {y.dtype} "
        f"{list(y.shape)}."
    )
  if (ref_hidden_btd is None) != (ref_unembed_dv is None):
    raise ValueError("give both ref_hidden_btd and ref_unembed_dv, or neither.")
  if ref_hidden_btd is not None:
    ref_h = _checks.as_float(ref_hidden_btd, "ref_hidden_btd")
    ref_w = _checks.as_float(ref_unembed_dv, "ref_unembed_dv")
    if ref_h.shape[:2] != h.shape[:2] or ref_h.shape[-1] != ref_w.shape[0] or (
        ref_w.shape[1] != w.shape[1]):
      raise ValueError(
          f"reference shapes {list(ref_h.shape)} / {list(ref_w.shape)} do not match the policy's "
          f"{list(h.shape)} / {list(w.shape)} (same B, T and vocabulary)."
      )
    return h, w, y, jax.lax.stop_gradient(ref_h), jax.lax.stop_gradient(ref_w)
  return h, w, y, None, None


def naive_token_stats(hidden_btd, unembed_dv, targets_bt, *, ref_hidden_btd=None,
                      ref_unembed_dv=None) -> TokenStats:
  """The same statistics with the full [B, T, V] logits materialized (a reference; memory-hungry)."""
  h, w, y, rh, rw = checked_inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd,
                                   ref_unembed_dv)
  b, t, d = h.shape
  flat = lambda x: None if x is None else x.reshape(b * t, -1)
  out = _stats(flat(h), w, y.reshape(-1), flat(rh), rw)
  return TokenStats(*(None if x is None else x.reshape(b, t) for x in out))


def _chunk_forward(h_cd, w_dv, y_c, ref_h_cd, ref_w_dv):
  """Per-token statistics of one chunk, and the per-token residuals the backward pass needs."""
  z = jnp.dot(h_cd, w_dv.astype(h_cd.dtype), preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  p = jnp.exp(z - lse[:, None])
  pz = jnp.sum(p * z, axis=-1)
  logp = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0] - lse
  entropy = lse - pz  # −Σ p log p with log p = z − lse
  if ref_h_cd is None:
    return (logp, entropy, None, None), (lse, entropy, None, None)
  rz = jnp.dot(ref_h_cd, ref_w_dv.astype(ref_h_cd.dtype), preferred_element_type=jnp.float32)
  rlse = jax.nn.logsumexp(rz, axis=-1)
  q = jnp.exp(rz - rlse[:, None])
  reverse = pz - jnp.sum(p * rz, axis=-1) - lse + rlse  # Σ p (log p − log q)
  forward = jnp.sum(q * rz, axis=-1) - jnp.sum(q * z, axis=-1) - rlse + lse  # Σ q (log q − log p)
  return (logp, entropy, reverse, forward), (lse, entropy, rlse, reverse)


def _chunk_dz(h_cd, w_dv, y_c, ref_h_cd, ref_w_dv, res, g):
  """∂(Σ_k g_k·stat_k)/∂logits for one chunk, recomputing its logits once.

  d logp_y = onehot − p;  dH = −p(log p + H);  dRKL = p(log p − log q − RKL);  dFKL = p − q.
  """
  lse, entropy, rlse, reverse = res
  g_logp, g_ent, g_rkl, g_fkl = g
  z = jnp.dot(h_cd, w_dv.astype(h_cd.dtype), preferred_element_type=jnp.float32)
  log_p = z - lse[:, None]
  p = jnp.exp(log_p)
  inner = -g_logp[:, None] - g_ent[:, None] * (log_p + entropy[:, None])
  dz = None
  if ref_h_cd is not None:
    rz = jnp.dot(ref_h_cd, ref_w_dv.astype(ref_h_cd.dtype), preferred_element_type=jnp.float32)
    log_q = rz - rlse[:, None]
    inner = inner + g_rkl[:, None] * (log_p - log_q - reverse[:, None]) + g_fkl[:, None]
    dz = -g_fkl[:, None] * jnp.exp(log_q)
  dz = p * inner if dz is None else dz + p * inner
  onehot = jax.nn.one_hot(y_c, z.shape[-1], dtype=jnp.float32)
  return dz + g_logp[:, None] * onehot


@jax.custom_vjp
def _chunked(h_ncd, w_dv, y_nc, ref_h_ncd, ref_w_dv):
  return _chunked_fwd(h_ncd, w_dv, y_nc, ref_h_ncd, ref_w_dv)[0]


def _chunked_fwd(h_ncd, w_dv, y_nc, ref_h_ncd, ref_w_dv):
  outs, res = jax.lax.map(lambda xs: _chunk_forward(xs[0], w_dv, xs[1], xs[2], ref_w_dv),
                          (h_ncd, y_nc, ref_h_ncd))
  return outs, (h_ncd, w_dv, y_nc, ref_h_ncd, ref_w_dv, res)


def _chunked_bwd(saved, g):
  h_ncd, w_dv, y_nc, ref_h_ncd, ref_w_dv, res = saved
  zeros = jnp.zeros(y_nc.shape, jnp.float32)
  g = tuple(zeros if x is None else x.astype(jnp.float32) for x in g)

  def grads(xs):  # one chunk's (∂/∂w [D, V], ∂/∂h [C, D])
    hc, yc, rhc, rc, gc = xs
    dz = _chunk_dz(hc, w_dv, yc, rhc, ref_w_dv, rc, gc)
    dh = jnp.dot(dz, w_dv.T.astype(jnp.float32)).astype(hc.dtype)
    return jnp.dot(hc.T.astype(jnp.float32), dz), dh

  xs = (h_ncd, y_nc, ref_h_ncd, res, g)
  if h_ncd.shape[0] == 1:  # one chunk: no scan and no zero-filled [D, V] accumulator to fault in
    dw, dh = grads(jax.tree.map(lambda x: x[0], xs))
    dh = dh[None]
  else:
    def body(acc, chunk):
      dw_c, dh_c = grads(chunk)
      return acc + dw_c, dh_c

    dw, dh = jax.lax.scan(body, jnp.zeros(w_dv.shape, jnp.float32), xs)
  # the reference is data: no cotangent flows to it (its inputs were stop_gradient'ed too)
  return dh, dw.astype(w_dv.dtype), None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_stats(
    hidden_btd: ArrayLike,
    unembed_dv: ArrayLike,
    targets_bt: ArrayLike,
    *,
    ref_hidden_btd: ArrayLike | None = None,
    ref_unembed_dv: ArrayLike | None = None,
    chunk_size: int = 512,
) -> TokenStats:
  """log π(targets), entropy and (with a reference) exact reverse/forward KL per token, chunked.

  A custom VJP keeps only per-token residuals (log-normalizers, entropy, reverse KL); the backward
  pass recomputes each chunk's logits once and forms ∂/∂logits in one fused expression, so neither
  pass holds more than one chunk's [C, V] logits.

  Args:
    hidden_btd: the policy's final hidden states [B, T, D] (any float dtype).
    unembed_dv: the policy's output projection [D, V].
    targets_bt: int [B, T], the token whose log-probability is wanted at each position.
    ref_hidden_btd, ref_unembed_dv: the reference model's, for the KL columns (detached).
    chunk_size: tokens per chunk; peak memory ~ chunk_size × V × 4 bytes × a few.
  Returns:
    `TokenStats` of float32 [B, T] arrays (KL fields None without a reference).
  """
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  h, w, y, rh, rw = checked_inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd,
                                   ref_unembed_dv)
  b, t, d = h.shape
  n = b * t
  c = min(int(chunk_size), n)
  pad = (-n) % c

  def chunks(x):  # [B, T, ...] -> [n/c, c, ...], zero-padded
    if x is None:
      return None
    x = x.reshape(n, *x.shape[2:])
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, c, *x.shape[1:])

  outs = _chunked(chunks(h), w, chunks(y), chunks(rh), rw)
  unchunk = lambda x: None if x is None else x.reshape(-1)[:n].reshape(b, t)
  return TokenStats(*(unchunk(x) for x in outs))


def model_token_stats(model, tokens_bt, *, attention_mask_bt=None, ref_model=None,
                      chunk_size: int = 512) -> TokenStats:
  """Statistics of predicting tokens[:, 1:] from each prefix, for a `kljax.models.Decoder`.

  Returns [B, T−1] arrays: entry t is about token t+1. Combine with the mask of the completion.
  """
  tokens = jnp.asarray(tokens_bt)
  h, _ = model.hidden_states(tokens, attention_mask_bt=attention_mask_bt)
  ref_h = ref_w = None
  if ref_model is not None:
    ref_h, _ = ref_model.hidden_states(tokens, attention_mask_bt=attention_mask_bt)
    ref_h, ref_w = ref_h[:, :-1], ref_model.unembedding()
  return token_stats(h[:, :-1], model.unembedding(), tokens[:, 1:], ref_hidden_btd=ref_h,
                     ref_unembed_dv=ref_w, chunk_size=chunk_size)


def position_kl(
    hidden_btd: ArrayLike,
    unembed_dv: ArrayLike,
    ref_hidden_btd: ArrayLike,
    ref_unembed_dv: ArrayLike,
    *,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
  """Exact per-position reverse and forward KL between the two models' next-token distributions.

    reverse_t = Σ_v π_θ(v|y_<t) (log π_θ(v|y_<t) − log π_ref(v|y_<t))
    forward_t = Σ_v π_ref(v|y_<t) (log π_ref(v|y_<t) − log π_θ(v|y_<t))

  The chunked custom-VJP path of `token_stats` (no token is needed: the KL is over the whole
  vocabulary), so neither pass holds more than one chunk's [C, V] logits; float32 whatever the
  hidden states' dtype. Differentiable in the policy's hidden states and unembedding; the reference
  is detached.

  Args:
    hidden_btd, unembed_dv: the policy's final hidden states [B, T, D] and output projection [D, V].
    ref_hidden_btd, ref_unembed_dv: the reference model's, same B, T and V.
    chunk_size: positions per chunk.
  Returns:
    (reverse_bt, forward_bt), float32 [B, T].
  """
  if ref_hidden_btd is None or ref_unembed_dv is None:
    raise ValueError("position_kl needs ref_hidden_btd and ref_unembed_dv (the reference model's).")
  h = _checks.as_float(hidden_btd, "hidden_btd")
  targets = jnp.zeros(h.shape[:2], jnp.int32)  # unused by the KL columns
  stats = token_stats(h, unembed_dv, targets, ref_hidden_btd=ref_hidden_btd,
                      ref_unembed_dv=ref_unembed_dv, chunk_size=chunk_size)
  return stats.reverse_kl, stats.forward_kl
