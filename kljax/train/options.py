"""A validated GRPO config, turned once into the frozen, explicit options the trainer's stages read.

`train.validate.validate` checks a config (an `ml_collections.ConfigDict` with the fields of
`train/config.py`) and returns `Options.of(config)`. From there no stage reads the config: each
reads the typed field it needs, lists are tuples, and a field a config lacks takes its default
from `train/config.py`, the one place defaults live (`with_defaults`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import ml_collections

from kljax.full_kl import FullKLTerm
from kljax.kl import KLTerm, kl_term
from kljax.train import config as defaults


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is compiled."""


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field of `train/config.py` that it lacks added at its default (a config
  built by hand, or recorded by an older kljax); the given fields are kept as they are."""
  full = defaults.grpo_tiny()
  _merge(full, config)
  return full


def _merge(into, given) -> None:
  for key, value in given.items():
    if hasattr(value, "items") and hasattr(into.get(key), "items"):
      _merge(into[key], value)
    else:
      _set(into, key, value)


def _set(node, key, value) -> None:
  """`node[key] = value`, also where the value's type is not the default's (a comma string where
  the default is a tuple: `as_names` reads both)."""
  try:
    node[key] = value
  except TypeError:
    del node[key]
    node[key] = value


def as_names(value) -> tuple[str, ...]:
  """A list field as a tuple of names: a sequence, a comma string ("a,b"), or a sequence whose
  items hold commas (`--config.reward.fns=a,b` gives ("a,b",))."""
  items = value.split(",") if isinstance(value, str) else list(value)
  return tuple(s.strip() for item in items for s in str(item).split(",") if s.strip())


def as_numbers(value) -> tuple[float, ...]:
  """A list of numbers: a sequence or a comma string ("1.0,0.1"). ValueError names a bad item."""
  items = as_names(value) if isinstance(value, str) else tuple(value)
  return tuple(float(w) for w in items)


@dataclasses.dataclass(frozen=True)
class DataOptions:
  name: str
  data_dir: str
  manual_dir: str | None
  prompt_template: str
  max_prompt_len: int
  add_bos: bool
  tokenizer: str  # model.tokenizer: a tokenizer.json path, "" for the built-in one


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
  group_size: int
  prompts_per_step: int  # batch_size / group_size
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  staleness: int
  dtype: str
  correction: str
  correction_cap: float
  correct_kl: bool
  engine: str
  vllm_kv_cache_gb: float
  sync_tolerance: float


@dataclasses.dataclass(frozen=True)
class RewardOptions:
  fns: tuple[str, ...]
  weights: tuple[float, ...]
  on_error: str
  timeout_s: float


@dataclasses.dataclass(frozen=True)
class UpdateOptions:
  """The PPO-clip loss and how a step's batch is split into updates."""
  epochs: int
  minibatches: int
  clip_eps_low: float
  clip_eps_high: float
  dual_clip: float | None  # None: off
  aggregation: str
  chunk_size: int
  advantage: str  # advantage.estimator

  @property
  def on_policy(self) -> bool:
    """One epoch of one minibatch: every update sees the rollout policy itself (ρ ≡ 1), so the
    update takes its log-probs from its own forward pass and no statistics pass runs before it.
    More epochs or minibatches make the later updates off-policy."""
    return self.epochs == 1 and self.minibatches == 1


@dataclasses.dataclass(frozen=True)
class KLOptions:
  term: str  # a kljax.kl_term name, or "none"
  beta: float
  reward_stage: str
  reward_at: str
  controller: str
  warmup_steps: int
  target_kl: float
  horizon: float
  reset_ref_every: int


@dataclasses.dataclass(frozen=True)
class OptimOptions:
  learning_rate: float
  warmup_steps: int
  final_lr_fraction: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class MeshOptions:
  data: int
  fsdp: int
  tensor: int
  devices: int
  embedding_split: str


@dataclasses.dataclass(frozen=True)
class MetricsOptions:
  exact_kl: bool
  tensorboard: bool
  wandb: bool
  wandb_project: str
  wandb_mode: str


@dataclasses.dataclass(frozen=True)
class Options:
  """What a GRPO run's stages read, built once from a validated config (`Options.of`)."""
  seed: int
  num_steps: int
  batch_size: int
  checkpoint_every: int
  stop_grace_s: float
  model_preset: str  # model.preset: the random init's size, without model.init
  data: DataOptions
  rollout: RolloutOptions
  reward: RewardOptions
  update: UpdateOptions
  kl: KLOptions
  optim: OptimOptions
  mesh: MeshOptions
  metrics: MetricsOptions
  # parsed once at the config boundary: the KL term of kl.term (None for "none") and the device
  # mesh of `mesh` (None: `validate.make_mesh` builds it)
  term: KLTerm | FullKLTerm | None = None
  device_mesh: jax.sharding.Mesh | None = None
  # the validated config itself (every field, defaults filled in): what the run directory records
  # (config.json, a resume's comparison) and W&B shows; no stage reads it
  config: ml_collections.ConfigDict | None = dataclasses.field(default=None, compare=False,
                                                                 repr=False)

  @property
  def uses_reference(self) -> bool:
    """The reference model runs when a KL term needs it or the exact KL is logged; without it the
    metrics that compare the policy to the reference are absent (NaN)."""
    return self.kl.term != "none" or self.metrics.exact_kl

  @property
  def max_len(self) -> int:
    """Tokens of a sequence: the prompt and the completion."""
    return self.data.max_prompt_len + self.rollout.max_new_tokens

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, *, term=None, device_mesh=None) -> Options:
    """The options of `config` (fields it lacks at their defaults); assumes it is valid. `term`:
    the parsed kl.term when the caller has it (`validate`), else parsed here."""
    c = with_defaults(config)
    _set(c.reward, "fns", as_names(c.reward.fns))  # what config.json records: the lists as lists
    _set(c.reward, "weights", as_numbers(c.reward.weights))
    if term is None and c.kl.term != "none":
      term = kl_term(c.kl.term, clip_eps_low=c.loss.clip_eps_low,
                     clip_eps_high=c.loss.clip_eps_high)
    return cls(
        seed=int(c.seed), num_steps=int(c.num_steps), batch_size=int(c.batch_size),
        checkpoint_every=int(c.checkpoint_every), stop_grace_s=float(c.stop_grace_s),
        model_preset=c.model.preset,
        data=DataOptions(c.data.name, c.data.data_dir, c.data.manual_dir or None,
                         c.data.prompt_template, int(c.data.max_prompt_len), bool(c.data.add_bos),
                         c.model.tokenizer),
        rollout=_rollout(c), reward=_reward(c), update=_update(c),
        kl=KLOptions(c.kl.term, float(c.kl.beta), c.kl.reward_stage, c.kl.reward_at,
                     c.kl.controller, int(c.kl.warmup_steps), float(c.kl.target_kl),
                     float(c.kl.horizon), int(c.kl.reset_ref_every)),
        optim=OptimOptions(**{k: c.optim[k] for k in _fields(OptimOptions)}),
        mesh=MeshOptions(**{k: c.mesh[k] for k in _fields(MeshOptions)}),
        metrics=MetricsOptions(**{k: c.metrics[k] for k in _fields(MetricsOptions)}),
        term=term, device_mesh=device_mesh, config=c)


def _fields(cls) -> Sequence[str]:
  return [f.name for f in dataclasses.fields(cls)]


def _rollout(c) -> RolloutOptions:
  r = c.rollout
  return RolloutOptions(
      group_size=int(r.group_size), prompts_per_step=int(c.batch_size) // int(r.group_size),
      max_new_tokens=int(r.max_new_tokens), temperature=r.temperature, top_k=int(r.top_k),
      top_p=r.top_p, staleness=int(r.staleness), dtype=r.dtype, correction=r.correction,
      correction_cap=r.correction_cap, correct_kl=bool(r.correct_kl), engine=r.engine,
      vllm_kv_cache_gb=r.vllm_kv_cache_gb, sync_tolerance=r.sync_tolerance)


def _reward(c) -> RewardOptions:
  return RewardOptions(as_names(c.reward.fns), as_numbers(c.reward.weights), c.reward.on_error,
                       c.reward.timeout_s)


def _update(c) -> UpdateOptions:
  loss = c.loss
  return UpdateOptions(
      epochs=int(loss.epochs), minibatches=int(loss.minibatches), clip_eps_low=loss.clip_eps_low,
      clip_eps_high=loss.clip_eps_high, dual_clip=loss.dual_clip or None,
      aggregation=loss.aggregation, chunk_size=int(loss.chunk_size),
      advantage=c.advantage.estimator)
