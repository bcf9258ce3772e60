"""tunix side of benchmarks/vs_peers.py: a GRPO iteration of google-tunix 0.1.7, Qwen2.5-0.5B shape.

  flock /tmp/kljax-heavy.lock python benchmarks/peer_tunix.py --layers 24 --prompts 2 --group 4 \
      --prompt_len 16 --new_tokens 32 --iters 3

The model is tunix's own `tunix.models.qwen2.model.Qwen2` built from `ModelConfig.qwen2p5_0p5b()`
with `num_layers=--layers` (vocab 151936, d 896, 14 heads / 2 KV heads of 64, MLP 4864, qkv bias,
tied embeddings, rope θ 1e6, eps 1e-6), float32 params and compute, on one CPU device (a 1×1
('fsdp', 'tp') Auto mesh, as tunix.utils.mesh builds). Its weight matrices are then redrawn as
N(0, 0.02²): tunix's own init (N(0, 1) tied embedding, zero MLP kernels) makes every row re-sample
its last token, so all completions of a prompt coincide and the GRPO gradient is exactly zero. The
reference model is a second instance holding the same weights (= the initial policy).

Training runs through tunix's real learner: `tunix.rl.grpo.grpo_learner.GRPOLearner(...).train(ds)`
on a `tunix.rl.rl_cluster.RLCluster` (rollout_engine="vanilla", actor, rollout and reference on the
same mesh, so the rollout shares the actor's weights and no weight sync is needed). Each global step
is what the learner does: `RLCluster.generate` -> `VanillaRollout.generate` ->
`tunix.generate.sampler.Sampler.__call__` (jitted prefill + while_loop decode with its KV cache),
`RLCluster.get_ref_per_token_logps` (`tunix.rl.common.compute_per_token_logps`), the reward and
`algo_core.compute_advantages`, then `RLCluster.update_actor` -> `rl.trainer.Trainer.train`, whose
jitted `_train_step` is `nnx.value_and_grad` of `algo_core.grpo_loss_fn` (policy log-probs via
`compute_per_token_logps`, clipped ratio, β·KL, entropy aux) plus `nnx.Optimizer.update` with
`optax.adamw(1e-5)`. GRPOConfig: num_generations=--group, num_iterations=1, beta=0.04, epsilon 0.2,
kl_loss_mode="low_var_kl" (k3, the estimator TRL uses; tunix's default "kl" costs the same).

Timing: the dataset holds 1 + --iters identical batches of --prompts prompts (the first --prompts
rows of `default_rng(1).integers(4, vocab, (prompts*group, prompt_len))`, as text of ids for a
stand-in tokenizer; the learner repeats each prompt --group times, so the sampler gets
prompts*group rows). Step 0 compiles and is not counted; each later step is timed by wrapping, on
the instances, `RLCluster.generate` (sampler), `RLCluster.get_ref_per_token_logps` (blocked on its
result) plus `RLCluster.update_actor` (together: update), and `GRPOLearner._run_global_step`
(iteration: everything above plus the learner's reward, advantage, data-queue and metrics code).
Reported: medians of wall seconds and of process CPU seconds (user+system, os.times()).

EOS: the tokenizer's EOS id is `vocab` (151936), an id the model cannot sample (logits cover
0..vocab-1), so no row stops early; every completion is asserted to hold exactly --new_tokens ids.
Sampling is temperature 1, top_p=1.0, top_k=None, which tunix routes to a plain
`jax.random.categorical` over the full vocabulary. Tunix's decode loop runs one forward past the
last kept token (it samples at step prompt+new_tokens and drops it), i.e. new_tokens decode
forwards after the prefill. Pad id is 0, so a sampled 0 (p ~ 1/vocab) would be masked as padding.
Checks: completion count/length and prompt shape per rollout; finite loss and a finite, nonzero
gradient norm (read back from the trainer's metrics buffer) per update.

Memory: peak RSS (at the update) measured ~5.1 GB + 0.56 GB per layer, i.e. ~18.6 GB at 24 layers:
about 9 float32 copies of the parameters (actor, reference, RLCluster's "pinned_host" anchor
snapshot of the actor, AdamW mu and nu, gradients, the new params and optimizer temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


class _IdTokenizer:
  """Text is space-separated token ids; pad 0, no BOS, EOS = vocab (unsamplable)."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return self.vocab

  def pad_id(self) -> int:
    return 0


def _odd_tokens_reward(prompts, completions, **_):
  """Trivial reward with some spread inside a group: the share of odd ids in the completion."""
  return [sum(int(t) % 2 for t in c.split()) / max(1, len(c.split())) for c in completions]


def measure(*, layers: int, prompts: int, group: int, prompt_len: int, new_tokens: int,
            iters: int, seed: int = 0) -> dict:
  import dataclasses

  import jax
  import numpy as np
  import optax
  from flax import nnx
  from importlib.metadata import version
  from tunix.models.qwen2 import model as qwen2
  from tunix.rl import rl_cluster as rlc
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  config = dataclasses.replace(qwen2.ModelConfig.qwen2p5_0p5b(), num_layers=layers)
  vocab = config.vocab_size
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as tunix.utils.mesh does
  policy = qwen2.Qwen2(config, rngs=nnx.Rngs(seed))
  reference = qwen2.Qwen2(config, rngs=nnx.Rngs(seed))
  # Redraw every weight matrix as N(0, 0.02^2) (HF's initializer_range) in both copies; norms and
  # biases keep tunix's ones/zeros. Tunix's own N(0, 1) tied embedding makes each row re-sample its
  # last token, so a group's completions coincide and advantages and gradients are all zero.
  # Placing them on `mesh` already spares RLCluster a resharding copy of each model.
  leaves, treedef = jax.tree.flatten(nnx.state(policy, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  leaves = [jax.device_put(0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim > 1 else x,
                           on_mesh) for k, x in zip(keys, leaves)]
  nnx.update(policy, jax.tree.unflatten(treedef, leaves))
  nnx.update(reference, jax.tree.unflatten(treedef, [x.copy() for x in leaves]))
  params = sum(x.size for x in leaves)
  del leaves

  cluster = rlc.RLCluster(
      actor=policy, reference=reference, tokenizer=_IdTokenizer(vocab),
      cluster_config=rlc.ClusterConfig(
          role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
          rollout_engine="vanilla",
          offload_to_cpu=False,
          training_config=rlc.RLTrainingConfig(
              actor_optimizer=optax.adamw(1e-5), eval_every_n_steps=10**9, max_steps=1 + iters),
          rollout_config=base_rollout.RolloutConfig(
              max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len,
              kv_cache_size=prompt_len + new_tokens, temperature=1.0, top_p=1.0, top_k=None,
              eos_tokens=[vocab],
              seed=seed),  # an int: a PRNGKey array here is donated by the prefill, then gone
      ))
  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, reward_fns=_odd_tokens_reward,
      algo_config=grpo_learner.GRPOConfig(num_generations=group, num_iterations=1, beta=0.04,
                                          kl_loss_mode="low_var_kl"))
  del policy, reference  # RLCluster holds them now

  # Per-step (wall, cpu) seconds of each phase; step 0 is the compile step.
  phases: dict[str, list[list[float]]] = {"sampler": [], "reference": [], "policy": [],
                                          "iteration": []}
  checks: dict = {}

  def timed(name, fn, block=False, check=None):
    def wrapper(*a, **k):
      w, c = time.perf_counter(), sum(os.times()[:2])
      out = fn(*a, **k)
      if block:
        out = jax.block_until_ready(out)
      phases[name].append([time.perf_counter() - w, sum(os.times()[:2]) - c])
      if check:
        check(out)
      return out
    return wrapper

  def check_rollout(out):
    lengths = {len(t) for t in out.tokens}
    assert len(out.tokens) == prompts * group and lengths == {new_tokens}, lengths
    assert np.asarray(out.left_padded_prompt_tokens).shape == (prompts * group, prompt_len)

  def check_update(_):
    # After a step the trainer keeps that step's loss in this buffer for its metrics logger.
    buf = cluster.actor_trainer._prev_buffered_train_metrics  # pylint: disable=protected-access
    checks["loss"] = float(buf.losses[-1])
    checks["grad_norm"] = float(buf.additional_metrics["grad_norm"][0][-1])
    # Zero where a group's rewards tie (all advantages 0) and π = π_ref (no KL gradient): the
    # same programs run; kljax's random policy earns no reward at all, so it is no cheaper.
    assert np.isfinite(checks["loss"]) and 0 <= checks["grad_norm"] < np.inf, checks

  cluster.generate = timed("sampler", cluster.generate, check=check_rollout)
  cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps, block=True)
  cluster.update_actor = timed("policy", cluster.update_actor, check=check_update)
  # pylint: disable-next=protected-access
  learner._run_global_step = timed("iteration", learner._run_global_step)

  ids = np.random.default_rng(1).integers(4, vocab, (prompts * group, prompt_len))
  # A numpy array, as tunix's grain pipelines yield: the learner np.repeat()s every leaf G times.
  batch = {"prompts": np.array([" ".join(map(str, row)) for row in ids[:prompts]])}
  with mesh:  # tunix enters meshes this way itself (RLCluster._get_mesh_and_logical_axis_rules_cm)
    learner.train([dict(batch) for _ in range(1 + iters)])

  assert all(len(v) == 1 + iters for v in phases.values()), {k: len(v) for k, v in phases.items()}
  med = {k: [statistics.median(s[i] for s in v[1:]) for i in (0, 1)] for k, v in phases.items()}
  update = [statistics.median(r[i] + p[i] for r, p in zip(phases["reference"][1:],
                                                           phases["policy"][1:])) for i in (0, 1)]
  return {
      "peer": "tunix", "tunix_version": version("google-tunix"), "jax_version": jax.__version__,
      "backend": jax.default_backend(), "layers": layers, "params": int(params),
      "prompts": prompts, "group": group, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "iters": iters,
      "sampler_s": med["sampler"][0], "sampler_cpu_s": med["sampler"][1],
      "sampler_tokens_per_s": prompts * group * new_tokens / med["sampler"][0],
      "reference_s": med["reference"][0], "policy_update_s": med["policy"][0],
      "update_s": update[0], "update_cpu_s": update[1],
      "iteration_s": med["iteration"][0], "cpu_s": med["iteration"][1],
      "compile_iteration_s": phases["iteration"][0][0],
      "last_loss": checks["loss"], "last_grad_norm": checks["grad_norm"],
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "notes": ("GRPOLearner.train on a 1x1 CPU mesh; iteration_s measured per global step "
                "(sampler + reference + reward/advantage + policy update + learner bookkeeping); "
                "update_s = reference log-probs + Trainer.train (value_and_grad of grpo_loss_fn + "
                "adamw); low_var_kl, beta 0.04, fp32; EOS id = vocab so every row has new_tokens."),
  }


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in [("layers", 24), ("prompts", 2), ("group", 4), ("prompt_len", 16),
                        ("new_tokens", 32), ("iters", 3), ("seed", 0)]:
    p.add_argument(f"--{name}", type=int, default=default)
  args = p.parse_args()
  if min(v for k, v in vars(args).items() if k != "seed") < 1:
    p.error("--layers, --prompts, --group, --prompt_len, --new_tokens and --iters must be >= 1")
  print(json.dumps(measure(**vars(args))))
