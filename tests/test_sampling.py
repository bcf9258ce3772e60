"""The KV-cache sampler against cache-free forward passes and NumPy probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kljax import models
from kljax.sampling import sample

ALPHA = 1e-3  # false-alarm rate of each statistical test (fixed seeds: the outcome is reproducible)


@pytest.fixture(scope="module")
def model():
  m = models.create(models.preset("tiny"), seed=3)
  # Sharpen the random model's next-token distributions (logit std ~0.14 -> ~1.1): near-uniform
  # ones would let a wrong temperature pass the frequency test (with this, 0.9 vs 1.0 fails it).
  m.lm_head[...] = m.lm_head[...] * 8
  return m


PROMPTS = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
MASK = PROMPTS > 0


def _greedy_reference(model, prompts, mask, steps, eos):
  """Greedy decoding by full forward passes over the growing buffer, with EOS applied afterwards."""
  buf, bm = np.asarray(prompts), np.asarray(mask)
  for _ in range(steps):
    logits = model(jnp.asarray(buf), attention_mask_bt=jnp.asarray(bm))
    nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
    buf = np.concatenate([buf, nxt[:, None]], 1)
    bm = np.concatenate([bm, np.ones((len(buf), 1), bool)], 1)
  gen = buf[:, prompts.shape[1]:]
  live = np.ones_like(gen, bool)
  for row in range(len(gen)):
    hits = np.flatnonzero(gen[row] == eos)
    if hits.size:
      live[row, hits[0] + 1:] = False
  return np.where(live, gen, 0), live


def test_greedy_with_cache_equals_full_forward_passes(model):
  out = sample(model, PROMPTS, MASK, jax.random.PRNGKey(0), max_new_tokens=8, eos_id=63,
               temperature=0.0)
  gen, live = _greedy_reference(model, PROMPTS, MASK, 8, eos=63)
  np.testing.assert_array_equal(out.tokens_bt[:, :5], PROMPTS)
  np.testing.assert_array_equal(out.tokens_bt[:, 5:], gen)
  np.testing.assert_array_equal(out.completion_mask_bn, live)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_log_probs_equal_a_full_forward_pass(model, scan_layers):
  """Whether the training model scans its layers or not, the cached decode (unrolled layers on
  per-layer weights and buffers) and the one-query attention of a decode step give the log-probs
  of a cache-free forward pass."""
  m = models.create(models.preset("tiny", scan_layers=scan_layers), seed=3)
  m.lm_head[...] = model.lm_head[...]
  out = sample(m, PROMPTS, MASK, jax.random.PRNGKey(1), max_new_tokens=6, eos_id=63)
  mask = jnp.concatenate([MASK, out.completion_mask_bn], axis=1)
  logits = m(out.tokens_bt, attention_mask_bt=mask)[:, PROMPTS.shape[1] - 1:-1]
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), out.tokens_bt[:, PROMPTS.shape[1]:, None],
                             axis=-1)[..., 0]
  np.testing.assert_allclose(np.where(out.completion_mask_bn, out.logprobs_bn, 0),
                             np.where(out.completion_mask_bn, want, 0), atol=2e-5)


def test_eos_and_padding_are_exact(model):
  free = sample(model, PROMPTS, MASK, jax.random.PRNGKey(0), max_new_tokens=6, eos_id=63,
                temperature=0.0)
  eos = int(free.tokens_bt[0, 6])  # row 0's second generated token becomes the EOS
  out = sample(model, PROMPTS, MASK, jax.random.PRNGKey(0), max_new_tokens=6, eos_id=eos,
               pad_id=0, temperature=0.0)
  gen, live = _greedy_reference(model, PROMPTS, MASK, 6, eos=eos)
  assert list(np.asarray(out.completion_mask_bn[0])) == [True, True, False, False, False, False]
  np.testing.assert_array_equal(out.completion_mask_bn, live)
  np.testing.assert_array_equal(out.tokens_bt[:, 5:], gen)
  assert np.all(np.asarray(out.logprobs_bn)[~live] == 0.0)
  assert np.all(np.asarray(out.logprobs_bn)[live] < 0.0)


def _np_filtered_probs(logits, temperature, top_k, top_p):
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros_like(z, bool)
  keep[order[: (top_k or len(z))]] = True
  p = np.exp(z - z[keep].max()) * keep
  p /= p.sum()
  cum = np.cumsum(p[order]) - p[order]
  keep[order[cum >= top_p]] = False  # nucleus: smallest prefix of mass ≥ top_p
  p = np.exp(z - z[keep].max()) * keep
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.3, 0, 0.6)])
def test_sampled_frequencies_match_probabilities(model, temperature, top_k, top_p):
  n = 20_000
  prompt = jnp.tile(jnp.array([[4, 8, 15]]), (n, 1))
  out = sample(model, prompt, prompt > 0, jax.random.PRNGKey(11), max_new_tokens=1, eos_id=63,
               temperature=temperature, top_k=top_k, top_p=top_p)
  logits = model(prompt[:1])[0, -1]  # the cache-free forward pass
  probs = _np_filtered_probs(logits, temperature, top_k, top_p)
  first = np.asarray(out.tokens_bt[:, 3])
  assert np.all(probs[first] > 0), "a filtered-out token was sampled"
  counts = np.bincount(first, minlength=len(probs))
  expected = n * probs
  big = expected >= 5  # pool the rare cells so the χ² approximation holds
  obs = np.append(counts[big], counts[~big].sum())
  exp_ = np.append(expected[big], expected[~big].sum())
  obs, exp_ = obs[exp_ > 0], exp_[exp_ > 0]
  chi2 = ((obs - exp_) ** 2 / exp_).sum()
  assert chi2 < stats.chi2.ppf(1 - ALPHA, len(obs) - 1), (chi2, len(obs))
  # the sampler's log-probs are those of the distribution it drew from
  np.testing.assert_allclose(np.asarray(out.logprobs_bn[:, 0]), np.log(probs[first]), atol=2e-5)


def _sampled_reference(model, prompts, mask, steps, eos, key, temperature):
  """The sampler's contract with its key, by cache-free forward passes over the growing buffer:
  at each step `key, sub = split(key)` and the token is `categorical(sub, logits / temperature)`;
  its log-prob is that of log_softmax(logits / temperature). EOS applied afterwards."""
  buf, bm = np.asarray(prompts), np.asarray(mask)
  logps = []
  for _ in range(steps):
    key, sub = jax.random.split(key)
    logits = model(jnp.asarray(buf), attention_mask_bt=jnp.asarray(bm))[:, -1] / temperature
    nxt = np.asarray(jax.random.categorical(sub, logits, axis=-1))
    logps.append(np.asarray(jax.nn.log_softmax(logits))[np.arange(len(buf)), nxt])
    buf = np.concatenate([buf, nxt[:, None]], 1)
    bm = np.concatenate([bm, np.ones((len(buf), 1), bool)], 1)
  gen, logp = buf[:, prompts.shape[1]:], np.stack(logps, 1)
  live = np.ones_like(gen, bool)
  for row in range(len(gen)):
    hits = np.flatnonzero(gen[row] == eos)
    if hits.size:
      live[row, hits[0] + 1:] = False
  return np.where(live, gen, 0), np.where(live, logp, 0.0), live


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sampled_tokens_and_log_probs_equal_the_cache_free_sampler_at_a_fixed_key(model,
                                                                                 scan_layers):
  """The decode loop that reads per-layer weights in place draws, at a fixed key, the very tokens
  (and log-probs) of the key schedule run by full forward passes, for either training layout."""
  m = models.create(models.preset("tiny", scan_layers=scan_layers), seed=3)
  m.lm_head[...] = model.lm_head[...]
  key = jax.random.PRNGKey(11)
  out = sample(m, PROMPTS, MASK, key, max_new_tokens=7, eos_id=63, temperature=0.8)
  gen, logp, live = _sampled_reference(m, PROMPTS, MASK, 7, 63, key, 0.8)
  np.testing.assert_array_equal(out.tokens_bt[:, 5:], gen)
  np.testing.assert_array_equal(out.completion_mask_bn, live)
  np.testing.assert_allclose(out.logprobs_bn, logp, atol=2e-5)
  assert len(np.unique(gen)) > 5  # really sampled, not a constant


def test_deterministic_for_a_key(model):
  kw = dict(max_new_tokens=5, eos_id=63, temperature=1.0)
  a = sample(model, PROMPTS, MASK, jax.random.PRNGKey(5), **kw)
  b = sample(model, PROMPTS, MASK, jax.random.PRNGKey(5), **kw)
  c = sample(model, PROMPTS, MASK, jax.random.PRNGKey(6), **kw)
  np.testing.assert_array_equal(a.tokens_bt, b.tokens_bt)
  np.testing.assert_array_equal(a.logprobs_bn, b.logprobs_bn)
  assert not np.array_equal(a.tokens_bt, c.tokens_bt)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shared_prefill_equals_repeated_prompts(model, scan_layers):
  """samples_per_prompt=n prefills each prompt once and shares its cache: the n samples equal
  those drawn for the prompts repeated n times, with the same key."""
  m = models.create(models.preset("tiny", scan_layers=scan_layers), seed=3)
  m.lm_head[...] = model.lm_head[...]
  kw = dict(max_new_tokens=5, eos_id=63, temperature=1.0)
  shared = sample(m, PROMPTS, MASK, jax.random.PRNGKey(7), samples_per_prompt=4, **kw)
  repeated = sample(m, np.repeat(PROMPTS, 4, 0), np.repeat(MASK, 4, 0), jax.random.PRNGKey(7), **kw)
  np.testing.assert_array_equal(shared.tokens_bt, repeated.tokens_bt)
  np.testing.assert_array_equal(shared.completion_mask_bn, repeated.completion_mask_bn)
  np.testing.assert_allclose(shared.logprobs_bn, repeated.logprobs_bn, atol=1e-5)
  assert len({tuple(r) for r in np.asarray(shared.tokens_bt[:4])}) > 1  # the group differs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(top_k=65), r"top_k must be 0 \(off\) or in \[1, 64\], got 65"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(eos_id=64), r"eos_id must be a token id in \[0, 64\), got 64"),
        (dict(samples_per_prompt=0), "samples_per_prompt must be >= 1, got 0"),
    ],
)
def test_bad_arguments(model, kwargs, match):
  args = dict(max_new_tokens=2, eos_id=63) | kwargs
  with pytest.raises(ValueError, match=match):
    sample(model, PROMPTS, MASK, jax.random.PRNGKey(0), **args)


def test_bad_prompts(model):
  with pytest.raises(ValueError, match="a row of prompt_mask_bp is empty"):
    sample(model, PROMPTS, MASK.at[2].set(False), jax.random.PRNGKey(0), max_new_tokens=2, eos_id=1)
  with pytest.raises(ValueError, match=r"prompt_mask_bp must have shape \[3, 5\], got \[3, 4\]"):
    sample(model, PROMPTS, MASK[:, :4], jax.random.PRNGKey(0), max_new_tokens=2, eos_id=1)
