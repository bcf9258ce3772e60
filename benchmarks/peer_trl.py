"""TRL's side of `benchmarks/vs_peers.py`: TRL 1.16's `GRPOTrainer` and Hugging Face `generate` at a
real Qwen2 shape, in this process.

  python benchmarks/peer_trl.py [--preset qwen2.5-0.5b] [--layers L] [--iters N]

Prints one JSON line (the last line of stdout). The model is a randomly initialised
`Qwen2ForCausalLM` of kljax's preset shape (tied embeddings, float32, no gradient checkpointing),
with a word-level tokenizer over the whole vocabulary. A GRPO iteration is TRL's
`training_step` (generation with `model.generate`, the reference model's log-prob pass, loss with
k3 × the live ratio at β = 0.04, backward, AdamW), timed per phase by `vs_trl.time_phases`; the
"update" reported is TRL's reference pass plus the rest of the step after generation, the work
kljax's update does. The sampler baseline is `generate(do_sample=True, top_k=0)` with its KV
cache on the same prompts as the other sides, for exactly `new_tokens` tokens
(`min_new_tokens`). Each figure follows one untimed warm-up iteration.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_kljax import BETA, random_prompts, shape_parser, timed  # noqa: E402


def measure(*, preset: str, layers: int, prompts: int, group: int, prompt_len: int,
            new_tokens: int, iters: int) -> dict:
  import torch
  from datasets import Dataset
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
  from trl import GRPOConfig, GRPOTrainer
  from vs_trl import time_phases

  from kljax import models as kljax_models

  a = torch.randn(2048, 2048)
  a @ a
  peak = 2 * 2048**3 / min(timed(lambda: a @ a)[1] for _ in range(5))
  cfg = kljax_models.preset(preset, dtype="float32", param_dtype="float32")
  cfg = cfg.replace(num_layers=layers) if layers else cfg
  torch.manual_seed(0)
  vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2",
                                      bos_token="t1", unk_token="t3")
  config = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       max_position_embeddings=4096, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                       use_sliding_window=False, torch_dtype="float32")
  model_dir = tempfile.mkdtemp()
  Qwen2ForCausalLM(config).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  ids = random_prompts(cfg.vocab_size, prompts * group, prompt_len)
  dataset = Dataset.from_dict({"prompt": [" ".join(f"t{int(i)}" for i in row) for row in ids] * 16})

  def reward(completions, **_):
    return [float(len(c) % 7) for c in completions]

  timings: list[dict] = []
  trainer = GRPOTrainer(
      model=model_dir, reward_funcs=reward, processing_class=tokenizer, train_dataset=dataset,
      args=GRPOConfig(
          output_dir=tempfile.mkdtemp(), per_device_train_batch_size=prompts * group,
          num_generations=group, max_completion_length=new_tokens, beta=BETA, bf16=False,
          use_cpu=True, gradient_checkpointing=False, max_steps=iters + 1, logging_steps=10**6,
          report_to=[], save_strategy="no", learning_rate=1e-5, temperature=1.0,
          gradient_accumulation_steps=1, disable_dropout=True))
  time_phases(trainer, timings)
  trainer.train()
  hf_model, x = trainer.model, torch.as_tensor(ids)

  def generate():
    with torch.no_grad():
      return hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                               top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)

  generate()
  gen = [timed(generate) for _ in range(iters)]
  steps = timings[1:]  # the first warms up
  return {"iteration_s": [s["total"] for s in steps], "cpu_s": [s["cpu"] for s in steps],
          "rollout_s": [s["generate"] for s in steps],
          "update_s": [s["reference"] + s["update"] for s in steps],
          "sampler_s": [g[1] for g in gen], "sampler_cpu_s": [g[2] for g in gen],
          "sampler_tokens": [prompts * group * new_tokens] * iters,
          "matmul_peak_flops": peak, "layers": cfg.num_layers,
          "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)"}


def main(argv=None) -> None:
  a = shape_parser(__doc__.split("\n")[0]).parse_args(argv)
  print(json.dumps(measure(preset=a.preset, layers=a.layers, prompts=a.prompts, group=a.group,
                           prompt_len=a.prompt_len, new_tokens=a.new_tokens, iters=a.iters)))


if __name__ == "__main__":
  main()
