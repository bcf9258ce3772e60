"""Rollout engines: who samples the trainer's completions.

An engine holds the sampling policy μ's weights (`push`, every step) and samples G completions of
each prompt (`generate`), returning the tokens, the completion masks and its own per-token
log-probabilities log μ(y_t) under the distribution each token was drawn from (after temperature,
top-k and top-p). The trainer recomputes log π_old itself, so whatever the engine does differently
(kernels, dtypes, a lagging copy) is the sampler mismatch μ ≠ π_old that `rollout.correction`
weights away (`kljax.offpolicy`) and `sampler_logprob_gap` / `sampler_ess` measure.

  jax   kljax's own KV-cache sampler (`kljax.sampling.sample`), on the trainer's mesh. The default:
        no extra dependency, sharded like the trainer, exactly reproducible.
  vllm  vLLM's offline `LLM`, colocated in the training process (`kljax.rollout.vllm_engine`):
        paged attention and continuous batching. Its weights are pushed from the trainer's
        parameters in memory at every step and checked against the trainer's maths.

Both take left-padded prompts [U, P] (one row a prompt) and return U·G rows, row i·G + j the j-th
sample of prompt i, as `kljax.sampling.SampleOutput` (prompt as given, then the completion,
padded after its first EOS, which belongs to the completion).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
from flax import nnx

from kljax.sampling import SampleOutput, sample

ENGINES = ("jax", "vllm")


class SamplingOptions(NamedTuple):
  """How completions are drawn (the `rollout` section of a trainer config)."""

  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


class Engine(Protocol):
  """What the trainer needs from a rollout engine."""

  name: str

  def push(self, params: Any) -> dict[str, float]:
    """Makes `params` (the policy's nnx.State, trainer layout) the sampling weights; returns
    diagnostics for the step's metrics (e.g. the sync check's gap)."""

  def generate(self, prompt_up, mask_up, key: jax.Array, *, samples_per_prompt: int,
               options: SamplingOptions) -> SampleOutput:
    """`samples_per_prompt` completions of each left-padded prompt, with the PRNG key `key`."""

  def close(self) -> None:
    """Frees what the engine holds (a no-op for the jax engine)."""


class JaxEngine:
  """kljax's KV-cache sampler. `model_fn(params)` is the sampling model (`rollout.dtype`); the
  pushed parameters are held, not copied: they must stay valid until `generate` has run (the
  trainer pushes, samples, and only then lets the update donate them)."""

  name = "jax"

  def __init__(self, model_fn: Callable[[Any], nnx.Module]):
    self._model_fn = model_fn
    self._model = None

  def push(self, params) -> dict[str, float]:
    self._model = self._model_fn(params)
    return {}

  def generate(self, prompt_up, mask_up, key, *, samples_per_prompt, options) -> SampleOutput:
    if self._model is None:
      raise RuntimeError("JaxEngine.generate before any push: no weights to sample with.")
    model, self._model = self._model, None  # a pushed model is sampled once (then donated)
    return sample(model, prompt_up, mask_up, key, max_new_tokens=options.max_new_tokens,
                  eos_id=options.eos_id, pad_id=options.pad_id, temperature=options.temperature,
                  top_k=options.top_k, top_p=options.top_p, samples_per_prompt=samples_per_prompt)

  def close(self) -> None:
    self._model = None
