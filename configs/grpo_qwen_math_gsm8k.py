"""GRPO of Qwen2.5-Math-1.5B on GSM8K, the paper's setting (Liu et al. 2025: β = 0.5), on a TPU pod.

Get the checkpoint once (any machine with Hub access), then copy it where every host can read it:

  huggingface-cli download Qwen/Qwen2.5-Math-1.5B --local-dir /data/qwen2.5-math-1.5b

Launch on every host of a TPU pod slice (e.g. v5e-32, 8 hosts), the same command on each:

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd kljax && \\
    python -m experiments.grpo --distributed --config configs/grpo_qwen_math_gsm8k.py \\
      --workdir gs://$BUCKET/runs/qwen_k2 --config.kl.term=k2_as_loss"

`--distributed` calls `jax.distributed.initialize()`, which discovers the pod's hosts itself; the mesh
below puts every chip on `fsdp` (parameters, gradients and optimizer state are split over all of
them, and so is the batch). On a single GPU or TPU VM, drop `--distributed`.

Planned for a TPU v5e-32 slice (32 chips × 16 GiB). The memory plan of this config's shapes (the
update's batch is 512 / 4 minibatches = 128 completions; the rollout samples all 512):

  python -m experiments.plan --preset qwen2.5-math-1.5b --devices 32 --fsdp 32 --batch 128 \
      --rollout_batch 512 --prompt_len 384 --new_tokens 1024 --remat \
      --embedding_split vocab --json experiments/results/plan/grpo_qwen_math_gsm8k_v5e-32.json

printed, per chip: parameters 0.18 GiB, optimizer 0.36 GiB, reference 0.18 GiB, gradients 0.18 GiB,
KV cache 0.60 GiB, update temporaries 5.18 GiB, sampler temporaries 5.01 GiB; the update donates
0.54 GiB (parameters and optimizer state, updated in place); peak 5.90 GiB (fits
v5e's 16 GiB). Temporaries are XLA:CPU's compiled estimate on 32 simulated devices, not a TPU
measurement: the plan leaves more than half of each chip free as headroom. The embedding's rows are
split over the chips (`mesh.embedding_split = "vocab"`): with the split `auto` picks for an update
this large (the embedding dimension) the same plan prints 6.57 GiB, the sampler's temporaries
growing 5.01 → 5.85 GiB.

The paper's own prompts (OpenR1-Math-220k) are in configs/grpo_qwen_math_openr1.py.
"""

import ml_collections

from configs import grpo_tiny


def get_config() -> ml_collections.ConfigDict:
  c = grpo_tiny.get_config()
  c.num_steps = 500
  c.batch_size = 512  # 64 prompts × 8 completions
  c.checkpoint_every = 25

  c.data.name = "gsm8k"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.max_prompt_len = 384
  c.data.add_bos = False
  c.data.prompt_template = (
      "<|im_start|>system\nPlease reason step by step, and put your final answer within "
      "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")

  c.model.init = "/data/qwen2.5-math-1.5b"
  c.model.tokenizer = "/data/qwen2.5-math-1.5b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True

  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 1024
  c.rollout.temperature = 1.0

  c.reward.fns = ("numeric_match", "boxed_format")
  c.reward.weights = (1.0, 0.1)

  c.loss.minibatches = 4  # 4 updates per rollout batch: off-policy after the first
  c.loss.chunk_size = 1024

  c.kl.term = "k2_as_loss"
  c.kl.beta = 0.5

  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.01

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.mesh.embedding_split = "vocab"  # the plan's smaller peak on v5e-32 (see above)
  return c
