"""The paper's setting (Liu et al. 2025, arXiv:2510.01555): GRPO of Qwen2.5-Math-1.5B on
OpenR1-Math-220k prompts, β = 0.5, on a TPU pod. Everything else as configs/grpo_qwen_math_gsm8k.py.

Get the checkpoint and the data once (any machine with Hub access), then copy them where every host
can read them:

  huggingface-cli download Qwen/Qwen2.5-Math-1.5B --local-dir /data/qwen2.5-math-1.5b
  huggingface-cli download open-r1/OpenR1-Math-220k --repo-type dataset --include "data/*" \
      --local-dir /data/openr1
  pip install 'kljax[openr1]'   # pyarrow, to read the parquet files

Launch on every host of a TPU pod slice, the same command on each (one run per KL choice):

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd kljax && \\
    python -m experiments.grpo --distributed --config configs/grpo_qwen_math_openr1.py \\
      --workdir gs://$BUCKET/runs/openr1_k2 --config.kl.term=k2_as_loss"

Planned for a TPU v5e-32 slice (32 chips × 16 GiB), like the GSM8K config but with 512-token prompts:

  python -m experiments.plan --preset qwen2.5-math-1.5b --devices 32 --fsdp 32 --batch 128 \
      --rollout_batch 512 --prompt_len 512 --new_tokens 1024 --remat \
      --embedding_split vocab --json experiments/results/plan/grpo_qwen_math_openr1_v5e-32.json

printed, per chip: parameters 0.18 GiB, optimizer 0.36 GiB, reference 0.18 GiB, gradients 0.18 GiB,
KV cache 0.66 GiB, update temporaries 5.28 GiB, sampler temporaries 6.23 GiB; the update donates
0.54 GiB (parameters and optimizer state, updated in place); peak 6.95 GiB (fits
v5e's 16 GiB; XLA:CPU's compiled estimate, not a TPU measurement).

The `openr1_math` dataset keeps the problems whose reference answer is a number (so the exact
numeric reward can check them) and holds out 2% as `test`; it is prepared on first use from
`data.manual_dir`.
"""

import ml_collections

from configs import grpo_qwen_math_gsm8k


def get_config() -> ml_collections.ConfigDict:
  c = grpo_qwen_math_gsm8k.get_config()
  c.data.name = "openr1_math"
  c.data.manual_dir = "/data/openr1/data"
  c.data.max_prompt_len = 512
  c.kl.beta = 0.5
  return c
