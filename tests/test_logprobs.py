"""Chunked log-probs, entropy and exact KL equal the naive computation, values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import logprobs, models


def _np_stats(h, w, y, rh, rw):
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  rz = np.asarray(rh, np.float64) @ np.asarray(rw, np.float64)
  lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  lq = rz - np.log(np.exp(rz - rz.max(-1, keepdims=True)).sum(-1, keepdims=True)) - rz.max(-1, keepdims=True)
  p, q = np.exp(lp), np.exp(lq)
  logp = np.take_along_axis(lp, np.asarray(y)[..., None], -1)[..., 0]
  return logp, -(p * lp).sum(-1), (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1)


@pytest.fixture
def data():
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  b, t, d, v = 3, 7, 16, 50
  return dict(
      h=jax.random.normal(k[0], (b, t, d)), w=0.5 * jax.random.normal(k[1], (d, v)),
      y=jax.random.randint(k[2], (b, t), 0, v), rh=jax.random.normal(k[3], (b, t, d)),
      rw=0.5 * jax.random.normal(k[4], (d, v)))


def test_naive_matches_numpy(data):
  got = logprobs.naive_token_stats(data["h"], data["w"], data["y"], ref_hidden_btd=data["rh"],
                                   ref_unembed_dv=data["rw"])
  for a, b in zip(got, _np_stats(data["h"], data["w"], data["y"], data["rh"], data["rw"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 21, 1000])  # 4 does not divide 21 tokens: padding path
def test_chunked_equals_naive_values_and_gradients(data, chunk):
  kw = dict(ref_hidden_btd=data["rh"], ref_unembed_dv=data["rw"])
  chunked = logprobs.token_stats(data["h"], data["w"], data["y"], chunk_size=chunk, **kw)
  naive = logprobs.naive_token_stats(data["h"], data["w"], data["y"], **kw)
  chex.assert_trees_all_close(chunked, naive, atol=1e-5, rtol=1e-7)

  weights = (1.0, 0.3, 0.7, -0.2)  # a cotangent on every output

  def scalar(fn):
    return lambda h, w: sum(jnp.sum(c * x) for c, x in zip(weights, fn(h, w)))

  g_chunked = jax.grad(scalar(lambda h, w: logprobs.token_stats(
      h, w, data["y"], chunk_size=chunk, **kw)), argnums=(0, 1))(data["h"], data["w"])
  g_naive = jax.grad(scalar(lambda h, w: logprobs.naive_token_stats(h, w, data["y"], **kw)),
                     argnums=(0, 1))(data["h"], data["w"])
  chex.assert_trees_all_close(g_chunked, g_naive, atol=1e-5, rtol=1e-7)


def test_bfloat16_hidden_states_give_float32_stats(data):
  out = logprobs.token_stats(data["h"].astype(jnp.bfloat16), data["w"].astype(jnp.bfloat16),
                             data["y"], chunk_size=8)
  assert out.logp.dtype == jnp.float32 and out.entropy.dtype == jnp.float32
  assert out.reverse_kl is None


def test_model_token_stats_match_full_logits():
  policy = models.create(models.preset("tiny"), seed=0)
  ref = models.create(models.preset("tiny"), seed=1)
  tokens = jnp.array([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
  mask = tokens > 0
  out = logprobs.model_token_stats(policy, tokens, attention_mask_bt=mask, ref_model=ref,
                                   chunk_size=5)
  lp = jax.nn.log_softmax(policy(tokens, attention_mask_bt=mask)[:, :-1])
  lq = jax.nn.log_softmax(ref(tokens, attention_mask_bt=mask)[:, :-1])
  np.testing.assert_allclose(out.logp, jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0],
                             atol=1e-5)
  np.testing.assert_allclose(out.reverse_kl, jnp.sum(jnp.exp(lp) * (lp - lq), -1), atol=1e-5)
  np.testing.assert_allclose(out.forward_kl, jnp.sum(jnp.exp(lq) * (lq - lp), -1), atol=1e-5)


def test_bad_shapes(data):
  with pytest.raises(ValueError, match=r"expected hidden_btd \[B, T, D\] and unembed_dv \[D, V\]"):
    logprobs.token_stats(data["h"], data["w"].T, data["y"])
  with pytest.raises(ValueError, match=r"targets_bt must be an integer array of shape \[3, 7\]"):
    logprobs.token_stats(data["h"], data["w"], data["y"].astype(jnp.float32))
  with pytest.raises(ValueError, match="give both ref_hidden_btd and ref_unembed_dv, or neither"):
    logprobs.token_stats(data["h"], data["w"], data["y"], ref_hidden_btd=data["rh"])
  with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
    logprobs.token_stats(data["h"], data["w"], data["y"], chunk_size=0)


def test_gradients_without_a_reference(data):
  def scalar(fn):
    return lambda h, w: jnp.sum(fn(h, w).logp) - 0.5 * jnp.sum(fn(h, w).entropy)

  g_chunked = jax.grad(scalar(lambda h, w: logprobs.token_stats(h, w, data["y"], chunk_size=5)),
                       argnums=(0, 1))(data["h"], data["w"])
  g_naive = jax.grad(scalar(lambda h, w: logprobs.naive_token_stats(h, w, data["y"])),
                     argnums=(0, 1))(data["h"], data["w"])
  chex.assert_trees_all_close(g_chunked, g_naive, atol=1e-5, rtol=1e-7)
