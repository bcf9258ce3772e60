"""A Flax NNX decoder for the Llama 3 and Qwen2/Qwen2.5 families.

RMSNorm, rotary embeddings (with Llama-3.1 frequency scaling), grouped-query attention, SwiGLU MLP,
optional QKV bias, tied or untied embeddings, causal attention with left padding and explicit
positions, and an optional KV cache for sampling.

Layers are stored stacked (a leading `layers` axis on every block parameter) and run with
`jax.lax.scan`, so compile time does not grow with depth (or unrolled, `scan_layers=False`: ~10%
faster steps on CPU, for shallow models). Every parameter carries logical axis names
(`nnx.with_partitioning`); `kljax.sharding` maps them to mesh axes.

References:
  Touvron et al., "LLaMA" (2023); Dubey et al., "The Llama 3 Herd of Models" (2024) (rope scaling);
  Yang et al., "Qwen2 Technical Report" (2024); Su et al., "RoFormer" (2021); Ainslie et al., "GQA"
  (2023); Shazeer, "GLU Variants Improve Transformer" (2020).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from kljax import sharding
from kljax.models.config import ModelConfig

_NEG_INF = -1e30  # a large finite negative: fully masked rows stay finite (no NaN from −inf − −inf)


class KVCache(NamedTuple):
  """Keys and values of every layer for S slots, and which slots hold a real (non-pad) token."""

  k: jax.Array | tuple[jax.Array, ...]  # [L, B, S, K, Hd]; unrolled layers: L arrays [B, S, K, Hd]
  v: jax.Array | tuple[jax.Array, ...]
  valid_bs: jax.Array  # [B, S] bool
  index: jax.Array  # int32 scalar: the next slot to write


def _param(rngs, init, shape, axes, dtype):
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def rope_frequencies(config: ModelConfig) -> jax.Array:
  """Inverse frequencies θ^(−2i/d) [Hd/2], with Llama-3.1 or linear scaling when configured."""
  hd = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  s = config.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return inv_freq / s.factor
  # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp in between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, Hd] by position (the "rotate half" layout of HF checkpoints)."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, Hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def dense(x, w):
  """x [B, T, D_in] @ w [D_in, *out] -> [B, T, *out] as one 2-D matmul over the B·T tokens.

  Equivalent to an einsum, but its backward (the weight gradient contracts over B and T) runs
  ~2× faster on CPU as a plain [N, D_in]ᵀ[N, D_out] matmul.
  """
  b, t, d = x.shape
  y = jnp.dot(x.reshape(b * t, d), w.reshape(d, -1))
  return y.reshape(b, t, *w.shape[1:])


def attention(q, k, v, allowed_bts, dtype):
  """Grouped-query attention. q [B,T,H,Hd], k/v [B,S,K,Hd], allowed [B,T,S] -> [B,T,H,Hd]."""
  b, t, h, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, hd)
  if t == 1:
    # One query (a decode step): multiply-and-reduce reads the cache once in its stored layout,
    # where a batched matmul would first transpose every layer's whole cache (on CPU, most of a
    # small model's decode step).
    qf = q[:, 0].astype(jnp.float32)  # [B, K, G, Hd]
    scores = jnp.sum(qf[:, None] * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)  # [B,S,K,G]
    scores = jnp.where(allowed_bts[:, 0, :, None, None], scores / math.sqrt(hd), _NEG_INF)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B,K,G,Hd]
    return out.astype(dtype).reshape(b, 1, h, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(hd)
  scores = jnp.where(allowed_bts[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, hd)


# ---- How a layer's keys and values reach attention: one writer per cache layout ----


def _uncached(k, v):
  """No cache: attend to this step's own keys and values."""
  return k, v, None


def _buffer_writer(k_buf, v_buf, index, dtype):
  """One layer's own [B, S, K, Hd] buffers: write this step's keys/values at slot `index`, attend
  to every slot."""

  def write(k, v):
    at = (0, index, 0, 0)
    k_new = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), at)
    v_new = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), at)
    return k_new.astype(dtype), v_new.astype(dtype), (k_new, v_new)

  return write


def _stacked_writer(k_all, v_all, layer, index, dtype):
  """Layer `layer` of the whole [L, B, S, K, Hd] cache, written in place in the layer loop's carry
  (no per-step copy of the cache)."""

  def write(k, v):
    at = (layer, 0, index, 0, 0)
    k_new = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
    v_new = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
    k_l = jax.lax.dynamic_index_in_dim(k_new, layer, 0, keepdims=False).astype(dtype)
    v_l = jax.lax.dynamic_index_in_dim(v_new, layer, 0, keepdims=False).astype(dtype)
    return k_l, v_l, (k_new, v_new)

  return write


class Decoder(nnx.Module):
  """`model(tokens_bt)` → float32 logits [B, T, V]; see `__call__` for padding and the cache."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    pd = c.jnp_param_dtype
    L, D, H, K, Hd, F, V = (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
                            c.mlp_dim, c.padded_vocab)
    normal = nnx.initializers.normal(stddev=0.02)
    fan_in = lambda fan: nnx.initializers.normal(stddev=1.0 / math.sqrt(fan))
    ones, zeros = nnx.initializers.ones, nnx.initializers.zeros
    self.embed = _param(rngs, normal, (V, D), ("vocab", "embed"), pd)
    self.attn_norm = _param(rngs, ones, (L, D), ("layers", "norm"), pd)
    self.wq = _param(rngs, fan_in(D), (L, D, H, Hd), ("layers", "embed", "heads", "head_dim"), pd)
    self.wk = _param(rngs, fan_in(D), (L, D, K, Hd), ("layers", "embed", "kv_heads", "head_dim"), pd)
    self.wv = _param(rngs, fan_in(D), (L, D, K, Hd), ("layers", "embed", "kv_heads", "head_dim"), pd)
    self.wo = _param(rngs, fan_in(H * Hd), (L, H, Hd, D), ("layers", "heads", "head_dim", "embed"),
                     pd)
    if c.qkv_bias:
      self.bq = _param(rngs, zeros, (L, H, Hd), ("layers", "heads", "head_dim"), pd)
      self.bk = _param(rngs, zeros, (L, K, Hd), ("layers", "kv_heads", "head_dim"), pd)
      self.bv = _param(rngs, zeros, (L, K, Hd), ("layers", "kv_heads", "head_dim"), pd)
    self.mlp_norm = _param(rngs, ones, (L, D), ("layers", "norm"), pd)
    self.w_gate = _param(rngs, fan_in(D), (L, D, F), ("layers", "embed", "mlp"), pd)
    self.w_up = _param(rngs, fan_in(D), (L, D, F), ("layers", "embed", "mlp"), pd)
    self.w_down = _param(rngs, fan_in(F), (L, F, D), ("layers", "mlp", "embed"), pd)
    self.final_norm = _param(rngs, ones, (D,), ("norm",), pd)
    if not c.tie_embeddings:
      self.lm_head = _param(rngs, normal, (D, V), ("embed", "vocab"), pd)

  # ---- pieces ----

  def unembedding(self) -> jax.Array:
    """The output projection [D, V] (the transposed embedding when tied), without padded rows."""
    c = self.config
    w = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    return w if c.padded_vocab == c.vocab_size else w[:, :c.vocab_size]

  def _layer_params(self) -> dict[str, jax.Array]:
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    if self.config.qkv_bias:
      names += ["bq", "bk", "bv"]
    return {n: getattr(self, n)[...] for n in names}

  def _block(self, x, p, positions_bt, allowed_bts, inv_freq, kv):
    """One decoder layer. `kv(k, v) -> (keys, values, cache_out)` gives attention this step's keys
    and values (`_uncached`) or writes them into a cache and returns its slots (`_buffer_writer`,
    `_stacked_writer`), so attention is written once for every cache layout."""
    c = self.config
    dt = c.jnp_dtype
    h = rms_norm(x, p["attn_norm"], c.rms_eps)
    q = dense(h, p["wq"].astype(dt))
    k = dense(h, p["wk"].astype(dt))
    v = dense(h, p["wv"].astype(dt))
    if c.qkv_bias:
      q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
    k, v, cache_out = kv(k, v)
    attn = attention(q, k, v, allowed_bts, dt)
    b, t = attn.shape[:2]
    x = x + dense(attn.reshape(b, t, -1), p["wo"].astype(dt).reshape(-1, c.d_model))
    h = rms_norm(x, p["mlp_norm"], c.rms_eps)
    gate = dense(h, p["w_gate"].astype(dt))
    up = dense(h, p["w_up"].astype(dt))
    x = x + dense(jax.nn.silu(gate) * up, p["w_down"].astype(dt))
    return x, cache_out

  def split_layer_params(self) -> list[dict[str, jax.Array]]:
    """Per-layer weights sliced out of the stacked parameters, one dict a layer."""
    stacked = self._layer_params()
    return [{n: w[i] for n, w in stacked.items()} for i in range(self.config.num_layers)]

  def hidden_states(
      self,
      tokens_bt: ArrayLike,
      *,
      positions_bt: ArrayLike | None = None,
      attention_mask_bt: ArrayLike | None = None,
      cache: KVCache | None = None,
      layers: list[dict[str, jax.Array]] | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache (or None).

    `layers`: `split_layer_params()` computed once outside a decode loop (a per-layer cache);
    inside a loop, slicing the stacked weights would copy every layer's weights per step.
    """
    c = self.config
    tokens = jnp.asarray(tokens_bt)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"tokens_bt must be an integer array [B, T], got {tokens.dtype} {list(tokens.shape)}."
      )
    b, t = tokens.shape
    mask = (jnp.ones((b, t), bool) if attention_mask_bt is None
            else jnp.asarray(attention_mask_bt).astype(bool))
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask_bt must have shape {[b, t]}, got {list(mask.shape)}.")
    if cache is None:
      if positions_bt is None:  # left padding: real tokens count from 0
        positions_bt = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
      slots = jnp.arange(t)
      allowed = mask[:, None, :] & (slots[None, :, None] >= slots[None, None, :])
      index = None
    else:
      if positions_bt is None:
        raise ValueError("positions_bt is required with a cache (the cache does not store them).")
      s = cache.valid_bs.shape[1]
      index = cache.index
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, mask, index, axis=1)
      q_slots = index + jnp.arange(t)
      allowed = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slots[None, :, None])
    positions_bt = jnp.asarray(positions_bt, jnp.int32)
    inv_freq = rope_frequencies(c)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(c.jnp_dtype)
    if cache is None:
      x, _ = self._scanned_layers(x, positions_bt, allowed, inv_freq, None, None)
      return rms_norm(x, self.final_norm[...], c.rms_eps), None
    if isinstance(cache.k, tuple):  # unrolled layers, one buffer each (`init_cache`)
      x, (k, v) = self._unrolled_cached_layers(x, layers, positions_bt, allowed, inv_freq,
                                                (cache.k, cache.v), index)
    else:
      x, (k, v) = self._scanned_layers(x, positions_bt, allowed, inv_freq, (cache.k, cache.v),
                                       index)
    x = rms_norm(x, self.final_norm[...], c.rms_eps)
    return x, KVCache(k, v, valid, index + t)

  def _scanned_layers(self, x, positions_bt, allowed, inv_freq, kv_all, index):
    """The stacked layers under `jax.lax.scan` (`unroll=True` when not `scan_layers`), without a
    cache (`kv_all=None`) or with the whole [L, B, S, K, Hd] cache riding in the carry."""
    c = self.config

    def body(carry, layer):
      x, kv_all = carry
      p, i = layer
      x = sharding.constrain_batch(x)
      kv = _uncached if kv_all is None else _stacked_writer(*kv_all, i, index, c.jnp_dtype)
      return self._block(x, p, positions_bt, allowed, inv_freq, kv), None

    if c.remat and kv_all is None:
      body = jax.checkpoint(body, prevent_cse=False)
    (x, kv_all), _ = jax.lax.scan(body, (x, kv_all),
                                  (self._layer_params(), jnp.arange(c.num_layers)),
                                  unroll=1 if c.scan_layers else True)
    return x, kv_all

  def _unrolled_cached_layers(self, x, layers, positions_bt, allowed, inv_freq, kv, index):
    """Unrolled layers, each with its own [B, S, K, Hd] cache buffers (no slicing copies)."""
    ks, vs = list(kv[0]), list(kv[1])
    layers = self.split_layer_params() if layers is None else layers
    for i in range(self.config.num_layers):
      x = sharding.constrain_batch(x)
      x, (ks[i], vs[i]) = self._block(x, layers[i], positions_bt, allowed, inv_freq,
                                      _buffer_writer(ks[i], vs[i], index, self.config.jnp_dtype))
    return x, (tuple(ks), tuple(vs))

  def __call__(
      self,
      tokens_bt: ArrayLike,
      *,
      positions_bt: ArrayLike | None = None,
      attention_mask_bt: ArrayLike | None = None,
  ) -> jax.Array:
    """Float32 logits [B, T, V].

    Args:
      tokens_bt: int [B, T]; left padding is allowed.
      positions_bt: optional int [B, T]; by default the count of real tokens before each one.
      attention_mask_bt: optional [B, T], True/1 for real tokens; pads are never attended to.
    """
    h, _ = self.hidden_states(tokens_bt, positions_bt=positions_bt,
                              attention_mask_bt=attention_mask_bt)
    return self._logits(h)

  def _logits(self, h_btd):
    b, t, d = h_btd.shape
    logits = jnp.dot(h_btd.reshape(b * t, d), self.unembedding().astype(h_btd.dtype),
                     preferred_element_type=jnp.float32)
    return logits.reshape(b, t, -1)

  def logits_and_cache(self, tokens_bt, *, positions_bt, attention_mask_bt, cache: KVCache,
                       layers=None):
    """One cached step (prefill or decode): float32 logits [B, T, V] and the updated cache.
    `layers`: see `hidden_states`."""
    h, cache = self.hidden_states(tokens_bt, positions_bt=positions_bt,
                                  attention_mask_bt=attention_mask_bt, cache=cache, layers=layers)
    return self._logits(h), cache

  def init_cache(self, batch: int, max_len: int, dtype=None, *, per_layer: bool | None = None
                 ) -> KVCache:
    """An empty cache of `max_len` slots (dtype defaults to the compute dtype): one buffer a layer
    (`per_layer`, by default when not `scan_layers`; the layers then run unrolled), or one stacked
    buffer that a scan over the layers carries."""
    c = self.config
    dtype = c.jnp_dtype if dtype is None else dtype
    shape = (batch, max_len, c.num_kv_heads, c.head_dim)
    if not (not c.scan_layers if per_layer is None else per_layer):
      k = v = jnp.zeros((c.num_layers, *shape), dtype)
    else:  # one buffer a layer: each is updated in place, never sliced out of a stacked array
      k = v = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
    return KVCache(k, v,
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def create(config: ModelConfig, *, seed: int = 0) -> Decoder:
  """A randomly initialized decoder (logical axis names kept as metadata, not applied eagerly)."""
  with nnx.use_eager_sharding(False):
    return Decoder(config, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig) -> Decoder:
  """The decoder with `jax.ShapeDtypeStruct` leaves: shapes and axis names, nothing allocated."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


def count_params(model: Decoder) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
