"""jit-compiled autoregressive sampling with a KV cache, for rollouts.

A batch of left-padded prompts is prefilled in one forward pass (each prompt once, when it is to be
sampled several times: `samples_per_prompt`); then one token per step is drawn
with temperature, top-k and top-p, each sequence stopping at its first EOS, for at most
`max_new_tokens` steps (the loop exits early once every sequence has stopped). The result carries the
sampler's own per-token log-probabilities: log-probabilities under the distribution the token was
actually drawn from (after temperature, top-k and top-p; with temperature 1 and no filtering, the
model's own). Deterministic for a given key. Shard the prompts along `data` (see
`kljax.sharding.batch_sharding`) and the whole loop runs sharded.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from kljax import _checks


class SampleOutput(NamedTuple):
  tokens_bt: jax.Array  # int32 [B, P + N]: the prompts as given, then the completions (pad after EOS)
  logprobs_bn: jax.Array  # float32 [B, N]: the sampler's log-prob of each generated token (0 if none)
  completion_mask_bn: jax.Array  # bool [B, N]: generated tokens, up to and including the first EOS


def filter_logits(logits_bv: jax.Array, *, temperature: float, top_k: int, top_p,
                  nucleus: bool = True) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) filtering; filtered entries become −inf.

  `nucleus=False` (static) skips the top-p sort when top_p is 1.
  """
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not nucleus:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted entry
  keep = before < top_p  # always keeps the most likely token
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def _choose(logits_bv, key, *, greedy, temperature, top_k, top_p, nucleus):
  if greedy:
    token = jnp.argmax(logits_bv, axis=-1)
    return token.astype(jnp.int32), jax.nn.log_softmax(logits_bv.astype(jnp.float32))[
        jnp.arange(token.shape[0]), token]
  logits = filter_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p,
                         nucleus=nucleus)
  token = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp


def _repeat_rows(cache, n: int):
  """The cache of U prompts as the cache of U·n rows (each prompt's row repeated n times)."""
  batch_axis = lambda x: 1 if x.ndim == 5 else 0  # stacked [L, B, S, K, Hd] or per-layer [B, ...]
  rep = lambda x: jnp.repeat(x, n, axis=batch_axis(x))
  return cache._replace(k=jax.tree.map(rep, cache.k), v=jax.tree.map(rep, cache.v),
                        valid_bs=jnp.repeat(cache.valid_bs, n, axis=0))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy",
                                             "nucleus", "samples_per_prompt", "per_layer"))
def _sample(graphdef, state, prompt_bp, mask_bp, key, temperature, top_p, eos_id, pad_id, *,
            max_new_tokens, top_k, greedy, nucleus, samples_per_prompt, per_layer):
  model = nnx.merge(graphdef, state)
  u, p = prompt_bp.shape
  # Weights whole on each device: each layer's sliced out of the stacked parameters once, here,
  # and the decode loop reads them in place (a scan over the stacked weights copies them all at
  # every step: a third of a CPU decode). Weights split over devices (fsdp) keep the scan, which
  # gathers one layer at a time: sliced before the loop, XLA would gather the whole model there.
  cache = model.init_cache(u, p + max_new_tokens, per_layer=per_layer)
  layers = model.split_layer_params() if per_layer else None
  positions = jnp.maximum(jnp.cumsum(mask_bp, axis=1) - 1, 0)
  logits, cache = model.logits_and_cache(prompt_bp, positions_bt=positions,
                                         attention_mask_bt=mask_bp, cache=cache, layers=layers)
  if samples_per_prompt > 1:  # each prompt prefilled once, its cache shared by its samples
    n = samples_per_prompt
    cache, logits = _repeat_rows(cache, n), jnp.repeat(logits, n, axis=0)
    prompt_bp, mask_bp = jnp.repeat(prompt_bp, n, axis=0), jnp.repeat(mask_bp, n, axis=0)
  b = prompt_bp.shape[0]
  choose = functools.partial(_choose, greedy=greedy, temperature=temperature, top_k=top_k,
                             top_p=top_p, nucleus=nucleus)

  def cond(carry):
    i, _, _, _, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last_logits, key, tokens, logps, live, done, pos = carry
    key, sub = jax.random.split(key)
    token, logp = choose(last_logits, sub)
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, i].set(token)
    logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
    live = live.at[:, i].set(~done)
    step_logits, cache = model.logits_and_cache(token[:, None], positions_bt=pos[:, None],
                                                attention_mask_bt=~done[:, None], cache=cache,
                                                layers=layers)
    done = done | (token == eos_id)
    return i + 1, cache, step_logits[:, -1], key, tokens, logps, live, done, pos + 1

  init = (
      jnp.zeros((), jnp.int32), cache, logits[:, -1], key,
      jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((b, max_new_tokens), jnp.float32),
      jnp.zeros((b, max_new_tokens), bool),
      jnp.zeros((b,), bool),
      jnp.sum(mask_bp, axis=1).astype(jnp.int32),
  )
  _, _, _, _, tokens, logps, live, _, _ = jax.lax.while_loop(cond, body, init)
  return SampleOutput(jnp.concatenate([prompt_bp, tokens], axis=1), logps, live)


def sample(
    model: nnx.Module,
    prompt_bp: ArrayLike,
    prompt_mask_bp: ArrayLike,
    key: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    samples_per_prompt: int = 1,
) -> SampleOutput:
  """Samples completions for left-padded prompts with a KV cache.

  Args:
    model: a `kljax.models.Decoder`.
    prompt_bp: int [B, P] prompts, left-padded. prompt_mask_bp: [B, P], True for real tokens; every
      row needs at least one.
    key: a PRNG key; the same key gives the same output.
    max_new_tokens: N ≥ 1. eos_id: stops a sequence (the EOS itself is part of the completion).
    pad_id: written after a sequence stops.
    temperature: > 0, or 0 for greedy decoding. top_k: 0 (off) or the number of tokens kept.
    top_p: in (0, 1]; 1 is off.
    samples_per_prompt: n ≥ 1 completions of each prompt (GRPO's group). Each prompt is prefilled
      once and its cache shared; the output has U·n rows, row i·n + j the j-th sample of prompt i
      (the order of `np.repeat(prompts, n, axis=0)`).
  """
  prompt = jnp.asarray(prompt_bp)
  mask = jnp.asarray(prompt_mask_bp).astype(bool)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt_bp must be an integer array [B, P], got {prompt.dtype} "
                     f"{list(prompt.shape)}.")
  if mask.shape != prompt.shape:
    raise ValueError(f"prompt_mask_bp must have shape {list(prompt.shape)}, got {list(mask.shape)}.")
  if not isinstance(mask, jax.core.Tracer) and not bool(jnp.all(jnp.any(mask, axis=1))):
    raise ValueError("every prompt needs at least one real token (a row of prompt_mask_bp is empty).")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  vocab = model.config.vocab_size
  if not 0 <= int(top_k) <= vocab:
    raise ValueError(f"top_k must be 0 (off) or in [1, {vocab}], got {top_k}.")
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p}.")
  _checks.positive(temperature, "temperature", allow_zero=True)
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if not 0 <= int(value) < vocab:
      raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value}.")
  if int(samples_per_prompt) < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}.")
  graphdef, state = nnx.split(model)
  greedy = float(temperature) == 0.0
  whole = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)
              if isinstance(x, jax.Array))  # every device holds every weight
  return _sample(graphdef, state, prompt.astype(jnp.int32), mask, key,
                 jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
                 jnp.int32(eos_id), jnp.int32(pad_id), max_new_tokens=int(max_new_tokens),
                 top_k=int(top_k), greedy=greedy, nucleus=float(top_p) < 1.0,
                 samples_per_prompt=int(samples_per_prompt), per_layer=whole)
