"""Default GRPO configuration (every option, documented), shared by configs/ and the reproduction.

Config files under configs/ start from `grpo_tiny()` and change what their setting needs.
"""

import ml_collections


def grpo_tiny() -> ml_collections.ConfigDict:
  """Every GRPO option with its default: the tiny-preset arithmetic run of configs/grpo_tiny.py."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 300
  c.batch_size = 64  # completions a step = prompts × group_size
  c.checkpoint_every = 50

  c.data = ml_collections.ConfigDict()
  c.data.name = "arithmetic/level1"
  c.data.data_dir = "~/.cache/kljax/tfds"
  c.data.manual_dir = ""  # source files of gsm8k / openr1_math (empty: download when preparing)
  c.data.max_prompt_len = 8
  c.data.prompt_template = "{question}"  # formatted with the example's fields
  c.data.add_bos = True

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"
  c.model.init = ""  # an HF checkpoint directory; empty: SFT warm start below
  c.model.tokenizer = ""  # a tokenizer.json (or its directory); empty: the built-in CharTokenizer
  c.model.dtype = "float32"  # compute dtype when loading model.init
  c.model.param_dtype = "float32"
  c.model.remat = False  # rematerialize blocks in the backward pass (large models)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 200
  c.sft.batch_size = 64
  c.sft.learning_rate = 3e-3

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 4
  c.rollout.temperature = 1.0
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0
  # Three policies (kljax/offpolicy.py): the sampler μ may differ from π_old, the trainer's policy.
  c.rollout.staleness = 0  # k >= 0: sample with the parameters of k steps ago (async rollouts)
  c.rollout.dtype = "float32"  # "float32": the trainer's model as is; "bfloat16": a bf16 copy
  c.rollout.correction = "none"  # none | tis_token | tis_sequence | mis_token | mis_sequence
  c.rollout.correction_cap = 2.0  # C > 1: truncate at C (tis), keep ratios in [1/C, C] (mis)
  c.rollout.correct_kl = True  # weight a loss-placed KL term too (False: the policy gradient only)

  c.reward = ml_collections.ConfigDict()
  c.reward.fns = "numeric_match"  # comma-separated: built-in names or "module:function"
  c.reward.weights = "1.0"
  c.reward.on_error = "raise"  # or "zero": score a failing sample 0 and count it

  c.advantage = ml_collections.ConfigDict()
  c.advantage.estimator = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp_baseline

  c.loss = ml_collections.ConfigDict()
  c.loss.clip_eps_low = 0.2
  c.loss.clip_eps_high = 0.28
  c.loss.dual_clip = 3.0  # 0 disables
  c.loss.aggregation = "token-mean"
  c.loss.epochs = 1  # > 1 (or minibatches > 1) makes the updates off-policy
  c.loss.minibatches = 1
  c.loss.chunk_size = 256

  c.kl = ml_collections.ConfigDict()
  c.kl.term = "k2_as_loss"  # any kljax.kl_term_names(), or "none"
  c.kl.beta = 0.05
  # in-reward terms only: "after_norm" subtracts β·c_t per token after the group normalization
  # (exact Thm 5.1; OpenRLHF's order), "before_norm" subtracts β·Σ_t k_t from the reward before it
  # (verl's order: β/σ_g, whole-sequence credit). The maths: kljax/train/grpo.py, REWARD_STAGES.
  c.kl.reward_stage = "after_norm"
  c.kl.controller = "constant"  # "linear_warmup" (0 -> beta over kl.warmup_steps), or "adaptive"
  c.kl.warmup_steps = 0
  c.kl.target_kl = 0.05
  c.kl.horizon = 10_000.0
  c.kl.reset_ref_every = 0  # > 0: the reference becomes the current policy every N steps

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4  # 3e-3 collapses the tiny policy within 10 steps
  c.optim.warmup_steps = 3
  c.optim.final_lr_fraction = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.devices = 0  # 0: all devices; N: the first N

  c.metrics = ml_collections.ConfigDict()
  c.metrics.exact_kl = True
  c.metrics.tensorboard = True
  return c
