"""The decoder: published parameter counts, padding and position semantics, dtypes, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from kljax import models
from kljax.models import transformer

# Published totals (embeddings included), from the model cards / safetensors metadata.
PUBLISHED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-math-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_preset_parameter_counts_from_abstract_shapes(name):
  abstract = models.abstract(models.preset(name))  # nothing allocated
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
  assert models.count_params(abstract) == PUBLISHED[name]
  assert models.preset(name).num_params() == PUBLISHED[name]


@pytest.fixture(scope="module")
def tiny():
  return models.create(models.preset("tiny"), seed=0)


def test_left_padding_does_not_change_real_tokens(tiny):
  seq = jnp.array([[5, 9, 13, 2, 7]])
  padded = jnp.array([[0, 0, 0, 5, 9, 13, 2, 7]])
  mask = padded > 0
  plain = tiny(seq)
  left = tiny(padded, attention_mask_bt=mask)
  np.testing.assert_allclose(left[:, 3:], plain, atol=1e-5)


def test_explicit_positions_equal_default_positions(tiny):
  tokens = jnp.array([[0, 0, 4, 5, 6], [1, 2, 3, 4, 5]])
  mask = tokens > 0
  positions = jnp.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_allclose(tiny(tokens, attention_mask_bt=mask),
                             tiny(tokens, attention_mask_bt=mask, positions_bt=positions), atol=1e-6)
  # RoPE is relative: a constant offset changes nothing, a change of spacing does.
  offset = tiny(tokens, attention_mask_bt=mask, positions_bt=positions + 7)
  np.testing.assert_allclose(offset, tiny(tokens, attention_mask_bt=mask), atol=1e-5)
  spaced = tiny(tokens, attention_mask_bt=mask, positions_bt=positions * 3)
  assert np.abs(np.asarray(spaced - tiny(tokens, attention_mask_bt=mask))).max() > 1e-4


def test_causality(tiny):
  a = tiny(jnp.array([[3, 4, 5, 6]]))
  b = tiny(jnp.array([[3, 4, 5, 60]]))
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert np.abs(np.asarray(a[:, 3] - b[:, 3])).max() > 1e-4


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  cfg = models.preset("tiny")
  f32 = models.create(cfg, seed=0)
  bf16 = models.create(cfg.replace(dtype="bfloat16"), seed=0)
  bf16_params = models.create(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=0)
  # the same weights, stored in bfloat16 (a bfloat16 init would draw different numbers)
  nnx.update(bf16_params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32)))
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
  ref = f32(tokens)
  for m in (bf16, bf16_params):
    out = m(tokens)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out - ref)).max() < 0.05 * np.abs(np.asarray(ref)).max() + 0.02
  assert bf16_params.wq[...].dtype == jnp.bfloat16 and bf16.wq[...].dtype == jnp.float32


def test_tied_embeddings_share_the_matrix():
  m = models.create(models.preset("tiny-qwen"))
  assert not hasattr(m, "lm_head")
  np.testing.assert_array_equal(m.unembedding(), m.embed[...].T)


def test_remat_gives_identical_gradients():
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  loss = lambda m: jnp.mean(m(tokens) ** 2)
  g1 = nnx.grad(loss)(models.create(models.preset("tiny"), seed=0))
  g2 = nnx.grad(loss)(models.create(models.preset("tiny", remat=True), seed=0))
  for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_llama3_rope_scaling_formula():
  # HF's _compute_llama3_parameters, written out in NumPy.
  cfg = models.preset("llama-3.1-8b")
  s = cfg.rope_scaling
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
  wavelen = 2 * np.pi / inv
  low, high = s.original_max_position_embeddings / s.low_freq_factor, (
      s.original_max_position_embeddings / s.high_freq_factor)
  expected = []
  for f, w in zip(inv, wavelen):
    if w < high:
      expected.append(f)
    elif w > low:
      expected.append(f / s.factor)
    else:
      smooth = (s.original_max_position_embeddings / w - s.low_freq_factor) / (
          s.high_freq_factor - s.low_freq_factor)
      expected.append((1 - smooth) * f / s.factor + smooth * f)
  np.testing.assert_allclose(transformer.rope_frequencies(cfg), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(d_model=0), "d_model must be >= 1, got 0"),
        (dict(dtype="float8"), "dtype must be 'float32', 'bfloat16' or 'float16', got 'float8'"),
    ],
)
def test_config_errors(change, match):
  with pytest.raises(ValueError, match=match):
    models.preset("tiny", **change)


def test_unknown_preset_and_bad_tokens(tiny):
  with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*qwen2.5-0.5b"):
    models.preset("gpt5")
  with pytest.raises(ValueError, match=r"tokens_bt must be an integer array \[B, T\], got float32"):
    tiny(jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"attention_mask_bt must have shape \[1, 3\], got \[1, 4\]"):
    tiny(jnp.ones((1, 3), jnp.int32), attention_mask_bt=jnp.ones((1, 4), bool))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_prefill_and_decode_equal_the_uncached_forward(scan_layers):
  """Each cache layout (one stacked [L, B, S, K, Hd] buffer under scan, one buffer a layer when
  unrolled) goes through the same block: prefill a left-padded prompt, then a two-token chunk, then
  one-token decode steps; every step's logits equal the cache-free forward pass over the whole
  sequence at those positions (the independent check: no cache, full causal attention)."""
  import chex

  m = models.create(models.preset("tiny", scan_layers=scan_layers), seed=1)
  tokens = jnp.array([[0, 0, 7, 3, 9, 4, 11, 5, 2], [6, 1, 8, 2, 10, 3, 12, 13, 4]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  want = m(tokens, attention_mask_bt=mask)
  cache = m.init_cache(2, 12)
  assert isinstance(cache.k, tuple) != scan_layers
  got = []
  for lo, hi in [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9)]:  # prefill, a chunk, decode steps
    logits, cache = m.logits_and_cache(tokens[:, lo:hi], positions_bt=positions[:, lo:hi],
                                       attention_mask_bt=mask[:, lo:hi], cache=cache)
    got.append(logits)
  assert int(cache.index) == 9
  got = jnp.concatenate(got, axis=1)
  chex.assert_trees_all_close(jnp.where(mask[..., None], got, 0.0),
                              jnp.where(mask[..., None], want, 0.0), atol=2e-5, rtol=1e-5)
