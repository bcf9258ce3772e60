"""kljax vs TRL's GRPOTrainer, and kljax's sampler vs Hugging Face `generate`, at qwen2.5-0.5b's shape.

  pip install "trl==1.16.*"
  flock /tmp/kljax-heavy.lock python benchmarks/vs_trl_real.py [--out FILE] [--layers N]

(≈ 7 minutes on 2 CPU cores: one warm-up and `--iters` timed iterations a side.)

Same shape on both sides: Qwen2 with vocabulary 151,936, d 896, 24 layers, 14 heads, 2 KV heads,
MLP 4,864, tied embeddings, randomly initialised, float32 weights and compute on both sides, no
gradient checkpointing, one CPU device (XLA) / the process's threads (PyTorch). GRPO: `--prompts`
(2) prompts × G=4 completions of 32 new tokens after 16-token prompts, β = 0.04 with a reference model (k3 as a loss, TRL's default), one optimizer step
per iteration. Sampler: the same prompts × 32 new tokens, temperature 1, no top-k/top-p, kljax's
`sample` against `model.generate(do_sample=True, top_k=0)` with its KV cache.

The two libraries run one after the other in separate processes (both models with AdamW do not fit
this machine's memory together): first kljax, then TRL, each with one warm-up iteration that is
not timed; each process also measures its own dense float32 matmul peak (2048³). FLOP counts are
analytic: a forward pass is 2·(matmul parameters, the tied unembedding included)·tokens, ×3 for a
forward and backward pass. Targets: GRPO iteration ≤ 0.7× TRL's time, sampler ≥ 1.5× generate's
tokens/s, kljax's update ≥ 50% of the matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Runnable as a script from anywhere, the kljax beside it first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_LEN, NEW_TOKENS, GROUP, BETA = 16, 32, 4, 0.04
PRESET = "qwen2.5-0.5b"


def _shape(args):
  from kljax import models

  cfg = models.preset(args.preset, dtype="float32", param_dtype="float32")
  return cfg.replace(num_layers=args.layers) if args.layers else cfg


def _forward_flops(cfg, tokens: float) -> float:
  matmul_params = cfg.num_params() - (2 * cfg.num_layers + 1) * cfg.d_model  # tied: V·D counted once
  return 2 * matmul_params * tokens


def _prompts(vocab: int, n: int):
  import numpy as np

  return np.random.default_rng(1).integers(4, vocab, (n, PROMPT_LEN))


# ---------------------------------------------------------------- kljax


def _kljax(args) -> dict:
  import jax
  import jax.numpy as jnp

  from kljax import models
  from kljax.sampling import sample
  from kljax.train import grpo
  from kljax.train.config import grpo_tiny

  a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  peak = 2 * 2048**3 / _best(lambda: mm(a, a).block_until_ready(), 5)

  cfg = _shape(args)
  model = models.create(cfg, seed=0)
  c = grpo_tiny()
  c.data.data_dir, c.data.max_prompt_len = args.data_dir, PROMPT_LEN
  c.batch_size, c.rollout.group_size = args.prompts * GROUP, GROUP
  c.rollout.max_new_tokens = NEW_TOKENS
  c.kl.term, c.kl.beta = "k3_as_loss", BETA
  c.num_steps, c.metrics.exact_kl, c.metrics.tensorboard, c.mesh.devices = 10**6, False, False, 1
  setup, state = grpo.build(c, init_model=model)
  fns = grpo.compile_fns(setup)
  iters = []
  with jax.set_mesh(setup.mesh):
    for i in range(args.iters + 1):
      t = time.perf_counter()
      state, m = grpo.train_step(setup, state, fns)
      total = time.perf_counter() - t
      if i:  # the first compiles
        iters.append({"total": total, "rollout": m["time_rollout"],
                      "rewards": m["time_logprobs"], "update+reference": m["time_update"],
                      "length": m["length_mean"]})

  prompt = jnp.asarray(_prompts(cfg.vocab_size, args.prompts * GROUP), jnp.int32)
  mask = jnp.ones_like(prompt, bool)
  run = lambda: sample(model, prompt, mask, jax.random.PRNGKey(0), max_new_tokens=NEW_TOKENS,
                       eos_id=cfg.vocab_size - 1).tokens_bt.block_until_ready()
  run()
  sampler_s = statistics.median(_timed(run) for _ in range(args.sampler_reps))
  return {"peak": peak, "iters": iters, "sampler_s": sampler_s, "backend": jax.default_backend()}


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _best(fn, reps) -> float:
  fn()
  return min(_timed(fn) for _ in range(reps))


# ---------------------------------------------------------------- TRL


def _trl(args) -> dict:
  import torch
  from datasets import Dataset
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
  from trl import GRPOConfig, GRPOTrainer
  from vs_trl import time_phases  # this script's folder is on sys.path (run as a script)

  a = torch.randn(2048, 2048)
  peak = 2 * 2048**3 / _best(lambda: a @ a, 5)

  cfg = _shape(args)
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
                       rms_norm_eps=cfg.rms_eps, tie_word_embeddings=True, use_sliding_window=False,
                       torch_dtype="float32")
  model_dir = tempfile.mkdtemp()
  Qwen2ForCausalLM(config).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  prompts = [" ".join(f"t{int(i)}" for i in row)
             for row in _prompts(cfg.vocab_size, args.prompts * GROUP)]
  dataset = Dataset.from_dict({"prompt": prompts * 16})

  def reward(completions, **_):
    return [float(len(c) % 7) for c in completions]

  timings: list[dict] = []
  train_args = GRPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * GROUP,
      num_generations=GROUP, max_completion_length=NEW_TOKENS, beta=BETA, bf16=False,
      use_cpu=True, gradient_checkpointing=False, max_steps=args.iters + 1, logging_steps=10**6,
      report_to=[], save_strategy="no", learning_rate=1e-5, temperature=1.0,
      gradient_accumulation_steps=1, disable_dropout=True)
  trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=train_args,
                        train_dataset=dataset, processing_class=tokenizer)
  time_phases(trainer, timings)
  trainer.train()
  hf_model = trainer.model
  ids = torch.as_tensor(_prompts(cfg.vocab_size, args.prompts * GROUP))

  def run():
    with torch.no_grad():
      hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                        top_p=1.0, temperature=1.0, max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=True)

  run()
  generate_s = statistics.median(_timed(run) for _ in range(args.sampler_reps))
  return {"peak": peak, "iters": timings[1:], "generate_s": generate_s,
          "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)"}


# ---------------------------------------------------------------- main


def _child(side: str, args) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--layers", str(args.layers), "--preset", args.preset,
          "--iters", str(args.iters), "--prompts", str(args.prompts),
          "--sampler_reps", str(args.sampler_reps),
          "--data_dir", args.data_dir]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device
  t = time.perf_counter()
  out = subprocess.run(argv, capture_output=True, text=True, env=env)
  if out.returncode:
    raise SystemExit(f"the {side} side failed:\n{out.stderr[-4000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - t
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's 24)")
  p.add_argument("--preset", default=PRESET, help="a smaller Qwen2 preset checks the script quickly")
  p.add_argument("--prompts", type=int, default=2, help="prompts per iteration (× G=4)")
  p.add_argument("--iters", type=int, default=1, help="timed GRPO iterations per side")
  p.add_argument("--sampler_reps", type=int, default=1)
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  p.add_argument("--out", default="")
  p.add_argument("--side", choices=("kljax", "trl"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.side:
    print(json.dumps(_kljax(args) if args.side == "kljax" else _trl(args)))
    return

  k, t = _child("kljax", args), _child("trl", args)
  cfg = _shape(args)
  med = statistics.median
  gen_len = med(i["length"] for i in k["iters"])
  fwd = _forward_flops(cfg, args.prompts * GROUP * (PROMPT_LEN + gen_len))
  flops = {"generate": fwd, "reference": fwd, "update": 3 * fwd, "rollout": fwd, "rewards": 0.0,
           "update+reference": 4 * fwd}
  k_total, t_total = med(i["total"] for i in k["iters"]), med(i["total"] for i in t["iters"])
  n_tokens = args.prompts * GROUP * NEW_TOKENS
  k_tps, t_tps = n_tokens / k["sampler_s"], n_tokens / t["generate_s"]
  update_frac = flops["update+reference"] / med(i["update+reference"] for i in k["iters"]) / k["peak"]
  lines = [
      f"benchmarks/vs_trl_real.py: {args.preset} shape ({cfg.num_layers} layers, vocabulary "
      f"{cfg.vocab_size:,}, {cfg.num_params():,} parameters), float32 on both sides, "
      f"{os.cpu_count()} CPU cores; torch {t['torch']}; jax backend {k['backend']}",
      f"GRPO: {args.prompts} prompts × G={GROUP} × {NEW_TOKENS} new tokens after {PROMPT_LEN}-token "
      f"prompts, β={BETA}; {len(k['iters'])} timed iterations a side after one warm-up; "
      f"mean completion length (kljax) {gen_len:.1f}",
      f"matmul peak (2048³ float32): XLA {k['peak'] / 1e9:.0f} GFLOP/s, torch "
      f"{t['peak'] / 1e9:.0f} GFLOP/s",
      "",
      f"TRL GRPOTrainer: {t_total:.2f} s/iteration (process wall {t['wall_s']:.0f} s)",
  ]
  for phase in ("generate", "reference", "update"):
    s = med(i[phase] for i in t["iters"])
    lines.append(f"  {phase:16s} {s:7.2f} s  {flops[phase] / s / 1e9:7.1f} GFLOP/s "
                 f"({flops[phase] / s / t['peak']:.0%} of torch's peak)")
  lines.append(f"kljax:           {k_total:.2f} s/iteration (process wall {k['wall_s']:.0f} s)")
  for phase in ("rollout", "rewards", "update+reference"):
    s = med(i[phase] for i in k["iters"])
    rate = (f"{flops[phase] / s / 1e9:7.1f} GFLOP/s ({flops[phase] / s / k['peak']:.0%} of XLA's "
            "peak)" if flops[phase] else "(host)")
    lines.append(f"  {phase:16s} {s:7.2f} s  {rate}")
  lines += [
      "",
      f"sampler, {args.prompts * GROUP} × {NEW_TOKENS} new tokens: kljax {k['sampler_s']:.2f} s "
      f"({k_tps:.0f} tokens/s), HF generate {t['generate_s']:.2f} s ({t_tps:.0f} tokens/s)",
      "",
      f"kljax / TRL time per iteration: {k_total / t_total:.2f} (target ≤ 0.70)",
      f"kljax sampler / HF generate tokens/s: {k_tps / t_tps:.2f} (target ≥ 1.50)",
      f"kljax update+reference: {update_frac:.0%} of the matmul peak (target ≥ 50%)",
  ]
  report = "\n".join(lines)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  main()
