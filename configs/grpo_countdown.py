"""GRPO on countdown with three numbers (`countdown/n3`: "use 3 4 5 to make 35:" → `(3+4)*5`),
scored by the `countdown` reward, with the tiny preset on CPU: reward about 0.19 -> 0.28 over 400
steps (40-step means) from a 1000-step warm start, in about 4 minutes on 2 CPU cores; reference
output in experiments/results/countdown.

  python -m experiments.grpo --config configs/grpo_countdown.py --workdir /tmp/kljax_countdown

Four numbers: add --config.data.name=countdown/n4 --config.data.max_prompt_len=29
--config.rollout.max_new_tokens=16.
"""

import ml_collections

from kljax.train.config import grpo_tiny


def get_config() -> ml_collections.ConfigDict:
  c = grpo_tiny()
  c.data.name = "countdown/n3"
  c.data.max_prompt_len = 27  # the longest n3 prompt, "use 10 10 10 to make 1000:", with <bos>
  c.rollout.max_new_tokens = 14  # the longest reference answer (12 characters) and EOS, and 1 spare
  c.reward.fns = ("countdown",)
  c.sft.steps = 1000  # reward ≈ 0.2 after the warm start (200 steps: ≈ 0.01, too few to learn from)
  c.num_steps = 400
  c.batch_size = 128  # 16 prompts × 8 completions
  c.optim.learning_rate = 1e-3  # 2e-3 first drops the reward to 0.07
  return c
