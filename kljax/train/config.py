"""Default GRPO configuration (every option, documented), shared by configs/ and the reproduction.

Config files under configs/ start from `grpo_tiny()` and change what their setting needs.

Each field's trailing comment is its one-line meaning: `--help` of the entry points prints it
beside the field's default (`kljax.cli.field_docs` reads this file), so every field has one.
"""

import ml_collections


def grpo_tiny() -> ml_collections.ConfigDict:
  """Every GRPO option with its default: the tiny-preset arithmetic run of configs/grpo_tiny.py."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # model init, sampling keys and data order are functions of (seed, step)
  c.num_steps = 300  # GRPO steps (one rollout batch each)
  c.batch_size = 64  # completions a step = prompts × group_size
  c.checkpoint_every = 50  # steps between checkpoints (and the last step always)
  # SIGTERM/SIGINT/SIGHUP: finish the step, save and verify its checkpoint, exit 128 + signal
  # A run directory belongs to one config: a resume that changes a field of the trajectory stops
  c.resume_changed = False  # True: continue a run under changed fields on purpose (recorded)
  c.stop_grace_s = 25.0  # seconds a stop signal leaves for that before exiting unsaved (0: no limit)

  c.data = ml_collections.ConfigDict()
  c.data.name = "arithmetic/level1"  # arithmetic/levelN, countdown/nK, gsm8k or openr1_math
  c.data.data_dir = "~/.cache/kljax/tfds"  # TFDS data directory (prepared on first use)
  c.data.manual_dir = ""  # source files of gsm8k / openr1_math (empty: download when preparing)
  c.data.max_prompt_len = 8  # prompt tokens with <bos>; a longer prompt is an error before training
  c.data.prompt_template = "{question}"  # formatted with the example's fields
  c.data.add_bos = True  # prepend the tokenizer's <bos> to each prompt

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # model size preset (kljax.models), used without model.init
  c.model.init = ""  # an HF checkpoint directory; empty: SFT warm start below
  c.model.tokenizer = ""  # a tokenizer.json (or its directory); empty: the built-in CharTokenizer
  c.model.dtype = "float32"  # compute dtype when loading model.init
  c.model.param_dtype = "float32"  # parameter dtype when loading model.init
  c.model.remat = False  # rematerialize blocks in the backward pass (large models)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 200  # supervised warm-start steps (no model.init; cached in WORKDIR/sft)
  c.sft.batch_size = 64  # sequences a warm-start step
  c.sft.learning_rate = 3e-3  # peak learning rate of the warm start
  _rollout_and_loss(c)
  _kl_and_optimizer(c)
  return c


def _rollout_and_loss(c: ml_collections.ConfigDict) -> None:
  """The rollout, reward, advantage and loss sections."""
  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 8  # completions sampled per prompt (G); advantages compare within a group
  c.rollout.max_new_tokens = 4  # completion length limit, with <eos>
  # A temperature != 1, top_k or top_p < 1 sample from μ != π (see rollout.correction below).
  c.rollout.temperature = 1.0  # sampling temperature (1: the policy's own distribution)
  c.rollout.top_k = 0  # sample among the k likeliest tokens (0: all)
  c.rollout.top_p = 1.0  # nucleus sampling mass (1: all)
  # Three policies (kljax/offpolicy.py): the sampler μ may differ from π_old, the trainer's policy.
  c.rollout.staleness = 0  # k >= 0: sample with the parameters of k steps ago (async rollouts)
  c.rollout.dtype = "float32"  # "float32": the trainer's model as is; "bfloat16": a bf16 copy
  c.rollout.correction = "none"  # none | tis_token | tis_sequence | mis_token | mis_sequence
  c.rollout.correction_cap = 2.0  # C > 1: truncate at C (tis), keep ratios in [1/C, C] (mis)
  c.rollout.correct_kl = True  # weight a loss-placed KL term too (False: the policy gradient only)
  # vllm: vLLM's offline engine in this process, weights pushed every step and checked against
  # the trainer's maths (kljax/rollout/vllm_engine.py); jax runs on the trainer's mesh.
  c.rollout.engine = "jax"  # who samples: "jax" (kljax's KV-cache sampler) or "vllm"
  c.rollout.vllm_kv_cache_gb = 0.0  # vLLM's KV cache in GiB (0: sized to one step's batch)
  c.rollout.sync_tolerance = 0.0  # vLLM sync check allowance, mean |Δ log p| (0: the dtype's own)

  c.reward = ml_collections.ConfigDict()
  c.reward.fns = ("numeric_match",)  # built-in names or "module:function" (command line: a,b)
  c.reward.weights = (1.0,)  # one weight a reward function (command line: 1.0,0.1)
  c.reward.on_error = "raise"  # or "zero": score a failing sample 0 and count it
  c.reward.timeout_s = 30.0  # seconds a reward function may take on a step's batch (0: no limit)

  c.advantage = ml_collections.ConfigDict()
  c.advantage.estimator = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp_baseline

  c.loss = ml_collections.ConfigDict()
  c.loss.clip_eps_low = 0.2  # PPO clip: ratios below 1 − ε_low stop the gradient
  c.loss.clip_eps_high = 0.28  # PPO clip: ratios above 1 + ε_high stop the gradient
  c.loss.dual_clip = 3.0  # dual-clip bound c on negative advantages; 0 disables
  c.loss.aggregation = "token-mean"  # token-mean, seq-mean-token-mean, seq-mean-token-sum[-norm]
  c.loss.epochs = 1  # > 1 (or minibatches > 1) makes the updates off-policy
  c.loss.minibatches = 1  # optimizer updates an epoch, each on batch_size / minibatches
  c.loss.chunk_size = 256  # tokens a log-prob chunk (peak memory ≈ chunk × vocab × 4 B × a few)


def _kl_and_optimizer(c: ml_collections.ConfigDict) -> None:
  """The KL, optimizer, mesh and metrics sections."""
  c.kl = ml_collections.ConfigDict()
  c.kl.term = "k2_as_loss"  # any kljax.kl_term_names(), or "none"
  c.kl.beta = 0.05  # KL coefficient β (the start value for a controller)
  # in-reward terms only: "after_norm" subtracts β·c_t per token after the group normalization
  # (exact Thm 5.1; OpenRLHF's order), "before_norm" subtracts β·Σ_t k_t from the reward before it
  # (verl's order: β/σ_g, whole-sequence credit). The maths: train/objective.py, REWARD_STAGES.
  c.kl.reward_stage = "after_norm"  # in-reward terms: after_norm (exact Thm 5.1), before_norm
  # in-reward terms off-policy (epochs or minibatches > 1): "rollout" computes the penalty once
  # from π_old and holds it over every epoch (verl's way; k1 then follows ∇RKL − ∇KL(π‖π_old)),
  # "current" recomputes it at the current parameters in every minibatch (one token: ∇RKL; token
  # credit: each position's ∇RKL, prefixes from π_old; reward-to-go stays biased off-policy).
  c.kl.reward_at = "rollout"  # off-policy k1: rollout ∇RKL − ∇KL(π‖π_old) | current ∇RKL per token
  c.kl.controller = "constant"  # "linear_warmup" (0 -> beta over kl.warmup_steps), or "adaptive"
  c.kl.warmup_steps = 0  # steps of linear_warmup
  c.kl.target_kl = 0.05  # adaptive: the per-token KL (k1) that β steers towards
  c.kl.horizon = 10_000.0  # adaptive: samples over which β may change by a factor ~(1 ± 0.2)
  c.kl.reset_ref_every = 0  # > 0: the reference becomes the current policy every N steps

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4  # peak AdamW rate; 3e-3 collapses the tiny policy within 10 steps
  c.optim.warmup_steps = 3  # linear warmup steps before the cosine decay
  c.optim.final_lr_fraction = 0.1  # the cosine ends at learning_rate × this
  c.optim.b1 = 0.9  # AdamW β1
  c.optim.b2 = 0.99  # AdamW β2
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
  c.optim.grad_clip = 1.0  # global gradient-norm clip

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1: the devices left)
  c.mesh.fsdp = 1  # fully sharded data-parallel axis size (parameters sharded)
  c.mesh.tensor = 1  # tensor-parallel axis size
  c.mesh.devices = 0  # 0: all devices; N: the first N
  # `python -m experiments.plan --embedding_split vocab|embed` compares the two splits' memory.
  c.mesh.embedding_split = "auto"  # vocab | embed | auto: the embedding dimension fsdp splits

  c.metrics = ml_collections.ConfigDict()
  c.metrics.exact_kl = True  # log the exact full-vocabulary KL(π‖π_ref), KL(π_ref‖π) per token
  c.metrics.tensorboard = True  # also write WORKDIR/tensorboard event files
  c.metrics.wandb = False  # also log to Weights & Biases (pip install 'kljax[wandb]')
  c.metrics.wandb_project = "kljax"  # the W&B project of the run
  c.metrics.wandb_mode = "offline"  # offline: files in WORKDIR/wandb (`wandb sync` them); online


def get_config() -> ml_collections.ConfigDict:
  """`grpo_tiny()`: this file is the `--config` default of `kljax-grpo` where the current directory
  holds no configs/grpo_tiny.py (an installed package, run from anywhere)."""
  return grpo_tiny()
