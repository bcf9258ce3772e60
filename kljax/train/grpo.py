"""The GRPO trainer: rollouts → rewards → group advantages → log-probs → PPO-clip + β·KL term.

Reads top to bottom: setup (tokenizer, data, models, mesh, optimizer, KL), the jitted pieces
(the reference pass, sequence statistics, the loss built by `make_loss_fn`, the minibatch update),
one step in named stages (rollout → score → rollout_stats → advantages → prepare_batch →
update_epochs → step_metrics → next_state), and the loop with checkpoints and metrics.

Without a reference model (kl.term = "none" and metrics.exact_kl off) the metrics that compare the
policy to the reference (`REFERENCE_METRICS`: k1, k2, k3, the exact KL, the log-ratio extremes,
the clamped count) are NaN in metrics.jsonl: absent, never a false zero.

Randomness is a function of (seed, step) and the data order a function of the step, so a run
restored from its checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import socket
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
from kljax import estimators as est
from kljax import logprobs, losses, models, offpolicy, paths, rewards, sharding, text
from kljax import rollout as rollout_lib
from kljax.full_kl import FullKLTerm
from kljax.kl import KLTerm, kl_term, kl_term_names
from kljax.train import multihost, preempt, runlock, sft
from kljax.train.checkpoint import CheckpointError, Checkpointer
from kljax.train.metrics import MetricsWriter


# Where an in-reward KL term (placement "reward") enters the advantage; k_t is the term's per-token
# value, c_t its coefficient (token or reward-to-go credit), σ_g the group's reward std:
#   "after_norm":  A_{i,t} = (r_i − mean_g r)/σ_g − β·c_{i,t}. The KL part of the gradient is
#                  β·E[c_t ∇log π(y_t)], independent of the group statistics, so k1_in_reward ≡
#                  k2_as_loss holds exactly (Thm 5.1). OpenRLHF's order (normalize, then add the
#                  per-token KL) with reward-to-go credit is k1_in_reward_rtg here.
#   "before_norm": r'_i = r_i − β·Σ_t k_{i,t}, then A_i = (r'_i − mean_g r')/σ'_g for every token
#                  (verl's order): whole-sequence credit, each token's score weighted by the whole
#                  sequence's KL; the effective β is β/σ'_g, so it changes from group to group and
#                  grows as the group's rewards agree.
REWARD_STAGES = ("after_norm", "before_norm")
# When an after-norm in-reward penalty c_t is computed, off-policy (epochs or minibatches > 1):
#   "rollout": once, from the rollout policy π_old's log-probs (on the host, `advantages`), and held
#              over every epoch and minibatch, as verl's apply_kl_penalty does. The PPO ratio ρ_t
#              then weighs sg(c(π_old)): for k1 the expected gradient is ∇RKL − ∇KL(π‖π_old) per
#              position, biased as soon as π ≠ π_old.
#   "current": recomputed at the parameters being updated in every minibatch loss (`make_loss_fn`):
#              sg(c(π_θ))·ρ_t. Token credit then follows each position's ∇RKL with prefixes from
#              π_old (one token: ∇RKL exactly); reward-to-go stays biased off-policy, because its
#              later tokens keep π_old's law (tests/test_reward_at.py proves both by enumeration).
# On-policy the two are the same. Inside the PPO clip range only: a clipped token loses its
# penalty's gradient too.
REWARD_AT = ("rollout", "current")
ROLLOUT_DTYPES = ("float32", "bfloat16")


def tokens_hash(tokens: np.ndarray) -> float:
  """A 48-bit hash of a token array (its bytes, dtype and shape) as a float (exact in float64), so
  that two runs can be checked to have sampled identical batches from their metrics alone."""
  import hashlib

  x = np.ascontiguousarray(tokens)
  h = hashlib.sha256(f"{x.dtype}{x.shape}".encode() + x.tobytes()).digest()
  return float(int.from_bytes(h[:6], "big"))


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is compiled."""


def validate(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Every check that needs no compilation: names, ranges, divisibility, the mesh, the reward
  functions' import paths, wandb when `metrics.wandb` asks for it, and that every path's scheme (gs://…) can be reached here (its package
  is installed). With `workdir`, also the paths a run on this machine reads and writes
  (`_check_paths`), so that none fails after the warm start."""
  if workdir is not None and not str(workdir).strip():
    raise ConfigError("--workdir is empty (an unset shell variable?); name the run directory.")
  _check_schemes(config, workdir)
  _check_names(config)
  _check_rollout_policy(config)
  _check_sizes(config)
  _check_ranges(config)
  _check_reward_fns(config)
  _check_reward_fits_dataset(config)
  _check_wandb(config)
  if workdir is not None:
    _check_paths(config, workdir)


def _bad(field: str, msg: str):
  raise ConfigError(f"--config.{field}: {msg}")


def _check_names(config: ml_collections.ConfigDict) -> None:
  """The KL term, β, the reward stage, the controller, the advantage estimator, the aggregation."""
  if config.kl.term != "none" and config.kl.term not in kl_term_names():
    try:
      kl_term(config.kl.term)
    except ValueError as err:
      _bad("kl.term", f"{err} Or 'none' for no KL term.")
  if not config.kl.beta >= 0 or not math.isfinite(config.kl.beta):
    _bad("kl.beta", f"must be a finite number >= 0, got {config.kl.beta}.")
  if config.kl.get("reward_stage", "after_norm") not in REWARD_STAGES:
    _bad("kl.reward_stage", f"must be one of {', '.join(REWARD_STAGES)}, got "
         f"{config.kl.reward_stage!r}.")
  if config.kl.get("reward_at", "rollout") not in REWARD_AT:
    _bad("kl.reward_at", f"must be one of {', '.join(REWARD_AT)}, got {config.kl.reward_at!r}.")
  if (config.kl.get("reward_at", "rollout") == "current"
      and config.kl.get("reward_stage", "after_norm") != "after_norm"):
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


def _check_rollout_policy(config: ml_collections.ConfigDict) -> None:
  """rollout.staleness, dtype, correction, correction_cap, correct_kl, engine, vllm_kv_cache_gb
  and sync_tolerance."""
  r = config.rollout
  k = r.get("staleness", 0)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    _bad("rollout.staleness", f"must be an integer >= 0 (how many steps the sampler's parameters "
         f"lag the trainer's), got {k!r}.")
  if r.get("dtype", "float32") not in ROLLOUT_DTYPES:
    _bad("rollout.dtype", f"must be one of {', '.join(ROLLOUT_DTYPES)}, got {r.dtype!r}.")
  if r.get("correction", "none") not in offpolicy.CORRECTIONS:
    _bad("rollout.correction", f"must be one of {', '.join(offpolicy.CORRECTIONS)}, got "
         f"{r.correction!r}.")
  cap = r.get("correction_cap", 2.0)
  if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 1:
    _bad("rollout.correction_cap", f"must be a number > 1 (the ratio bound C), got {cap!r}.")
  engine = r.get("engine", "jax")
  if engine not in rollout_lib.ENGINES:
    _bad("rollout.engine", f"must be one of {', '.join(rollout_lib.ENGINES)}, got {engine!r}.")
  gib = r.get("vllm_kv_cache_gb", 0.0)
  if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0:
    _bad("rollout.vllm_kv_cache_gb", f"must be a number of GiB >= 0 (0: sized to one step's "
         f"batch), got {gib!r}.")
  tol = r.get("sync_tolerance", 0.0)
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
  if (not r.get("correct_kl", True) and config.kl.term != "none"
      and kl_term(config.kl.term).placement == "reward"):
    _bad("rollout.correct_kl", f"False applies to loss-placed KL terms only; {config.kl.term} "
         f"rides in the advantage, which the correction weighs with the policy gradient.")


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  """Group size, batch and minibatch divisibility, counts >= 1, and the mesh."""
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
    mesh = _mesh(config)
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


_warned: set[str] = set()


def warn_once(msg: str) -> None:
  """`msg` on stderr as one line, once a process (validate runs more than once a run)."""
  if msg not in _warned and jax.process_index() == 0:
    _warned.add(msg)
    print(f"kljax: warning: {msg}", file=sys.stderr, flush=True)


def _number(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Numbers that have a range, where leaving it would run without an error but not as meant."""
  grace = config.get("stop_grace_s", 25.0)
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
  timeout = config.reward.get("timeout_s", 30.0)
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
  for fn in (s.strip() for s in config.reward.fns.split(",")):
    need = rewards.EXAMPLE_FIELDS.get(fn, {})
    if not fits(need):
      reads = ", ".join(f"{f} ({kind})" for f, kind in need.items())
      holds = ", ".join(f"{f} ({have.get(f, 'missing')})" for f in need)
      usable = [r for r, n in rewards.EXAMPLE_FIELDS.items() if n and fits(n)]
      raise ConfigError(
          f"--config.reward.fns: the reward {fn!r} cannot score the dataset {name!r}: it reads "
          f"the example fields {reads}, and {name} has {holds}."
          + (f" Rewards that check {name}: {', '.join(usable)}." if usable else ""))


def check_prompt_lengths(config: ml_collections.ConfigDict) -> None:
  """Reads the train split (preparing it on first use) and raises a ConfigError, before any
  training or warm start, naming the flag, file or line at fault: a fault in `data.manual_dir`'s
  files (an empty file, bytes that are not UTF-8, a missing field), a `data.data_dir` where the
  dataset is not prepared and cannot be, a split with fewer examples
  than one step's prompts (`batch_size / rollout.group_size`), or a prompt (formatted by
  `data.prompt_template`, with `<bos>` if `data.add_bos`) longer than `data.max_prompt_len`
  tokens."""
  d = config.data
  try:
    size, longest, i, prompt = _scan_train(d.name, d.data_dir, d.get("manual_dir") or None,
                                           d.prompt_template, d.add_bos, config.model.tokenizer)
  except data_lib.DataError as err:
    raise ConfigError(f"--config.{err.field}: {err}") from None
  source = d.name + (f" (from {d.manual_dir})" if d.get("manual_dir") else "")
  if not size:
    raise ConfigError(f"--config.data.name: the train split of {source} has no examples.")
  prompts = config.batch_size // config.rollout.group_size
  if size < prompts:
    raise ConfigError(
        f"--config.batch_size: a step takes {prompts} prompts (batch_size {config.batch_size} / "
        f"rollout.group_size {config.rollout.group_size}), more than the {size} examples of "
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
  tok = text.HFTokenizer(tokenizer) if tokenizer else text.CharTokenizer()
  longest, i = sft.longest_prompt(tok, examples, prompt_template=template, add_bos=add_bos)
  return len(examples), longest, i, template.format(**examples[i])


def _check_reward_fns(config) -> None:
  """Each `reward.fns` entry imports, and `reward.weights` has one weight for each."""
  specs = [s.strip() for s in config.reward.fns.split(",")]
  fields = data_lib.FIELDS.get(config.data.name.partition("/")[0])
  for spec in specs:
    try:
      fn = rewards.load_reward_fn(spec)
    except ValueError as err:
      raise ConfigError(f"--config.reward.fns: {err}") from None
    if spec not in rewards.BUILTIN:  # built-ins: _check_reward_fits_dataset names the fields
      _check_reward_signature(spec, fn, config.data.name, fields)
  weights = str(config.reward.weights).split(",")
  if len(weights) != len(specs):
    raise ConfigError(f"--config.reward.weights: {len(weights)} weights for {len(specs)} "
                      f"functions.")
  for w in weights:
    try:
      float(w)
    except ValueError:
      raise ConfigError(f"--config.reward.weights: {w.strip()!r} is not a number.") from None


def _check_reward_signature(spec: str, fn, dataset: str, fields) -> None:
  """`fn` accepts the call `score` makes: fn(prompts, completions, **the example's fields other
  than the question), with the fields of `dataset` when they are known."""
  import inspect

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
  if not config.metrics.get("wandb", False):
    return
  from kljax.train import metrics

  mode = config.metrics.get("wandb_mode", "offline")
  if mode not in metrics.WANDB_MODES:
    raise ConfigError(f"--config.metrics.wandb_mode: must be one of "
                      f"{', '.join(metrics.WANDB_MODES)}, got {mode!r}.")
  try:
    metrics.require_wandb()
  except ValueError as err:
    raise ConfigError(f"--config.metrics.wandb: {err}") from None


# ---------------------------------------------------------------- one config per run directory
# WORKDIR/config.json records the config a run was started with. A resume under other values of a
# field that shapes the trajectory would make one run of two configs, under one name: it stops
# before any work unless `resume_changed` says it is meant, and is then recorded. These fields
# cannot change the trajectory: how long the run is, how often it checkpoints and logs, where the
# prepared data lives, the device layout (a sharded step equals the single-device one), and how a
# stop or a hanging reward is handled. A prefix ends with ".".
CONFIG_FILE = "config.json"
FREE_FIELDS = ("num_steps", "checkpoint_every", "stop_grace_s", "resume_changed",
               "reward.timeout_s", "data.data_dir", "mesh.", "metrics.",
               "rollout.sync_tolerance", "rollout.vllm_kv_cache_gb")
_HISTORY = "resume_changes"  # config.json's record of the resumes that changed fields


def _free(field: str) -> bool:
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE_FIELDS)


def _read_config_file(workdir) -> dict | None:
  """WORKDIR/config.json as a dict; None when absent; ConfigError when it cannot be read."""
  path = paths.resolve(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  if path.is_dir():
    raise ConfigError(f"--workdir: {path} is a directory; kljax writes the run's config there. "
                      f"Move it aside.")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as err:
    raise ConfigError(f"--workdir: {path} is not the JSON kljax wrote ({err}); it records the "
                      f"config this run was started with: restore it, or use a new --workdir."
                      ) from None


def config_changes(config: ml_collections.ConfigDict, workdir) -> dict[str, tuple]:
  """{field: (recorded, new)} of every field outside FREE_FIELDS whose value in `config` differs
  from WORKDIR/config.json's ({} when there is none). A field the file lacks (written by an older
  kljax) is compared with its default."""
  from kljax import cli
  from kljax.train import config as defaults

  recorded = _read_config_file(workdir)
  if recorded is None:
    return {}
  recorded.pop(_HISTORY, None)
  old = cli.flatten(recorded)
  new = cli.flatten(json.loads(config.to_json_best_effort()))
  default = cli.flatten(json.loads(defaults.grpo_tiny().to_json_best_effort()))
  missing = object()
  changes = {}
  for field in sorted(set(old) | set(new)):
    if _free(field):
      continue
    a, b = old.get(field, default.get(field, missing)), new.get(field, missing)
    if a != b:
      changes[field] = tuple("(absent)" if v is missing else v for v in (a, b))
  return changes


def check_resume(config: ml_collections.ConfigDict, workdir) -> dict[str, tuple]:
  """`config_changes`; a ConfigError listing them (field: old -> new) unless `resume_changed`."""
  changes = config_changes(config, workdir)
  if changes and not config.get("resume_changed", False):
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    raise ConfigError(
        f"--workdir: {workdir} holds a run started with another config ({CONFIG_FILE}); this "
        f"command changes {listed}. A resume may change only {', '.join(FREE_FIELDS)}. Use a new "
        f"--workdir, or pass --config.resume_changed=True to continue this run under the new "
        f"values on purpose (recorded in {CONFIG_FILE} and metrics.jsonl).")
  return changes


def record_config(config: ml_collections.ConfigDict, workdir, changes: dict,
                  step: int | None = None) -> None:
  """Writes WORKDIR/config.json: `config`, and the record of earlier resumes that changed fields
  with, if `changes`, this one's (from checkpoint `step`)."""
  recorded = _read_config_file(workdir) or {}
  history = recorded.get(_HISTORY, [])
  if changes:
    history = history + [{"from_step": step, "changes": {k: list(v) for k, v in changes.items()}}]
  out = json.loads(config.to_json_best_effort())
  if history:
    out[_HISTORY] = history
  paths.write_atomic(paths.resolve(workdir) / CONFIG_FILE, json.dumps(out, indent=1))


def _wandb_options(config) -> dict:
  """MetricsWriter's W&B arguments: none unless `metrics.wandb`."""
  if not config.metrics.get("wandb", False):
    return {}
  return {"wandb_project": config.metrics.get("wandb_project", "kljax"),
          "wandb_mode": config.metrics.get("wandb_mode", "offline"), "run_config": config.to_dict()}


def _run_paths(config, workdir) -> list[tuple[str, str]]:
  """(flag, path) of every path a run reads or writes that is set."""
  out = [("--workdir", workdir), ("--config.data.data_dir", config.data.data_dir),
         ("--config.data.manual_dir", config.data.get("manual_dir")),
         ("--config.model.tokenizer", config.model.tokenizer),
         ("--config.model.init", config.model.init)]
  return [(flag, str(path)) for flag, path in out if path]


def _check_schemes(config, workdir) -> None:
  """Each URL among the run's paths has its package installed (gcsfs for gs://), so that a
  missing one is named before anything is compiled or prepared."""
  for flag, path in _run_paths(config, workdir):
    try:
      paths.check_reachable(path, flag=flag)
    except paths.PathError as err:
      raise ConfigError(str(err)) from None


def _check_paths(config, workdir: str) -> None:
  """The run directory can be created and written, the data directory read (or created), and
  `model.tokenizer` and `model.init`, when set, load (the checkpoint without its weights)."""
  _check_dir("--workdir", workdir, write=True)
  _check_run_files(workdir)
  _check_dir("--config.data.data_dir", config.data.data_dir, write=False)
  if config.data.get("manual_dir"):
    path = paths.resolve(config.data.manual_dir)
    if not _reached("--config.data.manual_dir", path.is_dir):
      raise ConfigError(f"--config.data.manual_dir: {path} is not a directory.")
  if config.model.tokenizer:
    try:
      text.HFTokenizer(config.model.tokenizer)
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
      raise ConfigError(f"--config.model.tokenizer: {err}") from None
  if config.model.init:
    try:
      models.check_hf(config.model.init, dtype=config.model.dtype,
                      param_dtype=config.model.param_dtype)
    except (OSError, ValueError) as err:  # hf.CheckpointError is a ValueError
      raise ConfigError(f"--config.model.init: {err}") from None


# What a run keeps in WORKDIR, by kind: one of another kind in its place fails only mid-run.
RUN_FILES = {"checkpoints": "directory", "metrics.jsonl": "file", CONFIG_FILE: "file",
             runlock.LOCK_FILE: "file", "sft": "directory", "tensorboard": "directory"}


def _check_run_files(workdir) -> None:
  """Each of RUN_FILES that exists in a local WORKDIR is of its kind (a directory where a file
  belongs, or the reverse, is an IsADirectoryError or a failed save later)."""
  root = paths.resolve(workdir)
  if not paths.is_local(root):
    return
  for name, kind in RUN_FILES.items():
    path = root / name
    if path.exists() and path.is_dir() != (kind == "directory"):
      raise ConfigError(f"--workdir: {path} is {'a directory' if path.is_dir() else 'a file'}, "
                        f"where the run keeps its {name} {kind}; move it aside.")


def _reached(flag: str, fn):
  """`fn()`, with an error of the store (no bucket, no credentials, no network) as a ConfigError
  naming `flag`."""
  try:
    return fn()
  except Exception as err:  # noqa: BLE001 - gcsfs, google-auth and aiohttp raise many types
    said = " ".join(str(err).split())[:300]
    raise ConfigError(f"{flag}: cannot reach it: {type(err).__name__}: {said}") from None


def _check_dir(flag: str, path: str, *, write: bool) -> None:
  """`path` is a directory, or can be made one: its nearest existing ancestor is a writable
  directory. With `write`, an existing `path` must be writable too (the data directory need not:
  it may hold prepared data). On an object store (gs://…), where directories exist only while
  objects lie under them: the bucket exists, `path` is not an object, and with `write` a probe
  object can be written and deleted (credentials allow writing), all before the warm start."""
  path = paths.resolve(path)
  if not paths.is_local(path):
    bucket = paths.bucket(path)
    if not _reached(flag, bucket.exists):
      raise ConfigError(f"{flag}: {path}: the bucket {bucket} does not exist.")
    if _reached(flag, path.is_file):
      raise ConfigError(f"{flag}: {path} is not a directory (an object of that name exists).")
    if write:
      probe = path / f".kljax_write_probe.{socket.gethostname()}.{os.getpid()}"
      _reached(flag, lambda: (probe.write_text("kljax"), probe.unlink()))
    return
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    what = "is not a directory" if existing == path else f"cannot be created: {existing} is a file"
    raise ConfigError(f"{flag}: {path} {what}.")
  if (existing != path or write) and not os.access(existing, os.W_OK | os.X_OK):
    what = ("is not writable" if existing == path else
            f"cannot be created: {existing} is not writable")
    raise ConfigError(f"{flag}: {path} {what}.")


def _mesh(config) -> jax.sharding.Mesh:
  n = config.mesh.devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"mesh.devices = {n} but only {jax.device_count()} devices exist.")
  return sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor,
                            devices=jax.devices()[:n])


# ---------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  tokenizer: text.Tokenizer
  source: data_lib.Source
  graphdef: Any
  mesh: jax.sharding.Mesh
  optimizer: optax.GradientTransformation
  beta: beta_lib.BetaController
  term: KLTerm | None
  reward_fns: list
  reward_weights: list[float]
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


def make_tokenizer(config) -> text.Tokenizer:
  """The built-in character tokenizer, or `config.model.tokenizer` (a tokenizer.json or its dir)."""
  return text.HFTokenizer(config.model.tokenizer) if config.model.tokenizer else text.CharTokenizer()


def build(config: ml_collections.ConfigDict, init_model: nnx.Module | None = None
          ) -> tuple[Setup, TrainState]:
  """Everything a run needs, and its initial state: the reference holds `init_model`'s arrays (or
  a random `config.model.preset` sized to the tokenizer's vocabulary) and the policy a copy of them,
  which the update donates."""
  validate(config)
  check_prompt_lengths(config)
  tokenizer = make_tokenizer(config)
  source = data_lib.load(config.data.name, "train", data_dir=config.data.data_dir,
                         manual_dir=config.data.get("manual_dir") or None)
  mesh = _mesh(config)
  if init_model is None:
    init_model = models.create(models.preset(config.model.preset, vocab_size=tokenizer.vocab_size),
                               seed=config.seed)
  if init_model.config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"--config.model: the model's vocabulary ({init_model.config.vocab_size}) is "
                      f"smaller than the tokenizer's ({tokenizer.vocab_size}).")
  graphdef, params = nnx.split(init_model)
  params = tree_to_devices(params, sharding.state_shardings(
      params, mesh, rules=param_rules(config, init_model.config.vocab_size)))
  optimizer, beta, term = make_optimizer(config), make_beta(config), make_term(config)
  fns = [rewards.load_reward_fn(s.strip()) for s in config.reward.fns.split(",")]
  weights = [float(w) for w in str(config.reward.weights).split(",")]
  # The update donates the policy's buffers: the policy gets a copy of its own, and the arrays
  # given (the caller's model stays valid) become the reference, and θ_0 for steps < staleness.
  state = TrainState(sharding.copy_tree(params), params, replicate(optimizer.init(params), mesh),
                     replicate(beta.init(), mesh), replicate(jnp.zeros((), jnp.int32), mesh),
                     (params,) * config.rollout.get("staleness", 0))
  return Setup(config, tokenizer, source, graphdef, mesh, optimizer, beta, term, fns, weights,
               make_correction(config)), state


def param_rules(config: ml_collections.ConfigDict, vocab_size: int) -> sharding.Rules:
  """The parameters' sharding rules: `mesh.embedding_split` for this run's update size
  (`sharding.rules_for`)."""
  tokens = (config.batch_size // config.loss.minibatches
            * (config.data.max_prompt_len + config.rollout.max_new_tokens))
  return sharding.rules_for(tokens, vocab_size, config.mesh.embedding_split)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with linear warm-up and cosine decay over every update."""
  total = config.num_steps * config.loss.epochs * config.loss.minibatches
  if total == 1:  # one update, at the peak rate (a warm-up from 0 would make it a no-op)
    schedule = optax.constant_schedule(config.optim.learning_rate)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.optim.learning_rate, min(config.optim.warmup_steps, total - 1) or 1, total,
        end_value=config.optim.learning_rate * config.optim.final_lr_fraction)
  return optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip),
      optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                  weight_decay=config.optim.weight_decay))


def make_correction(config: ml_collections.ConfigDict):
  """The μ → π_old weights of `rollout.correction` (None for "none")."""
  name = config.rollout.get("correction", "none")
  if name == "none":
    return None
  return offpolicy.sampler_correction(name, cap=config.rollout.get("correction_cap", 2.0))


def sampler_model(setup: Setup, params) -> nnx.Module:
  """The rollout policy μ: `params` as the trainer's model ("float32": unchanged, in the model's
  own dtypes), or rounded to bfloat16 with activations and matmuls in bfloat16 ("bfloat16")."""
  dtype = setup.config.rollout.get("dtype", "float32")
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
  c = setup.config
  model_fn = functools.partial(sampler_model, setup)
  if c.rollout.get("engine", "jax") == "jax":
    return rollout_lib.JaxEngine(model_fn)
  from kljax.rollout import vllm_engine

  model_config = nnx.merge(setup.graphdef, params).config
  dtype = "bfloat16" if c.rollout.get("dtype", "float32") == "bfloat16" else model_config.dtype
  max_len = c.data.max_prompt_len + c.rollout.max_new_tokens
  gib = c.rollout.get("vllm_kv_cache_gb", 0.0)
  kv_bytes = int(gib * 2**30) if gib else vllm_engine.kv_cache_bytes_for(
      model_config, sequences=c.batch_size, max_model_len=max_len, dtype=dtype)
  return vllm_engine.VLLMEngine(model_config, setup.graphdef, model_fn, dtype=dtype,
                                max_model_len=max_len, kv_cache_bytes=kv_bytes, seed=c.seed,
                                sync_tolerance=c.rollout.get("sync_tolerance", 0.0) or None)


def close_engine(setup: Setup) -> None:
  engine, setup.engine = setup.engine, None
  if engine is not None:
    engine.close()


def make_beta(config: ml_collections.ConfigDict) -> beta_lib.BetaController:
  """The β controller of `kl.controller` (`kljax.beta.CONTROLLERS`)."""
  return beta_lib.controller(config.kl.controller, beta=config.kl.beta,
                             target_kl=config.kl.target_kl, horizon=config.kl.horizon,
                             warmup_steps=config.kl.warmup_steps)


def make_term(config: ml_collections.ConfigDict) -> KLTerm | FullKLTerm | None:
  """The KL term of `kl.term` (None for "none"): a per-token `KLTerm`, or a `FullKLTerm` over the
  whole next-token distribution (placement "full": exact_rkl_as_loss, exact_rkl_rb, ...)."""
  if config.kl.term == "none":
    return None
  return kl_term(config.kl.term, clip_eps_low=config.loss.clip_eps_low,
                 clip_eps_high=config.loss.clip_eps_high)


# ---------------------------------------------------------------- jitted pieces
# Built once from explicit options (`compile_fns` is the only reader of the config): no traced
# function reads the config or picks a branch by a string inside the trace.


def is_on_policy(config: ml_collections.ConfigDict) -> bool:
  """One epoch of one minibatch: every update sees the rollout policy itself (ρ ≡ 1), so the
  update takes its log-probs from its own forward pass and no statistics pass runs before it.
  More epochs or minibatches make the later updates off-policy."""
  return config.loss.epochs == 1 and config.loss.minibatches == 1


def uses_reference(config: ml_collections.ConfigDict) -> bool:
  """The reference model runs when a KL term needs it or the exact KL is logged; without it the
  metrics that compare the policy to the reference are absent (NaN)."""
  return config.kl.term != "none" or config.metrics.exact_kl


def _completion_positions(tokens, prompt_len: int):
  """The positions whose hidden states predict the completion, and the completion tokens."""
  return slice(prompt_len - 1, tokens.shape[1] - 1), tokens[:, prompt_len:]


class Reference(NamedTuple):
  """The reference's view of the completion, under stop_gradient: nothing flows into π_ref."""
  hidden_btd: jax.Array  # at the positions that predict the completion
  unembed_dv: jax.Array
  logp_bt: jax.Array  # log π_ref(y_t)


def reference_pass(graphdef, ref_params, tokens, attn_mask, *, prompt_len: int,
                   chunk_size: int) -> Reference:
  """The reference model's forward pass over the completion tokens."""
  sl, targets = _completion_positions(tokens, prompt_len)
  ref = nnx.merge(graphdef, ref_params)
  rh, _ = ref.hidden_states(tokens, attention_mask_bt=attn_mask)
  rh, rw = jax.lax.stop_gradient(rh[:, sl]), jax.lax.stop_gradient(ref.unembedding())
  return Reference(rh, rw, logprobs.token_stats(rh, rw, targets, chunk_size=chunk_size).logp)


def completion_stats(graphdef, params, ref_params, tokens, attn_mask, *, prompt_len: int,
                     chunk_size: int, with_ref: bool, exact_kl: bool = True) -> dict:
  """Per completion token: policy log-prob, entropy, and (with a reference) its log-prob and the
  exact reverse/forward KL. Arrays [B, N]."""
  policy = nnx.merge(graphdef, params)
  h, _ = policy.hidden_states(tokens, attention_mask_bt=attn_mask)
  sl, targets = _completion_positions(tokens, prompt_len)
  if not with_ref:
    s = logprobs.token_stats(h[:, sl], policy.unembedding(), targets, chunk_size=chunk_size)
    return {"logp": s.logp, "entropy": s.entropy}
  ref = reference_pass(graphdef, ref_params, tokens, attn_mask, prompt_len=prompt_len,
                       chunk_size=chunk_size)
  s = logprobs.token_stats(h[:, sl], policy.unembedding(), targets,
                           ref_hidden_btd=ref.hidden_btd if exact_kl else None,
                           ref_unembed_dv=ref.unembed_dv if exact_kl else None,
                           chunk_size=chunk_size)
  out = {"logp": s.logp, "entropy": s.entropy, "ref_logp": ref.logp_bt}
  if exact_kl:
    out |= {"rkl": s.reverse_kl, "fkl": s.forward_kl}
  return out


def kl_in_advantages(term: KLTerm, advantages_bt, beta, logp_bt, ref_logp_bt, mask_bt):
  """In-reward KL after the group normalization ("after_norm"): A_{i,t} − β·c_{i,t}, with c_t the
  term's coefficient at the rollout policy (token or reward-to-go credit). [B, N]"""
  return advantages_bt - beta * term.coefficient(logp_bt, ref_logp_bt, mask=mask_bt)


def penalized_advantages(term: KLTerm, advantages_bt, beta, logp_bt, old_logp_bt, ref_logp_bt,
                         mask_bt, *, reward_at: str):
  """An after-norm in-reward penalty inside the loss: A − β·c(π_old) (`reward_at="rollout"`, the
  penalty of the rollout policy) or A − β·c(sg π_θ) (`"current"`, recomputed at the parameters
  being updated). See REWARD_AT. [B, N]"""
  at = old_logp_bt if reward_at == "rollout" else jax.lax.stop_gradient(logp_bt)
  return kl_in_advantages(term, advantages_bt, beta, at, ref_logp_bt, mask_bt)


def kl_in_reward(term: KLTerm, rewards_gk, beta, logp_bt, ref_logp_bt, mask_bt):
  """In-reward KL before the group normalization ("before_norm", verl's order):
  r'_i = r_i − β·Σ_t k_{i,t}, on the host. `rewards_gk` [prompts, G]."""
  k_bt = to_host(term.value(logp_bt, ref_logp_bt, mask=mask_bt))
  return rewards_gk - beta * (k_bt * mask_bt).sum(1).reshape(rewards_gk.shape)


def _kl_grad_zeroed_fraction(term: KLTerm, logp, ref_logp, old, mask) -> jax.Array:
  """Tokens whose KL-term gradient is exactly zero although π ≠ π_ref there (e.g. the clipped
  head once the ratio has left the clip range): the fraction a correction removed."""
  lp0 = jax.lax.stop_gradient(logp)
  g = jax.grad(lambda l: jnp.sum(term.surrogate(l, ref_logp, old, mask=mask)))(lp0)
  live = mask.astype(bool) & (lp0 != ref_logp)
  return jnp.sum(live & (g == 0)) / jnp.maximum(jnp.sum(live), 1)


def _position_kl(term: FullKLTerm, stats: logprobs.TokenStats, hidden_btd, unembed_dv,
                 ref: Reference, kl_seed_b, chunk_size: int) -> jax.Array:
  """KL_t [B, N] of a full-vocabulary term, differentiable in the policy: the exact column of
  `stats` (computed with the reference), or the top-k + tail estimate with a key from `kl_seed_b`
  (one seed a row, drawn on the host per step: the minibatch's first row keys its draws)."""
  if term.top_k is None:
    return stats.reverse_kl if term.direction == "reverse" else stats.forward_kl
  key = jax.random.fold_in(jax.random.PRNGKey(0), kl_seed_b[0])
  return term.position_kl(hidden_btd, unembed_dv, ref.hidden_btd, ref.unembed_dv, key=key,
                          chunk_size=chunk_size)


def kl_seeds(config: ml_collections.ConfigDict, step: int, n: int) -> np.ndarray:
  """int32 [n]: one seed per completion for a sampled (top-k) KL term's draws, a function of
  (seed, step) so that a resumed run draws what an uninterrupted one would."""
  return np.random.default_rng([config.seed, step, 7]).integers(0, 2**31 - 1, n, dtype=np.int32)


def _policy_pass(graphdef, params, tokens, attn, sl, targets, *, ref: Reference | None,
                 chunk_size: int):
  """The policy's completion hidden states [B, N, D], its unembedding [D, V] and `token_stats`
  (with the exact KL columns against `ref` when given)."""
  policy = nnx.merge(graphdef, params)
  h = policy.hidden_states(tokens, attention_mask_bt=attn)[0][:, sl]
  unembed = policy.unembedding()
  s = logprobs.token_stats(h, unembed, targets,
                           ref_hidden_btd=None if ref is None else ref.hidden_btd,
                           ref_unembed_dv=None if ref is None else ref.unembed_dv,
                           chunk_size=chunk_size)
  return h, unembed, s


def _kl_loss(term, s, h, unembed, ref, ref_logp, old, mask, batch, *, chunk_size: int,
             on_policy: bool) -> tuple[jax.Array, dict]:
  """The per-token loss [B, N] of a KL term placed in the loss (or over the full distribution),
  and its diagnostics for aux."""
  logp = s.logp
  if term.placement == "full":
    kl_bt = _position_kl(term, s, h, unembed, ref, batch.get("kl_seed"), chunk_size)
    n = jnp.maximum(jnp.sum(mask), 1)
    value = jnp.sum(jnp.where(mask, jax.lax.stop_gradient(kl_bt), 0.0)) / n
    return (term.surrogate(kl_bt, logp, None if on_policy else old, mask=mask),
            {"kl_term_value": value})
  return (term.surrogate(logp, ref_logp, old, mask=mask),
          {"kl_grad_zeroed_fraction": _kl_grad_zeroed_fraction(term, logp, ref_logp, old, mask)})


def _token_aux(s: logprobs.TokenStats, ref_logp, exact: bool) -> dict:
  """The per-token statistics an on-policy loss returns for the metrics (no gradient)."""
  tok = {"logp": s.logp, "entropy": s.entropy}
  if ref_logp is not None:
    tok["ref_logp"] = ref_logp
  if exact:
    tok |= {"rkl": s.reverse_kl, "fkl": s.forward_kl}
  return jax.lax.stop_gradient(tok)


def make_loss_fn(term: KLTerm | FullKLTerm | None, *, graphdef, prompt_len: int, clip_eps_low: float,
                 clip_eps_high: float, dual_clip: float | None, aggregation: str,
                 chunk_size: int, exact_kl: bool, on_policy: bool, with_ref: bool,
                 reward_stage: str = "after_norm", correction=None, correct_kl: bool = True,
                 reward_at: str = "rollout"):
  """The minibatch loss `loss_fn(params, ref_params, beta, batch) -> (loss, aux)`:

    loss = agg(PPO-clip(logp, old_logp, A)) + β · agg(surrogate(logp, ref_logp, old_logp))

  the second part only for a term placed in the loss; `agg` is `aggregation` over the completion
  mask. Off-policy batches carry `old_logp` and `ref_logp` from the statistics pass. On-policy
  (`on_policy`) batches carry neither: the loss runs the reference pass itself, takes
  old_logp = sg(logp) from its own forward pass (ρ ≡ 1, the same gradient) — one policy forward
  per iteration instead of two — subtracts an after-norm in-reward term from the advantages, and
  returns the per-token statistics for the metrics in aux["tokens"].

  `correction` (a `kljax.offpolicy` weights fn; the batch then carries `sampler_logp`, log μ):
  every per-token loss, the PPO-clip one and (with `correct_kl`) the KL term's, is multiplied by
  the detached weight w(π_old/μ) before `agg`, for rollouts sampled by μ ≠ π_old (a "full"
  term's per-position loss too).

  A term over the whole next-token distribution (placement "full", `kljax.full_kl`) adds
  β · agg(surrogate(KL_t, logp, old_logp)) with KL_t the per-position KL from the policy's and the
  reference's hidden states (the reference pass then runs in the loss on- and off-policy; the
  exact KL is the `token_stats` column, a top-k estimate draws its tail from the batch's
  `kl_seed`); off-policy the Rao-Blackwellized term corrects its prefixes with the cumulative
  ratio π_θ/π_old. aux["kl_term_value"] is the token mean of KL_t.

  `reward_at="current"` (an after-norm in-reward term, off-policy): the batch's advantages carry no
  penalty, and the loss subtracts β·c at the current parameters in every minibatch (REWARD_AT)."""
  kl_in_loss = term is not None and term.placement == "loss"
  full = term is not None and term.placement == "full"
  exact_term = full and term.top_k is None
  shape_advantages = ((on_policy or reward_at == "current") and term is not None
                      and term.placement == "reward" and reward_stage == "after_norm")
  ref_in_loss = (on_policy and with_ref) or full
  dual_clip = dual_clip or None

  def loss_fn(params, ref_params, beta, batch):
    tokens, attn, mask = batch["tokens"], batch["attn_mask"], batch["mask"]
    sl, targets = _completion_positions(tokens, prompt_len)
    ref, ref_logp = None, batch.get("ref_logp")
    if ref_in_loss:
      ref = reference_pass(graphdef, ref_params, tokens, attn, prompt_len=prompt_len,
                           chunk_size=chunk_size)
      ref_logp = ref.logp_bt
    # the full-vocabulary KL columns only when logged or when the KL term is one of them
    exact = ref is not None and (exact_kl or exact_term)
    h, unembed, s = _policy_pass(graphdef, params, tokens, attn, sl, targets,
                                 ref=ref if exact else None, chunk_size=chunk_size)
    logp = s.logp
    old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
    advantages = batch["advantages"]
    if shape_advantages:
      advantages = penalized_advantages(term, advantages, beta, logp, old, ref_logp, mask,
                                        reward_at=reward_at)
    pg = losses.ppo_clip_loss(logp, old, advantages, mask, clip_eps_low=clip_eps_low,
                              clip_eps_high=clip_eps_high, dual_clip=dual_clip)
    agg = functools.partial(losses.aggregate, mask_bt=mask, mode=aggregation)
    w = 1.0 if correction is None else correction(old, batch["sampler_logp"], mask).weights_bt
    loss = agg(w * pg.loss_bt)
    n = jnp.maximum(jnp.sum(mask), 1)
    aux = {"clip_fraction": jnp.sum(pg.clipped_bt) / n, "ppo_kl": jnp.sum(pg.ppo_kl_bt) / n}
    if kl_in_loss or full:
      kl_loss_bt, kl_aux = _kl_loss(term, s, h, unembed, ref, ref_logp, old, mask, batch,
                                    chunk_size=chunk_size, on_policy=on_policy)
      loss = loss + beta * agg((w if correct_kl else 1.0) * kl_loss_bt)
      aux |= kl_aux
    if on_policy:
      aux["tokens"] = _token_aux(s, ref_logp if with_ref else None, exact)
    return loss, aux

  return loss_fn


def _norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def update(loss_fn, optimizer: optax.GradientTransformation, params, opt_state, beta, batch,
           ref_params=None):
  """One optimizer step of `loss_fn` (from `make_loss_fn`) on a minibatch; aux gains the loss
  and the l2 norms of the gradient, the update and the new parameters."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref_params, beta, batch)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  aux.update(loss=loss, grad_norm=_norm(grads), update_norm=_norm(updates),
             param_norm=_norm(params))
  return params, opt_state, aux


def compile_fns(setup: Setup) -> dict:
  """The jitted statistics pass and minibatch update of this setup (compiled on first call): the
  config boundary, where every option of the traced functions is read."""
  c = setup.config
  with_ref, on_policy = uses_reference(c), is_on_policy(c)
  stats = jax.jit(functools.partial(completion_stats, setup.graphdef,
                                    prompt_len=c.data.max_prompt_len, chunk_size=c.loss.chunk_size,
                                    with_ref=with_ref, exact_kl=c.metrics.exact_kl))
  loss_fn = make_loss_fn(
      setup.term, graphdef=setup.graphdef, prompt_len=c.data.max_prompt_len,
      clip_eps_low=c.loss.clip_eps_low, clip_eps_high=c.loss.clip_eps_high,
      dual_clip=c.loss.dual_clip, aggregation=c.loss.aggregation, chunk_size=c.loss.chunk_size,
      exact_kl=c.metrics.exact_kl, on_policy=on_policy, with_ref=with_ref,
      reward_stage=c.kl.get("reward_stage", "after_norm"), correction=setup.correction,
      correct_kl=c.rollout.get("correct_kl", True), reward_at=c.kl.get("reward_at", "rollout"))
  # The update donates the parameters and the optimizer state (arguments 0 and 1): no second copy
  # of the train state at the update's peak, and on CPU no fresh pages to fault in each step.
  # Whatever must outlive an update holds its own copy (`sharding.copy_tree`: the reference, the
  # sampler's stale parameters), and a checkpoint written in the background is waited for first.
  return {"stats": stats, "update": jax.jit(functools.partial(update, loss_fn, setup.optimizer),
                                            donate_argnums=(0, 1))}


# ---------------------------------------------------------------- host <-> devices
# Every process computes the same host-side batch (data order and keys are functions of the step),
# so placing it is a slice per local device, and results come back to every host by allgather.


def to_devices(x, sharding_):
  """A global array with `sharding_` from a host value that every process holds in full (an array
  already placed that way is kept as it is, not copied: a large warm start is not held twice)."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding_, x.ndim):
    # Relabelled as `sharding_` (no copy): the jitted update returns NamedShardings, and a
    # function's compilation cache keys on the sharding, so an array placed the same way but
    # labelled otherwise (one device: SingleDeviceSharding) would compile every program twice.
    return x if x.sharding == sharding_ else jax.device_put(x, sharding_)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def tree_to_devices(tree, shardings):
  """`to_devices` over a pytree; `shardings` may be a prefix of it (one sharding per Variable)."""
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: to_devices(x, s), sub), shardings, tree)


def replicate(tree, mesh):
  """Every leaf not already spread over the whole mesh, replicated over it (optimizer counters,
  β, the step): multi-process checkpoints need global arrays."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == mesh.size:
      return to_devices(x, rep) if x.sharding.is_fully_replicated else x
    return to_devices(to_host(x), rep)

  return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-process) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


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
  c = setup.config
  per_step = c.batch_size // c.rollout.group_size
  idx = data_lib.batch_indices(len(setup.source), per_step, step, seed=c.seed)
  examples = [setup.source[i] for i in idx]
  prompts = [c.data.prompt_template.format(**e) for e in examples]
  tokens, mask = text.encode_batch(setup.tokenizer, prompts, add_bos=c.data.add_bos,
                                   length=c.data.max_prompt_len)
  return examples, tokens, mask  # one row a prompt; the group's G rows come from the sampler


def rollout(setup: Setup, params, step: int) -> Rollout:
  """`group_size` completions of each of the step's prompts, sampled by the rollout engine with
  `params` pushed to it (in `rollout.dtype`) and the key fold_in(fold_in(seed, step), 0)."""
  c = setup.config
  examples, unique, unique_mask = _prompts(setup, step)
  g = c.rollout.group_size
  prompt, prompt_mask = np.repeat(unique, g, axis=0), np.repeat(unique_mask, g, axis=0)
  key = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
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
      max_new_tokens=c.rollout.max_new_tokens, eos_id=setup.tokenizer.eos_id,
      pad_id=setup.tokenizer.pad_id, temperature=c.rollout.temperature, top_k=c.rollout.top_k,
      top_p=c.rollout.top_p)
  out = setup.engine.generate(*placed, jax.random.fold_in(key, 0), samples_per_prompt=n,
                              options=options)
  tokens, completion_mask = to_host(out.tokens_bt), to_host(out.completion_mask_bn)
  attn_mask = np.concatenate([prompt_mask, completion_mask], axis=1)
  return Rollout(examples, prompt_mask, tokens, attn_mask, completion_mask, out.logprobs_bn,
                 pushed)


def score(setup: Setup, ro: Rollout) -> rewards.Scores:
  """The reward functions on the decoded completions (each example's fields repeated G times)."""
  c, g = setup.config, setup.config.rollout.group_size
  completions = [setup.tokenizer.decode(row[m]) for row, m in
                 zip(ro.tokens[:, c.data.max_prompt_len:], ro.completion_mask)]
  fields = {k: [e[k] for e in ro.examples for _ in range(g)] for k in ro.examples[0]
            if k != "question"}
  return rewards.score(setup.reward_fns, [e["question"] for e in ro.examples for _ in range(g)],
                       completions, weights=setup.reward_weights, on_error=c.reward.on_error,
                       timeout_s=c.reward.get("timeout_s", 30.0), **fields)


def _reward_stage(setup: Setup) -> str | None:
  """Where the in-reward KL term enters ("after_norm" / "before_norm"), None for other terms."""
  if setup.term is None or setup.term.placement != "reward":
    return None
  return setup.config.kl.get("reward_stage", "after_norm")


def rollout_stats(setup: Setup, fns: dict, state: TrainState, ro: Rollout) -> dict | None:
  """The rollout policy's per-token statistics (`completion_stats`), shared by every update, on
  the host; None on-policy (the update computes them) unless the KL leaves the reward first."""
  if is_on_policy(setup.config) and _reward_stage(setup) != "before_norm":
    return None
  batch_sh = sharding.batch_sharding(setup.mesh)
  stats = fns["stats"](state.params, state.ref_params, to_devices(ro.tokens, batch_sh),
                       to_devices(ro.attn_mask, batch_sh))
  return {k: to_host(v) for k, v in stats.items()}


def advantages(setup: Setup, beta, scores: rewards.Scores, stats: dict | None,
               mask: np.ndarray) -> tuple[adv_lib.GroupAdvantages, np.ndarray]:
  """The group advantages, and the per-token advantages [B, N] the updates see: with an in-reward
  KL term, before the normalization (the reward) or, off-policy, after it (each token); on-policy,
  or with `kl.reward_at="current"`, the update subtracts the after-norm term itself
  (`make_loss_fn`)."""
  c, stage = setup.config, _reward_stage(setup)
  r = scores.total.reshape(-1, c.rollout.group_size)
  if stage == "before_norm":
    r = kl_in_reward(setup.term, r, to_host(beta), stats["logp"], stats["ref_logp"], mask)
  group = adv_lib.group_advantages(c.advantage.estimator)(r)
  seq_adv = np.repeat(np.asarray(group.advantages_pg).reshape(-1, 1), mask.shape[1], axis=1)
  if stage == "after_norm" and not is_on_policy(c) and c.kl.get("reward_at", "rollout") == "rollout":
    seq_adv = to_host(kl_in_advantages(setup.term, seq_adv, to_host(beta), stats["logp"],
                                       stats["ref_logp"], mask))
  return group, seq_adv


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
  c = setup.config
  params, opt_state = state.params, state.opt_state
  n = c.batch_size
  mb = n // c.loss.minibatches
  auxes = []
  for epoch in range(c.loss.epochs):
    order = np.random.default_rng([c.seed, step, epoch]).permutation(n)
    for i in range(c.loss.minibatches):
      idx = np.sort(order[i * mb:(i + 1) * mb])
      sub = {k: to_devices(to_host(v)[idx], sharding.batch_sharding(setup.mesh, np.ndim(v)))
             for k, v in batch.items()}
      params, opt_state, aux = update_fn(params, opt_state, state.beta.beta, sub,
                                         state.ref_params)
      auxes.append(aux)
  jax.block_until_ready((params, auxes))  # dispatch is asynchronous: wait before reading the clock
  return params, opt_state, auxes


# Metrics that compare the policy to the reference: NaN ("absent") when no reference runs
# (kl.term = "none" without metrics.exact_kl), never a false zero.
REFERENCE_METRICS = ("exact_rkl", "exact_fkl", "k1", "k2", "k3", "clamped_tokens",
                     "max_log_ratio", "max_seq_log_ratio")


def _reference_metrics(stats: dict, mask: np.ndarray, tmean, term=None) -> dict:
  """The REFERENCE_METRICS of the rollout policy's per-token statistics (and, for a term that
  clamps its value, e.g. `k3_as_loss+value_clamp`, the tokens its clamp touches)."""
  nan = float("nan")
  out = {"exact_rkl": tmean(stats["rkl"]) if "rkl" in stats else nan,
         "exact_fkl": tmean(stats["fkl"]) if "fkl" in stats else nan}
  if "ref_logp" not in stats:
    return out | {k: nan for k in REFERENCE_METRICS if k not in out}
  lp, ref_lp = stats["logp"], stats["ref_logp"]
  m = np.asarray(mask, np.float32)
  if getattr(term, "count_clamped", None) is not None:
    out["kl_value_clamped_tokens"] = float(term.count_clamped(lp, ref_lp, mask=mask))
  return out | {
      "k1": tmean(est.k1(lp, ref_lp)), "k2": tmean(est.k2(lp, ref_lp)),
      "k3": tmean(est.k3(lp, ref_lp)),
      "clamped_tokens": float(est.count_clamped(lp, ref_lp, mask=mask)),
      # the regime indicators: how far above π_ref the sampled tokens / completions sit (nats)
      "max_log_ratio": float(np.max(np.where(m > 0, lp - ref_lp, 0.0))),
      "max_seq_log_ratio": float(np.max(((lp - ref_lp) * m).sum(1))),
  }


def step_metrics(ro: Rollout, scores: rewards.Scores, group: adv_lib.GroupAdvantages,
                 stats: dict, auxes: list[dict], beta, times: tuple[float, ...],
                 term=None) -> dict:
  """The step's metrics: rewards, lengths, per-token statistics of the rollout policy, the KL to
  the reference, the updates' mean aux, and timings. `times`: (start, rollout done, advantages
  done, updates done) from `time.perf_counter`."""
  m = np.asarray(ro.completion_mask, np.float32)
  ntok = max(m.sum(), 1.0)
  tmean = lambda x: float((to_host(x) * m).sum() / ntok)
  lengths = m.sum(1)
  t0, t_rollout, t_logprobs, t_update = times
  ref = _reference_metrics(stats, ro.completion_mask, tmean, term)
  metrics = {
      "reward_mean": float(scores.total.mean()), "reward_std": float(scores.total.std()),
      # accuracy: completions the first reward function scores above 0
      "accuracy": float(np.mean(list(scores.per_fn.values())[0] > 0)),
      "length_mean": float(lengths.mean()), "length_std": float(lengths.std()),
      "zero_variance_groups": float(group.zero_variance_fraction),
      "entropy": tmean(stats["entropy"]),
      **{k: ref[k] for k in REFERENCE_METRICS[:6]},
      "sampler_logprob_gap": tmean(np.abs(to_host(ro.sampler_logp) - stats["logp"])),
      "beta": float(beta), "reward_failures": float(scores.failures),
      "tokens_hash": tokens_hash(ro.tokens),
      **{k: ref[k] for k in REFERENCE_METRICS[6:]},
      # time_logprobs: rewards, advantages and (off-policy) the statistics pass; on-policy the
      # log-prob passes run inside the update
      "time_rollout": t_rollout - t0, "time_logprobs": t_logprobs - t_rollout,
      "time_update": t_update - t_logprobs,
      "tokens_per_second": float(m.sum()) / max(t_update - t0, 1e-9),
  }
  for k in auxes[0]:
    metrics[k] = float(np.mean([float(a[k]) for a in auxes]))
  metrics["param_norm"] = float(auxes[-1]["param_norm"])  # after the step's last update
  return metrics


def sampler_metrics(setup: Setup, ro: Rollout, old_logp: np.ndarray) -> dict:
  """Sampler → trainer: the ESS of the ratios π_old/μ (token and sequence level), the fraction
  the correction truncated or masked, the mean weight (`kljax.offpolicy.diagnostics`); the mean
  |log μ − log π_old| is `sampler_logprob_gap`."""
  mu, mask = to_host(ro.sampler_logp), ro.completion_mask
  weights = (setup.correction or offpolicy.no_correction)(old_logp, mu, mask)
  return {k: float(v) for k, v in offpolicy.diagnostics(old_logp, mu, mask, weights).items()}


def next_state(setup: Setup, state: TrainState, params, opt_state, kl: float,
               sampled=None) -> TrainState:
  """The state after the step: β updated from the step's k1 estimate `kl` (0 without a
  reference, where β multiplies nothing), the reference reset every `kl.reset_ref_every` steps,
  and with rollout.staleness the step's starting parameters `sampled` (a copy: the update donated
  `state.params`) queued for the sampler."""
  c, step = setup.config, int(state.step)
  # adaptive: n_steps counts samples (Ziegler et al.); a schedule counts GRPO steps
  per_update = c.batch_size if c.kl.controller == "adaptive" else 1
  beta_state = replicate(setup.beta.update(state.beta, jnp.float32(kl), n_steps=per_update),
                         setup.mesh)
  ref_params = state.ref_params
  if c.kl.reset_ref_every and (step + 1) % c.kl.reset_ref_every == 0:
    ref_params = sharding.copy_tree(params)  # the next update donates `params`
  stale = (*state.stale_params[1:], sampled) if state.stale_params else ()
  return TrainState(params, ref_params, opt_state, beta_state, state.step + 1, stale)


def train_step(setup: Setup, state: TrainState, fns: dict, before_update=None
               ) -> tuple[TrainState, dict]:
  """Rollout, score, and `epochs × minibatches` updates. Returns the new state and metrics.
  `before_update()`, if given, runs just before the first update donates `state`'s parameters and
  optimizer state (`train` passes `Checkpointer.wait`: a save in flight still reads them)."""
  step, on_policy = int(state.step), is_on_policy(setup.config)
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
  if getattr(setup.term, "top_k", None) is not None:  # a sampled full-vocabulary KL term
    batch["kl_seed"] = kl_seeds(setup.config, step, len(ro.tokens))
  t_logprobs = time.perf_counter()
  kept = sharding.copy_tree(state.params) if state.stale_params else None  # donated below
  if before_update is not None:
    before_update()
  params, opt_state, auxes = update_epochs(setup, fns["update"], state, batch, step)
  t_update = time.perf_counter()
  if on_policy:  # the statistics of the rollout policy, from the update's own forward pass
    stats = {k: to_host(v) for k, v in auxes[0].pop("tokens").items()}
  metrics = step_metrics(ro, scores, group, stats, auxes, state.beta.beta,
                         (t0, t_rollout, t_logprobs, t_update), term=setup.term)
  metrics |= sampler_metrics(setup, ro, stats["logp"]) | ro.engine_metrics
  kl = metrics["k1"] if uses_reference(setup.config) else 0.0
  return next_state(setup, state, params, opt_state, kl, kept), metrics


# ---------------------------------------------------------------- the loop


class NonFiniteError(FloatingPointError):
  """A loss, gradient or metric became NaN or infinite; the checkpoints on disk are kept."""


_SUSPECT_STEPS = 3  # non-finite this soon after a restore: suspect the restored state first


def train(config: ml_collections.ConfigDict, workdir: str, *, init_model=None,
          progress: bool = True, bar_options: dict | None = None) -> list[dict]:
  """Runs (or resumes) a GRPO run in `workdir`; returns the metrics of the steps it ran.
  `bar_options`: extra `tqdm` arguments for the progress bar (e.g. `desc`, `leave`, `position`).

  `workdir` may be local or a URL (gs://bucket/run) that every process reaches: process 0 holds
  its run lock throughout (a second run on it raises `runlock.RunLockedError`) and writes the
  metrics; every process writes its checkpoint shards there. Resumes from the newest checkpoint
  that verifies, and saves asynchronously. With several processes, process 0 prepares the dataset
  while the others wait. Raises `NonFiniteError` on a non-finite metric and `CheckpointError`
  when no checkpoint verifies or a save fails."""
  from kljax.progress import bar as tqdm  # log lines when not on a terminal

  validate(config, workdir)
  with contextlib.ExitStack() as stack:
    run = _open_run(stack, config, workdir, init_model)
    del init_model  # restored, the run holds its own arrays: a caller that let go frees these
    setup, state, ckpt, writer, notes = run.setup, run.state, run.ckpt, run.writer, run.notes
    fns = compile_fns(setup)
    # Activations keep their batch sharding inside the model (`sharding.constrain_batch`).
    stack.enter_context(jax.set_mesh(setup.mesh))
    # NaN by design: the exact KL when not logged, every reference metric without a reference
    absent = ("exact_rkl", "exact_fkl") if uses_reference(config) else REFERENCE_METRICS
    history = []
    bar = tqdm(range(run.start, config.num_steps), initial=run.start, total=config.num_steps,
               **({"desc": "grpo", "unit": "step"} | (bar_options or {})),
               disable=not (progress and jax.process_index() == 0))
    stop = stack.enter_context(preempt.on_signals(config.get("stop_grace_s", 25.0)))
    first_norm, norm_said = None, False  # the parameter norm after this process's first step
    for step in bar:
      state, metrics = train_step(setup, state, fns, before_update=ckpt.wait)
      bad = [k for k, v in metrics.items() if not math.isfinite(v) and k not in absent]
      if bad:
        raise NonFiniteError(_non_finite_message(step, bad, ckpt, run.restored_step))
      _check_reward_failures(step, metrics, config, len(setup.reward_fns))
      first_norm = first_norm or metrics["param_norm"]
      if metrics["param_norm"] > NORM_GROWTH_SAID * first_norm and not norm_said:
        norm_said = True
        warn_once(f"the parameter norm grew from {first_norm:.4g} to {metrics['param_norm']:.4g} "
                  f"by step {step}: optim.learning_rate={config.optim.learning_rate:g} is likely "
                  f"too large for this model.")
      metrics |= notes
      notes = {}
      if writer is not None:
        writer.write(step, metrics)
      history.append({"step": step, **metrics})
      bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['exact_rkl']:.4f}")
      last = step + 1 == config.num_steps
      signum = None if last else preempt.agreed(stop)
      if writer is not None and (last or signum or (step + 1) % config.checkpoint_every == 0):
        writer.sync()  # object stores: the metrics of every step the checkpoint holds, first
      ckpt.maybe_save(step + 1, state, force=last or signum is not None)
      if signum is not None:
        bar.close()
        raise _stopped(signum, step + 1, ckpt)
  return history


NORM_GROWTH_SAID = 10.0  # a warning once the parameter norm is this many times its first value
REWARD_FAILURES_SAID = 0.25  # reward.on_error="zero": the console says so above this share


def _check_reward_failures(step: int, metrics: dict, config, n_fns: int) -> None:
  """With reward.on_error="zero": one console line a step when a large share of the samples'
  rewards failed (scored 0), and a RewardError, before the step is written or checkpointed, when
  every one did (GRPO would train on a constant)."""
  failed, total = int(metrics.get("reward_failures", 0)), config.batch_size * n_fns
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


def _open_run(stack: contextlib.ExitStack, config, workdir, init_model) -> _Run:
  """Takes the run lock (process 0), prepares the dataset, builds the setup and restores the
  newest checkpoint that verifies; what must be closed is registered on `stack`."""
  leader = jax.process_index() == 0
  with multihost.leader_first("to take the run lock"):
    if leader:
      stack.enter_context(runlock.hold(workdir))
  _check_shared(workdir)
  changes = check_resume(config, workdir)
  with multihost.leader_first("to prepare the dataset"):
    check_prompt_lengths(config)  # reads the train split: prepares it on first use
  setup, state = build(config, init_model)
  stack.callback(close_engine, setup)
  ckpt = Checkpointer(workdir, every=config.checkpoint_every)
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
      record_config(config, workdir, changes, start)
    notes["resumed_with_config_changes"] = float(len(changes))
  if changes and leader:
    print(f"kljax: resuming {workdir} from step {start} with a changed config "
          f"(resume_changed=True): "
          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
          file=sys.stderr, flush=True)
  writer = MetricsWriter(workdir, resume_step=start - 1, tensorboard=config.metrics.tensorboard,
                         **_wandb_options(config)) if leader else None
  if writer is not None:
    stack.callback(writer.close)
  return _Run(setup, state, ckpt, writer, start, start if restored is not None else None, notes)


def _abstract_for_restore(state: TrainState) -> TrainState:
  """The state's shapes, dtypes and shardings, its own arrays freed: a restore replaces them, and
  holding both would peak at two train states (the arrays given to `build`, the reference and the
  stale parameters, are the caller's and stay)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  for x in jax.tree.leaves((state.params, state.opt_state)):
    x.delete()
  return abstract


def _check_shared(workdir) -> None:
  """With several processes: each sees the lock process 0 holds, i.e. all reach the same run
  directory, as orbax's multi-process checkpoints need (a local --workdir on each host would give
  each host a part of every checkpoint)."""
  if jax.process_count() == 1:
    return
  lock = paths.resolve(workdir) / runlock.LOCK_FILE
  seen = lock.exists()
  from jax.experimental import multihost_utils

  if not np.all(multihost_utils.process_allgather(np.int32(seen))):
    raise ConfigError(
        f"--workdir: {workdir} is not shared: "
        + ("this process" if not seen else "another process")
        + f" does not see {lock}, which process 0 holds. Every process must reach the same run "
        "directory: shared storage such as gs://BUCKET/RUN, or a network filesystem.")


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
