"""The GRPO trainer: rollouts → rewards → group advantages → log-probs → PPO-clip + β·KL term.

Reads top to bottom: setup (tokenizer, data, models, mesh, optimizer, the KL objective) from the
validated `Options` (`train.validate`), one step in named stages (rollout → score → rollout_stats
→ advantages → prepare_batch → update_epochs → step_metrics → next_state), and the loop with
checkpoints and metrics. The jitted pieces are in `train.loss`, the KL term as the trainer sees it
in `train.objective` (the stages never look at the term's kind), the step's metrics in
`train.step_metrics`, the run directory's checks in `train.rundir`.

Randomness is a function of (seed, step) and the data order a function of the step, so a run
restored from its checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kljax import advantages as adv_lib
from kljax import beta as beta_lib
from kljax import data as data_lib
from kljax import models, offpolicy, rewards, sharding, text
from kljax import rollout as rollout_lib
from kljax.progress import bar as tqdm  # log lines when not on a terminal
from kljax.rollout import vllm_engine
from kljax.train import multihost, objective, preempt, rundir, runlock
from kljax.train.checkpoint import CheckpointError, Checkpointer
from kljax.train.devices import replicate, to_devices, to_host, tree_to_devices
from kljax.train.loss import completion_stats, make_loss_fn, update
from kljax.train.metrics import MetricsWriter
from kljax.train.objective import REWARD_AT, REWARD_STAGES  # noqa: F401 - the trainer's names
from kljax.train.options import ConfigError, Options
from kljax.train.rundir import check_resume, record_config  # noqa: F401 - the trainer's names
from kljax.train.step_metrics import REFERENCE_METRICS, sampler_metrics, step_metrics
from kljax.train.step_metrics import tokens_hash  # noqa: F401 - the trainer's names
from kljax.train.validate import check_prompt_lengths, make_mesh, validate, warn_once

# ---------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
  """What the stages read: the run's options and what was built from them once."""
  options: Options
  tokenizer: text.Tokenizer
  source: data_lib.Source
  graphdef: Any
  mesh: jax.sharding.Mesh
  optimizer: optax.GradientTransformation
  beta: beta_lib.BetaController
  kl: objective.KLObjective  # the KL term as the trainer sees it, whatever its kind
  reward_fns: list
  correction: Any = None  # kljax.offpolicy weights fn of rollout.correction; None for "none"
  engine: Any = None  # the rollout engine (`make_engine`), started by the first rollout


class TrainState(NamedTuple):
  params: Any  # nnx.State of the policy
  ref_params: Any  # nnx.State of the reference
  opt_state: Any
  beta: beta_lib.BetaState
  step: jax.Array
  # rollout.staleness = k: the parameters of steps s−k, …, s−1 (the sampler uses the first), so a
  # checkpoint restores the sampler's lag exactly; () when k = 0.
  stale_params: Any = ()


def as_options(config: ml_collections.ConfigDict | Options) -> Options:
  """For a config, `validate` and `check_prompt_lengths` (preparing the dataset); options as they
  are (their caller has checked them, as `train` and `kljax-grpo` do)."""
  if isinstance(config, Options):
    return config
  options = validate(config)
  check_prompt_lengths(options)
  return options


def build(options: Options | ml_collections.ConfigDict, init_model: nnx.Module | None = None
          ) -> tuple[Setup, TrainState]:
  """Everything a run needs, and its initial state: the reference holds `init_model`'s arrays (or
  a random `model.preset` sized to the tokenizer's vocabulary) and the policy a copy of them,
  which the update donates. `options`: `validate`'s (a config is validated first)."""
  o = as_options(options)
  tokenizer = text.load_tokenizer(o.data.tokenizer)
  source = data_lib.load(o.data.name, "train", data_dir=o.data.data_dir,
                         manual_dir=o.data.manual_dir)
  mesh = o.device_mesh or make_mesh(o.mesh)
  if init_model is None:
    init_model = models.create(models.preset(o.model_preset, vocab_size=tokenizer.vocab_size),
                               seed=o.seed)
  if init_model.config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"--config.model: the model's vocabulary ({init_model.config.vocab_size}) is "
                      f"smaller than the tokenizer's ({tokenizer.vocab_size}).")
  graphdef, params = nnx.split(init_model)
  params = tree_to_devices(params, sharding.state_shardings(
      params, mesh, rules=param_rules(o, init_model.config.vocab_size)))
  optimizer, beta = make_optimizer(o), make_beta(o)
  # The update donates the policy's buffers: the policy gets a copy of its own, and the arrays
  # given (the caller's model stays valid) become the reference, and θ_0 for steps < staleness.
  state = TrainState(sharding.copy_tree(params), params, replicate(optimizer.init(params), mesh),
                     replicate(beta.init(), mesh), replicate(jnp.zeros((), jnp.int32), mesh),
                     (params,) * o.rollout.staleness)
  return Setup(o, tokenizer, source, graphdef, mesh, optimizer, beta, make_objective(o),
               [rewards.load_reward_fn(s) for s in o.reward.fns], make_correction(o)), state


def bare_setup(o: Options, graphdef, mesh: jax.sharding.Mesh) -> Setup:
  """A Setup for the jitted pieces only (`compile_fns`; no data, tokenizer or reward functions):
  what the memory planner and the benchmarks compile."""
  return Setup(o, None, None, graphdef, mesh, make_optimizer(o), make_beta(o), make_objective(o),
               [], make_correction(o))


def make_objective(o: Options) -> objective.KLObjective:
  """The run's KL objective (`train.objective`): its term, placed as the options say."""
  return objective.of(o.term, on_policy=o.update.on_policy, reward_stage=o.kl.reward_stage,
                      reward_at=o.kl.reward_at)


def param_rules(o: Options, vocab_size: int) -> sharding.Rules:
  """The parameters' sharding rules: `mesh.embedding_split` for this run's update size
  (`sharding.rules_for`)."""
  tokens = o.batch_size // o.update.minibatches * o.max_len
  return sharding.rules_for(tokens, vocab_size, o.mesh.embedding_split)


def make_optimizer(o: Options) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with linear warm-up and cosine decay over every update."""
  total = o.num_steps * o.update.epochs * o.update.minibatches
  lr = o.optim.learning_rate
  if total == 1:  # one update, at the peak rate (a warm-up from 0 would make it a no-op)
    schedule = optax.constant_schedule(lr)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(o.optim.warmup_steps, total - 1) or 1, total,
        end_value=lr * o.optim.final_lr_fraction)
  return optax.chain(
      optax.clip_by_global_norm(o.optim.grad_clip),
      optax.adamw(schedule, b1=o.optim.b1, b2=o.optim.b2, weight_decay=o.optim.weight_decay))


def make_correction(o: Options):
  """The μ → π_old weights of `rollout.correction` (None for "none")."""
  if o.rollout.correction == "none":
    return None
  return offpolicy.sampler_correction(o.rollout.correction, cap=o.rollout.correction_cap)


def make_beta(o: Options) -> beta_lib.BetaController:
  """The β controller of `kl.controller` (`kljax.beta.CONTROLLERS`)."""
  return beta_lib.controller(o.kl.controller, beta=o.kl.beta, target_kl=o.kl.target_kl,
                             horizon=o.kl.horizon, warmup_steps=o.kl.warmup_steps)


def sampler_model(setup: Setup, params) -> nnx.Module:
  """The rollout policy μ: `params` as the trainer's model ("float32": unchanged, in the model's
  own dtypes), or rounded to bfloat16 with activations and matmuls in bfloat16 ("bfloat16")."""
  dtype = setup.options.rollout.dtype
  if dtype == "float32":
    return nnx.merge(setup.graphdef, params)
  cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)
  model = nnx.merge(setup.graphdef, cast)
  model.config = model.config.replace(dtype=dtype, param_dtype=dtype)
  return model


def make_engine(setup: Setup, params) -> rollout_lib.Engine:
  """The rollout engine of `rollout.engine` (`kljax.rollout`) for a policy shaped like `params`:
  the jax sampler on `sampler_model`, or vLLM computing in `rollout.dtype` (or the model's own
  compute dtype for "float32")."""
  o, r = setup.options, setup.options.rollout
  model_fn = functools.partial(sampler_model, setup)
  if r.engine == "jax":
    return rollout_lib.JaxEngine(model_fn)
  model_config = nnx.merge(setup.graphdef, params).config
  dtype = "bfloat16" if r.dtype == "bfloat16" else model_config.dtype
  kv_bytes = int(r.vllm_kv_cache_gb * 2**30) if r.vllm_kv_cache_gb else (
      vllm_engine.kv_cache_bytes_for(model_config, sequences=o.batch_size,
                                     max_model_len=o.max_len, dtype=dtype))
  return vllm_engine.VLLMEngine(model_config, setup.graphdef, model_fn, dtype=dtype,
                                max_model_len=o.max_len, kv_cache_bytes=kv_bytes, seed=o.seed,
                                sync_tolerance=r.sync_tolerance or None)


def close_engine(setup: Setup) -> None:
  engine, setup.engine = setup.engine, None
  if engine is not None:
    engine.close()


def compile_fns(setup: Setup) -> dict:
  """The jitted statistics pass and minibatch update of this setup (compiled on first call)."""
  o, u = setup.options, setup.options.update
  stats = jax.jit(functools.partial(completion_stats, setup.graphdef,
                                    prompt_len=o.data.max_prompt_len, chunk_size=u.chunk_size,
                                    with_ref=o.uses_reference, exact_kl=o.metrics.exact_kl))
  loss_fn = make_loss_fn(
      setup.kl, graphdef=setup.graphdef, prompt_len=o.data.max_prompt_len,
      clip_eps_low=u.clip_eps_low, clip_eps_high=u.clip_eps_high, dual_clip=u.dual_clip,
      aggregation=u.aggregation, chunk_size=u.chunk_size, exact_kl=o.metrics.exact_kl,
      on_policy=u.on_policy, with_ref=o.uses_reference, correction=setup.correction,
      correct_kl=o.rollout.correct_kl)
  # The update donates the parameters and the optimizer state (arguments 0 and 1): no second copy
  # of the train state at the update's peak, and on CPU no fresh pages to fault in each step.
  # Whatever must outlive an update holds its own copy (`sharding.copy_tree`: the reference, the
  # sampler's stale parameters), and a checkpoint written in the background is waited for first.
  return {"stats": stats, "update": jax.jit(functools.partial(update, loss_fn, setup.optimizer),
                                            donate_argnums=(0, 1))}


# ---------------------------------------------------------------- one step
# rollout → score → rollout_stats → advantages → prepare_batch → update_epochs → step_metrics →
# next_state. Every stage is a function of its arguments; `train_step` runs them in order.


class Rollout(NamedTuple):
  """One step's sampled completions, on the host (rows: each prompt `group_size` times)."""
  examples: list  # one a prompt
  prompt_mask: np.ndarray  # [B, P]
  tokens: np.ndarray  # [B, P + N] prompt and completion
  attn_mask: np.ndarray  # [B, P + N]
  completion_mask: np.ndarray  # [B, N]
  sampler_logp: jax.Array  # [B, N] the sampler's log-probs (left on the devices)
  engine_metrics: dict = {}  # what the engine's weight push reports (vllm: sampler_sync_gap)


def _prompts(setup: Setup, step: int):
  o, d = setup.options, setup.options.data
  idx = data_lib.batch_indices(len(setup.source), o.rollout.prompts_per_step, step, seed=o.seed)
  examples = [setup.source[i] for i in idx]
  prompts = [d.prompt_template.format(**e) for e in examples]
  tokens, mask = text.encode_batch(setup.tokenizer, prompts, add_bos=d.add_bos,
                                   length=d.max_prompt_len)
  return examples, tokens, mask  # one row a prompt; the group's G rows come from the sampler


def rollout(setup: Setup, params, step: int) -> Rollout:
  """`group_size` completions of each of the step's prompts, sampled by the rollout engine with
  `params` pushed to it (in `rollout.dtype`) and the key fold_in(fold_in(seed, step), 0)."""
  r = setup.options.rollout
  examples, unique, unique_mask = _prompts(setup, step)
  g = r.group_size
  prompt, prompt_mask = np.repeat(unique, g, axis=0), np.repeat(unique_mask, g, axis=0)
  key = jax.random.fold_in(jax.random.PRNGKey(setup.options.seed), step)
  # Each prompt is prefilled once and shared by its group, when the prompts split evenly over the
  # mesh's batch axes; otherwise the repeated prompts are prefilled.
  try:
    sharding.check_divisible(len(unique), setup.mesh)
    rows, n = (unique, unique_mask), g
  except ValueError:
    rows, n = (prompt, prompt_mask), 1
  placed = [to_devices(x, sharding.batch_sharding(setup.mesh)) for x in rows]
  if setup.engine is None:
    setup.engine = make_engine(setup, params)
  pushed = setup.engine.push(params)  # the vllm engine's sync check runs here
  options = rollout_lib.SamplingOptions(
      max_new_tokens=r.max_new_tokens, eos_id=setup.tokenizer.eos_id,
      pad_id=setup.tokenizer.pad_id, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
  out = setup.engine.generate(*placed, jax.random.fold_in(key, 0), samples_per_prompt=n,
                              options=options)
  tokens, completion_mask = to_host(out.tokens_bt), to_host(out.completion_mask_bn)
  attn_mask = np.concatenate([prompt_mask, completion_mask], axis=1)
  return Rollout(examples, prompt_mask, tokens, attn_mask, completion_mask, out.logprobs_bn,
                 pushed)


def score(setup: Setup, ro: Rollout) -> rewards.Scores:
  """The reward functions on the decoded completions (each example's fields repeated G times)."""
  o, g = setup.options, setup.options.rollout.group_size
  completions = [setup.tokenizer.decode(row[m]) for row, m in
                 zip(ro.tokens[:, o.data.max_prompt_len:], ro.completion_mask)]
  fields = {k: [e[k] for e in ro.examples for _ in range(g)] for k in ro.examples[0]
            if k != "question"}
  return rewards.score(setup.reward_fns, [e["question"] for e in ro.examples for _ in range(g)],
                       completions, weights=list(o.reward.weights), on_error=o.reward.on_error,
                       timeout_s=o.reward.timeout_s, **fields)


def rollout_stats(setup: Setup, fns: dict, state: TrainState, ro: Rollout) -> dict | None:
  """The rollout policy's per-token statistics (`completion_stats`), shared by every update, on
  the host; None on-policy (the update computes them) unless the KL term needs them first."""
  if setup.options.update.on_policy and not setup.kl.stats_on_policy:
    return None
  batch_sh = sharding.batch_sharding(setup.mesh)
  stats = fns["stats"](state.params, state.ref_params, to_devices(ro.tokens, batch_sh),
                       to_devices(ro.attn_mask, batch_sh))
  return {k: to_host(v) for k, v in stats.items()}


def advantages(setup: Setup, beta, scores: rewards.Scores, stats: dict | None,
               mask: np.ndarray) -> tuple[adv_lib.GroupAdvantages, np.ndarray]:
  """The group advantages, and the per-token advantages [B, N] the updates see, each shaped by
  the KL objective where its term enters: the reward before the normalization, or each token's
  advantage after it (`train.objective`)."""
  r = scores.total.reshape(-1, setup.options.rollout.group_size)
  r = setup.kl.shape_rewards(r, beta, stats, mask)
  group = adv_lib.group_advantages(setup.options.update.advantage)(r)
  seq_adv = np.repeat(np.asarray(group.advantages_pg).reshape(-1, 1), mask.shape[1], axis=1)
  return group, setup.kl.shape_advantages(seq_adv, beta, stats, mask)


def prepare_batch(ro: Rollout, advantages_bt: np.ndarray, stats: dict | None,
                  on_policy: bool) -> dict:
  """The host batch every minibatch is cut from; off-policy it carries the rollout policy's and
  the reference's log-probs (the policy's own without a reference: no KL term reads them)."""
  batch = {"tokens": ro.tokens, "attn_mask": ro.attn_mask, "mask": ro.completion_mask,
           "advantages": advantages_bt}
  if not on_policy:
    batch |= {"old_logp": stats["logp"], "ref_logp": stats.get("ref_logp", stats["logp"])}
  return batch


def update_epochs(setup: Setup, update_fn, state: TrainState, batch: dict, step: int):
  """`loss.epochs` passes over the batch in `loss.minibatches` minibatches, each epoch in the
  order of a generator seeded by (seed, step, epoch). Returns the parameters, the optimizer
  state and each update's aux."""
  o, u = setup.options, setup.options.update
  params, opt_state = state.params, state.opt_state
  n = o.batch_size
  mb = n // u.minibatches
  auxes = []
  for epoch in range(u.epochs):
    order = np.random.default_rng([o.seed, step, epoch]).permutation(n)
    for i in range(u.minibatches):
      idx = np.sort(order[i * mb:(i + 1) * mb])
      sub = {k: to_devices(to_host(v)[idx], sharding.batch_sharding(setup.mesh, np.ndim(v)))
             for k, v in batch.items()}
      params, opt_state, aux = update_fn(params, opt_state, state.beta.beta, sub,
                                         state.ref_params)
      auxes.append(aux)
  jax.block_until_ready((params, auxes))  # dispatch is asynchronous: wait before reading the clock
  return params, opt_state, auxes


def next_state(setup: Setup, state: TrainState, params, opt_state, kl: float,
               sampled=None) -> TrainState:
  """The state after the step: β updated from the step's k1 estimate `kl` (0 without a
  reference, where β multiplies nothing), the reference reset every `kl.reset_ref_every` steps,
  and with rollout.staleness the step's starting parameters `sampled` (a copy: the update donated
  `state.params`) queued for the sampler."""
  o, step = setup.options, int(state.step)
  # adaptive: n_steps counts samples (Ziegler et al.); a schedule counts GRPO steps
  per_update = o.batch_size if o.kl.controller == "adaptive" else 1
  beta_state = replicate(setup.beta.update(state.beta, jnp.float32(kl), n_steps=per_update),
                         setup.mesh)
  ref_params = state.ref_params
  if o.kl.reset_ref_every and (step + 1) % o.kl.reset_ref_every == 0:
    ref_params = sharding.copy_tree(params)  # the next update donates `params`
  stale = (*state.stale_params[1:], sampled) if state.stale_params else ()
  return TrainState(params, ref_params, opt_state, beta_state, state.step + 1, stale)


def train_step(setup: Setup, state: TrainState, fns: dict, before_update=None
               ) -> tuple[TrainState, dict]:
  """Rollout, score, and `epochs × minibatches` updates. Returns the new state and metrics.
  `before_update()`, if given, runs just before the first update donates `state`'s parameters and
  optimizer state (`train` passes `Checkpointer.wait`: a save in flight still reads them)."""
  step, on_policy = int(state.step), setup.options.update.on_policy
  t0 = time.perf_counter()
  # rollout.staleness = k: θ_{step−k} (θ_0 for the first k steps) samples; rollout.dtype: its dtype
  ro = rollout(setup, state.stale_params[0] if state.stale_params else state.params, step)
  t_rollout = time.perf_counter()  # rollout's to_host waited for the sampler
  scores = score(setup, ro)
  stats = rollout_stats(setup, fns, state, ro)
  group, advantages_bt = advantages(setup, state.beta.beta, scores, stats, ro.completion_mask)
  batch = prepare_batch(ro, advantages_bt, stats, on_policy)
  if setup.correction is not None:
    batch["sampler_logp"] = to_host(ro.sampler_logp)  # log μ of the sampled tokens
  batch |= setup.kl.batch_extras(setup.options.seed, step, len(ro.tokens))
  t_logprobs = time.perf_counter()
  kept = sharding.copy_tree(state.params) if state.stale_params else None  # donated below
  if before_update is not None:
    before_update()
  params, opt_state, auxes = update_epochs(setup, fns["update"], state, batch, step)
  t_update = time.perf_counter()
  if on_policy:  # the statistics of the rollout policy, from the update's own forward pass
    stats = {k: to_host(v) for k, v in auxes[0].pop("tokens").items()}
  metrics = step_metrics(ro, scores, group, stats, auxes, state.beta.beta,
                         (t0, t_rollout, t_logprobs, t_update), setup.kl)
  metrics |= sampler_metrics(setup.correction, ro, stats["logp"]) | ro.engine_metrics
  kl = metrics["k1"] if setup.options.uses_reference else 0.0
  return next_state(setup, state, params, opt_state, kl, kept), metrics


# ---------------------------------------------------------------- the loop


class NonFiniteError(FloatingPointError):
  """A loss, gradient or metric became NaN or infinite; the checkpoints on disk are kept."""


_SUSPECT_STEPS = 3  # non-finite this soon after a restore: suspect the restored state first


def train(config: ml_collections.ConfigDict | Options, workdir: str, *, init_model=None,
          progress: bool = True, bar_options: dict | None = None) -> list[dict]:
  """Runs (or resumes) a GRPO run in `workdir`; returns the metrics of the steps it ran.
  `config`: a config, validated here and its dataset checked (`check_prompt_lengths`), or the
  `Options` that `validate(config, workdir)` returned, whose dataset the caller has checked (as
  `kljax-grpo` does before its warm start). `bar_options`: extra `tqdm` arguments for the progress
  bar (e.g. `desc`, `leave`, `position`).

  `workdir` may be local or a URL (gs://bucket/run) that every process reaches: process 0 holds
  its run lock throughout (a second run on it raises `runlock.RunLockedError`) and writes the
  metrics; every process writes its checkpoint shards there. Resumes from the newest checkpoint
  that verifies, and saves asynchronously. With several processes, process 0 prepares the dataset
  while the others wait. Raises `NonFiniteError` on a non-finite metric and `CheckpointError`
  when no checkpoint verifies or a save fails."""
  checked = isinstance(config, Options)
  o = config if checked else validate(config, workdir)
  with contextlib.ExitStack() as stack:
    run = _open_run(stack, o, workdir, init_model, check_data=not checked)
    del init_model  # restored, the run holds its own arrays: a caller that let go frees these
    setup, state, ckpt, writer, notes = run.setup, run.state, run.ckpt, run.writer, run.notes
    fns = compile_fns(setup)
    # Activations keep their batch sharding inside the model (`sharding.constrain_batch`).
    stack.enter_context(jax.set_mesh(setup.mesh))
    # NaN by design: the exact KL when not logged, every reference metric without a reference
    absent = ("exact_rkl", "exact_fkl") if o.uses_reference else REFERENCE_METRICS
    history = []
    bar = tqdm(range(run.start, o.num_steps), initial=run.start, total=o.num_steps,
               **({"desc": "grpo", "unit": "step"} | (bar_options or {})),
               disable=not (progress and jax.process_index() == 0))
    stop = stack.enter_context(preempt.on_signals(o.stop_grace_s))
    first_norm, norm_said = None, False  # the parameter norm after this process's first step
    for step in bar:
      state, metrics = train_step(setup, state, fns, before_update=ckpt.wait)
      bad = [k for k, v in metrics.items() if not math.isfinite(v) and k not in absent]
      if bad:
        raise NonFiniteError(_non_finite_message(step, bad, ckpt, run.restored_step))
      _check_reward_failures(step, metrics, o.batch_size * len(setup.reward_fns))
      first_norm = first_norm or metrics["param_norm"]
      norm_said = norm_said or _norm_grew(step, first_norm, metrics["param_norm"],
                                          o.optim.learning_rate)
      metrics |= notes
      notes = {}
      if writer is not None:
        writer.write(step, metrics)
      history.append({"step": step, **metrics})
      bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['exact_rkl']:.4f}")
      last = step + 1 == o.num_steps
      signum = None if last else preempt.agreed(stop)
      if writer is not None and (last or signum or (step + 1) % o.checkpoint_every == 0):
        writer.sync()  # object stores: the metrics of every step the checkpoint holds, first
      ckpt.maybe_save(step + 1, state, force=last or signum is not None)
      if signum is not None:
        bar.close()
        raise _stopped(signum, step + 1, ckpt)
  return history


def _norm_grew(step: int, first: float, norm: float, learning_rate: float) -> bool:
  """Warns (the caller: once a run) when the parameter norm has grown NORM_GROWTH_SAID-fold since
  its first step: a learning rate too large for the model, before the loss goes non-finite."""
  if norm <= NORM_GROWTH_SAID * first:
    return False
  warn_once(f"the parameter norm grew from {first:.4g} to {norm:.4g} by step {step}: "
            f"optim.learning_rate={learning_rate:g} is likely too large for this model.")
  return True


NORM_GROWTH_SAID = 10.0  # a warning once the parameter norm is this many times its first value


REWARD_FAILURES_SAID = 0.25  # reward.on_error="zero": the console says so above this share


def _check_reward_failures(step: int, metrics: dict, total: int) -> None:
  """With reward.on_error="zero": one console line a step when a large share of the samples'
  rewards failed (scored 0), and a RewardError, before the step is written or checkpointed, when
  every one did (GRPO would train on a constant)."""
  failed = int(metrics.get("reward_failures", 0))  # of `total` sample scores
  if failed >= total:
    raise rewards.RewardError(
        f"step {step}: every reward failed ({failed} of {total} sample scores, reward.on_error="
        f"'zero' scored them 0): nothing to learn from; stopping. Rerun with "
        f"--config.reward.on_error=raise to see the first failure.")
  if failed >= REWARD_FAILURES_SAID * total and jax.process_index() == 0:
    print(f"kljax: step {step}: {failed} of {total} sample scores failed and were scored 0 "
          f"(reward.on_error='zero').", file=sys.stderr, flush=True)


def _stopped(signum: int, step: int, ckpt: Checkpointer) -> preempt.Preempted:
  """After a stop signal: waits for checkpoint `step` and reads it back against its digest."""
  ckpt.wait()
  name = preempt.signal.Signals(signum).name
  if ckpt.newest_verified() != step:
    raise CheckpointError(f"stopped by {name} after step {step}, but its checkpoint in "
                          f"{ckpt.directory} does not verify; rerun to resume from the newest "
                          f"that does.")
  return preempt.Preempted(
      f"stopped by {name}: checkpoint step {step} saved and verified in {ckpt.directory}, "
      f"metrics flushed; rerun the same command to resume from it.", signum)


class _Run(NamedTuple):
  setup: Setup
  state: TrainState  # restored, or initial
  ckpt: Checkpointer
  writer: MetricsWriter | None  # process 0 only
  start: int  # the first step to run
  restored_step: int | None  # None for a fresh run
  notes: dict  # for the first row written: which checkpoints a restore rejected


def _open_run(stack: contextlib.ExitStack, o: Options, workdir, init_model, *,
              check_data: bool) -> _Run:
  """Takes the run lock (process 0), prepares and checks the dataset (`check_data`), builds the
  setup and restores the newest checkpoint that verifies; what must be closed is registered on
  `stack`."""
  leader = jax.process_index() == 0
  with multihost.leader_first("to take the run lock"):
    if leader:
      stack.enter_context(runlock.hold(workdir))
  rundir.check_shared(workdir)
  changes = check_resume(o.config, workdir)
  if check_data:
    with multihost.leader_first("to prepare the dataset"):
      check_prompt_lengths(o)  # reads the train split: prepares it on first use
  setup, state = build(o, init_model)
  stack.callback(close_engine, setup)
  ckpt = Checkpointer(workdir, every=o.checkpoint_every)
  stack.callback(ckpt.close)
  if ckpt.latest_step() is not None:
    state = _abstract_for_restore(state)
  restored = ckpt.restore(state)
  start, notes = 0, {}
  if restored is not None:
    start, state = restored.step, restored.state
    if restored.rejected:  # the first row after the restore says so
      notes = {"resumed_from_step": float(start),
               "checkpoints_rejected": float(len(restored.rejected))}
  if changes:  # resume_changed: continued on purpose, and said so
    if leader:
      record_config(o.config, workdir, changes, start)
    notes["resumed_with_config_changes"] = float(len(changes))
  if changes and leader:
    print(f"kljax: resuming {workdir} from step {start} with a changed config "
          f"(resume_changed=True): "
          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
          file=sys.stderr, flush=True)
  writer = MetricsWriter(workdir, resume_step=start - 1, tensorboard=o.metrics.tensorboard,
                         **_wandb_options(o)) if leader else None
  if writer is not None:
    stack.callback(writer.close)
  return _Run(setup, state, ckpt, writer, start, start if restored is not None else None, notes)


def _wandb_options(o: Options) -> dict:
  """MetricsWriter's W&B arguments: none unless `metrics.wandb`."""
  if not o.metrics.wandb:
    return {}
  return {"wandb_project": o.metrics.wandb_project, "wandb_mode": o.metrics.wandb_mode,
          "run_config": o.config.to_dict()}


def _abstract_for_restore(state: TrainState) -> TrainState:
  """The state's shapes, dtypes and shardings, its own arrays freed: a restore replaces them, and
  holding both would peak at two train states (the arrays given to `build`, the reference and the
  stale parameters, are the caller's and stay)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  for x in jax.tree.leaves((state.params, state.opt_state)):
    x.delete()
  return abstract


def _non_finite_message(step: int, bad: list[str], ckpt: Checkpointer,
                        restored_step: int | None) -> str:
  ckpt.wait()
  good = ckpt.newest_verified()
  where = (f"The last checkpoint that verifies is step {good} in {ckpt.directory}" if good is not
           None else f"No checkpoint in {ckpt.directory} verifies")
  if restored_step is not None and step - restored_step < _SUSPECT_STEPS:
    advice = (f"this is {step - restored_step + 1} step(s) after restoring checkpoint step "
              f"{restored_step}, so the restored state is the first suspect (damaged weights or "
              f"optimizer state), before the learning rate or β")
  else:
    advice = "lower the learning rate or β, or raise loss.dual_clip / grad_clip"
  return f"step {step}: non-finite {', '.join(bad)}; stopping. {where}; {advice}."

