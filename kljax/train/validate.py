"""The trainer's entrance: every check of a GRPO config that needs no compilation, run once per
launch, and the config turned into the frozen `Options` the stages read.

`validate(config, workdir)` checks names, ranges, divisibility, the mesh, the reward functions,
wandb and, with `workdir`, every path a run reads or writes (`train.rundir`), so that nothing
fails after the warm start; `check_prompt_lengths` reads the dataset (preparing it on first use)
and is run once by whoever launches the run, under the leader's lock on several processes.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys

import jax
import ml_collections
import numpy as np

from kljax import advantages as adv_lib
from kljax import beta as beta_lib
from kljax import data as data_lib
from kljax import losses, models, offpolicy, rewards, sharding, text
from kljax import rollout as rollout_lib
from kljax.full_kl import FullKLTerm
from kljax.kl import KLTerm, kl_term
from kljax.train import metrics as metrics_lib
from kljax.train import rundir
from kljax.train.objective import REWARD_AT, REWARD_STAGES
from kljax.train.options import ConfigError, Options, as_names, as_numbers, with_defaults

ROLLOUT_DTYPES = ("float32", "bfloat16")


def validate(config: ml_collections.ConfigDict, workdir: str | None = None) -> Options:
  """Every check that needs no compilation: names, ranges, divisibility, the mesh, the reward
  functions' import paths, wandb when `metrics.wandb` asks for it, and that every path's scheme
  (gs://…) can be reached here (its package is installed). With `workdir`, also the paths a run
  on this machine reads and writes (`rundir.check_paths`), so that none fails after the warm
  start. Returns the run's `Options` (fields the config lacks at their defaults)."""
  if workdir is not None and not str(workdir).strip():
    raise ConfigError("--workdir is empty (an unset shell variable?); name the run directory.")
  config = with_defaults(config)
  rundir.check_schemes(config, workdir)
  term = _check_names(config)
  _check_rollout_policy(config, term)
  mesh = _check_sizes(config)
  _check_ranges(config)
  _check_reward_fns(config)
  _check_reward_fits_dataset(config)
  _check_wandb(config)
  if workdir is not None:
    rundir.check_paths(config, workdir)
  return Options.of(config, term=term, device_mesh=mesh)


def _bad(field: str, msg: str):
  raise ConfigError(f"--config.{field}: {msg}")


def _check_names(config: ml_collections.ConfigDict) -> KLTerm | FullKLTerm | None:
  """The KL term, β, the reward stage, the controller, the advantage estimator, the aggregation.
  Returns the KL term (None for "none"), parsed here once a launch."""
  term = None
  if config.kl.term != "none":
    try:
      term = kl_term(config.kl.term, clip_eps_low=config.loss.clip_eps_low,
                     clip_eps_high=config.loss.clip_eps_high)
    except ValueError as err:
      _bad("kl.term", f"{err} Or 'none' for no KL term.")
  if not config.kl.beta >= 0 or not math.isfinite(config.kl.beta):
    _bad("kl.beta", f"must be a finite number >= 0, got {config.kl.beta}.")
  if config.kl.reward_stage not in REWARD_STAGES:
    _bad("kl.reward_stage", f"must be one of {', '.join(REWARD_STAGES)}, got "
         f"{config.kl.reward_stage!r}.")
  if config.kl.reward_at not in REWARD_AT:
    _bad("kl.reward_at", f"must be one of {', '.join(REWARD_AT)}, got {config.kl.reward_at!r}.")
  if (config.kl.reward_at == "current"
      and config.kl.reward_stage != "after_norm"):
    _bad("kl.reward_at", f"'current' recomputes the per-token penalty that kl.reward_stage="
         f"'after_norm' subtracts after the group normalization; with reward_stage="
         f"{config.kl.reward_stage!r} the penalty is in the reward the group is normalized over, "
         f"computed at rollout.")
  if config.kl.controller not in beta_lib.CONTROLLERS:
    _bad("kl.controller", f"must be one of {', '.join(map(repr, beta_lib.CONTROLLERS))}, got "
         f"{config.kl.controller!r}.")
  if config.advantage.estimator not in adv_lib.ADVANTAGES:
    _bad("advantage.estimator", f"must be one of {', '.join(adv_lib.ADVANTAGES)}, got "
         f"{config.advantage.estimator!r}.")
  if config.loss.aggregation not in losses.AGGREGATIONS:
    _bad("loss.aggregation", f"must be one of {', '.join(losses.AGGREGATIONS)}, got "
         f"{config.loss.aggregation!r}.")
  return term


def _check_rollout_policy(config: ml_collections.ConfigDict, term) -> None:
  """rollout.staleness, dtype, correction, correction_cap, correct_kl, engine, vllm_kv_cache_gb
  and sync_tolerance."""
  r = config.rollout
  k = r.staleness
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    _bad("rollout.staleness", f"must be an integer >= 0 (how many steps the sampler's parameters "
         f"lag the trainer's), got {k!r}.")
  if r.dtype not in ROLLOUT_DTYPES:
    _bad("rollout.dtype", f"must be one of {', '.join(ROLLOUT_DTYPES)}, got {r.dtype!r}.")
  if r.correction not in offpolicy.CORRECTIONS:
    _bad("rollout.correction", f"must be one of {', '.join(offpolicy.CORRECTIONS)}, got "
         f"{r.correction!r}.")
  cap = r.correction_cap
  if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 1:
    _bad("rollout.correction_cap", f"must be a number > 1 (the ratio bound C), got {cap!r}.")
  engine = r.engine
  if engine not in rollout_lib.ENGINES:
    _bad("rollout.engine", f"must be one of {', '.join(rollout_lib.ENGINES)}, got {engine!r}.")
  gib = r.vllm_kv_cache_gb
  if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0:
    _bad("rollout.vllm_kv_cache_gb", f"must be a number of GiB >= 0 (0: sized to one step's "
         f"batch), got {gib!r}.")
  tol = r.sync_tolerance
  if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
    _bad("rollout.sync_tolerance", f"must be a number >= 0 (0: the dtype's own), got {tol!r}.")
  if engine == "vllm":
    if jax.process_count() > 1:
      _bad("rollout.engine", "'vllm' runs colocated in one process; this run has "
           f"{jax.process_count()} processes (use 'jax', which shards over every host).")
    head_dim = models.preset(config.model.preset).head_dim if not config.model.init else None
    if jax.default_backend() == "cpu" and head_dim is not None and head_dim < 32:
      _bad("rollout.engine", f"'vllm' on a CPU needs head_dim >= 32 (vLLM's CPU attention); "
           f"model.preset={config.model.preset!r} has head_dim {head_dim} (try 'small').")
  if not r.correct_kl and term is not None and term.placement == "reward":
    _bad("rollout.correct_kl", f"False applies to loss-placed KL terms only; {config.kl.term} "
         f"rides in the advantage, which the correction weighs with the policy gradient.")


def _check_sizes(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Group size, batch and minibatch divisibility, counts >= 1, and the mesh (returned)."""
  if config.rollout.group_size < 2:
    _bad("rollout.group_size", f"must be >= 2 (advantages compare completions of one prompt), "
         f"got {config.rollout.group_size}.")
  if config.batch_size % config.rollout.group_size:
    _bad("batch_size", f"{config.batch_size} completions a step must be a multiple of "
         f"rollout.group_size ({config.rollout.group_size}); e.g. "
         f"{config.rollout.group_size * max(1, config.batch_size // config.rollout.group_size)}.")
  if config.batch_size % config.loss.minibatches:
    _bad("loss.minibatches", f"{config.loss.minibatches} does not divide batch_size "
         f"{config.batch_size}.")
  for field in ("num_steps", "checkpoint_every", "loss.epochs", "rollout.max_new_tokens"):
    value = config
    for part in field.split("."):
      value = value[part]
    if value < 1:
      _bad(field, f"must be >= 1, got {value}.")
  try:
    mesh = make_mesh(config.mesh)
  except ValueError as err:
    _bad("mesh", f"{err} ({jax.device_count()} devices are visible).")
  if config.mesh.embedding_split not in sharding.EMBEDDING_SPLITS:
    _bad("mesh.embedding_split", f"must be one of {', '.join(sharding.EMBEDDING_SPLITS)}, got "
         f"{config.mesh.embedding_split!r}.")
  per_minibatch = config.batch_size // config.loss.minibatches
  try:
    sharding.check_divisible(per_minibatch, mesh)
    sharding.check_divisible(config.batch_size, mesh)
  except ValueError as err:
    _bad("batch_size", f"{err} (minibatches of {per_minibatch}).")
  return mesh


_warned: set[str] = set()


def warn_once(msg: str) -> None:
  """`msg` on stderr as one line, once a process (a process may validate several runs)."""
  if msg not in _warned and jax.process_index() == 0:
    _warned.add(msg)
    print(f"kljax: warning: {msg}", file=sys.stderr, flush=True)


def _number(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Numbers that have a range, where leaving it would run without an error but not as meant."""
  grace = config.stop_grace_s
  if not _number(grace) or not 0 <= grace < math.inf:
    _bad("stop_grace_s", f"must be a number of seconds >= 0 (0: no limit), got {grace!r}.")
  lr = config.optim.learning_rate
  if not _number(lr) or not 0 <= lr < math.inf:
    _bad("optim.learning_rate", f"must be a finite number >= 0, got {lr!r} (a negative rate "
         f"ascends the loss).")
  r = config.rollout
  if not _number(r.temperature) or not 0 <= r.temperature < math.inf:
    _bad("rollout.temperature", f"must be a finite number >= 0 (0: greedy), got "
         f"{r.temperature!r}.")
  if not _number(r.top_p) or not 0 < r.top_p <= 1:
    _bad("rollout.top_p", f"must be in (0, 1] (1: the whole distribution), got {r.top_p!r}.")
  if isinstance(r.top_k, bool) or not isinstance(r.top_k, (int, np.integer)) or r.top_k < 0:
    _bad("rollout.top_k", f"must be an integer >= 0 (0: every token), got {r.top_k!r}.")
  if r.temperature == 0 and r.group_size > 1:
    warn_once(f"--config.rollout.temperature=0 samples greedily: the {r.group_size} completions "
              f"of a prompt are identical, every group's rewards agree and GRPO has nothing to "
              f"learn from; use a temperature > 0.")
  timeout = config.reward.timeout_s
  if not _number(timeout) or not 0 <= timeout < math.inf:
    _bad("reward.timeout_s", f"must be a number of seconds >= 0 (0: no limit), got {timeout!r}.")
  if config.reward.on_error not in ("raise", "zero"):
    _bad("reward.on_error", f"must be 'raise' or 'zero', got {config.reward.on_error!r}.")


def _check_reward_fits_dataset(config: ml_collections.ConfigDict) -> None:
  """Each built-in reward of `reward.fns` must find the example fields it scores, of the kind it
  needs, in the examples of `data.name` (`rewards.EXAMPLE_FIELDS` against `data.FIELDS`): otherwise
  it scores every completion the same and GRPO trains on a constant. Import paths are not checked."""
  name = config.data.name
  have = data_lib.FIELDS.get(name.partition("/")[0])
  if have is None:
    return  # an unknown dataset is the loader's error
  fits = lambda need: all(have.get(f) == kind for f, kind in need.items())
  for fn in as_names(config.reward.fns):
    need = rewards.EXAMPLE_FIELDS.get(fn, {})
    if not fits(need):
      reads = ", ".join(f"{f} ({kind})" for f, kind in need.items())
      holds = ", ".join(f"{f} ({have.get(f, 'missing')})" for f in need)
      usable = [r for r, n in rewards.EXAMPLE_FIELDS.items() if n and fits(n)]
      raise ConfigError(
          f"--config.reward.fns: the reward {fn!r} cannot score the dataset {name!r}: it reads "
          f"the example fields {reads}, and {name} has {holds}."
          + (f" Rewards that check {name}: {', '.join(usable)}." if usable else ""))


def check_prompt_lengths(options: Options) -> None:
  """Reads the train split (preparing it on first use) and raises a ConfigError, before any
  training or warm start, naming the flag, file or line at fault: a fault in `data.manual_dir`'s
  files (an empty file, bytes that are not UTF-8, a missing field), a `data.data_dir` where the
  dataset is not prepared and cannot be, a split with fewer examples than one step's prompts
  (`batch_size / rollout.group_size`), or a prompt (formatted by `data.prompt_template`, with
  `<bos>` if `data.add_bos`) longer than `data.max_prompt_len` tokens. `options`: `validate`'s
  (a config is turned into them first)."""
  if not isinstance(options, Options):
    options = Options.of(options)
  d = options.data
  try:
    size, longest, i, prompt = _scan_train(d.name, d.data_dir, d.manual_dir, d.prompt_template,
                                           d.add_bos, d.tokenizer)
  except data_lib.DataError as err:
    raise ConfigError(f"--config.{err.field}: {err}") from None
  source = d.name + (f" (from {d.manual_dir})" if d.manual_dir else "")
  if not size:
    raise ConfigError(f"--config.data.name: the train split of {source} has no examples.")
  prompts = options.rollout.prompts_per_step
  if size < prompts:
    raise ConfigError(
        f"--config.batch_size: a step takes {prompts} prompts (batch_size {options.batch_size} / "
        f"rollout.group_size {options.rollout.group_size}), more than the {size} examples of "
        f"{source}'s train split.")
  if longest > d.max_prompt_len:
    raise ConfigError(
        f"--config.data.max_prompt_len: the longest prompt of {d.name} (train example {i}, "
        f"{prompt!r}) takes {longest} tokens{' with <bos>' if d.add_bos else ''}, more than "
        f"max_prompt_len={d.max_prompt_len}; raise --config.data.max_prompt_len to at least "
        f"{longest}.")


@functools.lru_cache(maxsize=16)  # the scan reads the whole split: once a process is enough
def _scan_train(name, data_dir, manual_dir, template, add_bos, tokenizer
                ) -> tuple[int, int, int, str]:
  """(examples, tokens of the longest prompt, its index, its text) of the train split."""
  source = data_lib.load(name, "train", data_dir=data_dir, manual_dir=manual_dir)
  examples = source.take(range(len(source)))
  if not examples:
    return 0, 0, 0, ""
  tok = text.load_tokenizer(tokenizer)
  longest, i = text.longest_prompt(tok, examples, prompt_template=template, add_bos=add_bos)
  return len(examples), longest, i, template.format(**examples[i])


def _check_reward_fns(config) -> None:
  """Each `reward.fns` entry imports, and `reward.weights` has one weight for each."""
  specs = as_names(config.reward.fns)
  fields = data_lib.FIELDS.get(config.data.name.partition("/")[0])
  for spec in specs:
    try:
      fn = rewards.load_reward_fn(spec)
    except ValueError as err:
      raise ConfigError(f"--config.reward.fns: {err}") from None
    if spec not in rewards.BUILTIN:  # built-ins: _check_reward_fits_dataset names the fields
      _check_reward_signature(spec, fn, config.data.name, fields)
  weights = as_names(config.reward.weights) if isinstance(config.reward.weights, str) else tuple(
      config.reward.weights)
  if len(weights) != len(specs):
    raise ConfigError(f"--config.reward.weights: {len(weights)} weights for {len(specs)} "
                      f"functions.")
  for w in weights:
    try:
      as_numbers([w])
    except (TypeError, ValueError):
      raise ConfigError(f"--config.reward.weights: {str(w).strip()!r} is not a number.") from None


def _check_reward_signature(spec: str, fn, dataset: str, fields) -> None:
  """`fn` accepts the call `score` makes: fn(prompts, completions, **the example's fields other
  than the question), with the fields of `dataset` when they are known."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):  # a builtin without a signature: its call will tell
    return
  kwargs = {f: [""] for f in (fields or {}) if f != "question"}
  try:
    sig.bind([""], [""], **kwargs)
  except TypeError as err:
    raise ConfigError(
        f"--config.reward.fns: reward function {spec!r} cannot be called as fn(prompts, "
        f"completions, {', '.join(f'{k}=[…]' for k in kwargs) or '**fields'}) with the fields of "
        f"{dataset} ({err}); a reward takes fn(prompts, completions, **example_fields) and may "
        f"absorb the fields it does not read with **_.") from None


def _check_wandb(config) -> None:
  """With `metrics.wandb`: the wandb package is installed and `metrics.wandb_mode` is known."""
  if not config.metrics.wandb:
    return
  mode = config.metrics.wandb_mode
  if mode not in metrics_lib.WANDB_MODES:
    raise ConfigError(f"--config.metrics.wandb_mode: must be one of "
                      f"{', '.join(metrics_lib.WANDB_MODES)}, got {mode!r}.")
  try:
    metrics_lib.require_wandb()
  except ValueError as err:
    raise ConfigError(f"--config.metrics.wandb: {err}") from None


def make_mesh(mesh) -> jax.sharding.Mesh:
  """The device mesh of a config's or an `Options`' `mesh` section."""
  n = mesh.devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"mesh.devices = {n} but only {jax.device_count()} devices exist.")
  return sharding.make_mesh(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor,
                            devices=jax.devices()[:n])

