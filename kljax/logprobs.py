"""Per-token log-probabilities, entropy and exact KL from hidden states, without [B, T, V] logits.

The tokens are cut into chunks of `chunk_size`; each chunk's logits [C, V] are computed in float32,
reduced to per-token statistics and dropped. The chunk function is rematerialized
(`jax.checkpoint` inside `jax.lax.map`), so the backward pass also holds one chunk's logits at a
time: peak memory is O(C·V) instead of O(B·T·V), for the price of recomputing each chunk's forward
matmul in the backward pass.

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


class TokenStats(NamedTuple):
  logp: jax.Array  # [B, T] float32
  entropy: jax.Array  # [B, T] float32
  reverse_kl: jax.Array | None  # [B, T] float32, when a reference is given
  forward_kl: jax.Array | None


def _stats(h_nd, w_dv, y_n, ref_h_nd, ref_w_dv):
  """The statistics of N tokens from their logits (the one place the formulas are written)."""
  logits = jnp.dot(h_nd, w_dv.astype(h_nd.dtype), preferred_element_type=jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  logp = jnp.take_along_axis(log_probs, y_n[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(probs * log_probs, axis=-1)
  if ref_h_nd is None:
    return logp, entropy, None, None
  ref_logits = jnp.dot(ref_h_nd, ref_w_dv.astype(ref_h_nd.dtype), preferred_element_type=jnp.float32)
  ref_log_probs = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, axis=-1))
  diff = log_probs - ref_log_probs
  reverse = jnp.sum(probs * diff, axis=-1)
  forward = -jnp.sum(jnp.exp(ref_log_probs) * diff, axis=-1)
  return logp, entropy, reverse, forward


def _inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd, ref_unembed_dv):
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
  h, w, y, rh, rw = _inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd, ref_unembed_dv)
  b, t, d = h.shape
  flat = lambda x: None if x is None else x.reshape(b * t, -1)
  out = _stats(flat(h), w, y.reshape(-1), flat(rh), rw)
  return TokenStats(*(None if x is None else x.reshape(b, t) for x in out))


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
  h, w, y, rh, rw = _inputs(hidden_btd, unembed_dv, targets_bt, ref_hidden_btd, ref_unembed_dv)
  b, t, d = h.shape
  n = b * t
  c = min(int(chunk_size), n)
  pad = (-n) % c

  def chunks(x):  # [B, T, ...] -> [n/c, c, ...], zero-padded
    x = x.reshape(n, *x.shape[2:])
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, c, *x.shape[1:])

  has_ref = rh is not None
  xs = (chunks(h), chunks(y), chunks(rh) if has_ref else None)

  @jax.checkpoint
  def one(chunk):
    hc, yc, rhc = chunk
    return _stats(hc, w, yc, rhc, rw)

  outs = jax.lax.map(one, xs)
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
