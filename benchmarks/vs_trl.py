"""One GRPO iteration in kljax and in TRL's GRPOTrainer, same model shape, same machine, one run.

  pip install "trl==1.16.*"       # PyTorch CPU build comes with the test extra (torch==2.13.0)
  python benchmarks/vs_trl.py [--rounds 3 --steps 4]

Both sides: a tiny Llama (vocab 512, d 256, 4 layers, 4 heads, 2 KV heads, MLP 688; kljax's `small`
preset), 8 prompts × G=8 completions of up to 32 tokens after 16-token prompts, β = 0.04 with a
reference model, one optimizer step per iteration, float32, no gradient checkpointing. Blocks of
`--steps` iterations alternate between the two (after a warm-up block each), and the medians of
each side's per-iteration times give the ratio. Phases: TRL's `_generate` (generation), its
reference-model log-prob pass, and the rest of `training_step` (update); kljax's rollout,
rewards (scoring and advantages, host side), and update, which on-policy also holds the reference
pass (kljax fuses the log-prob passes into the update's own forward). Achieved GFLOP/s per phase
use the analytic count 2·(matmul parameters)·tokens for a forward pass over every sequence (×3 for
forward+backward), against this machine's dense float32 matmul peak measured in the same run; it is
an effective rate for kljax's rollout, which prefills each prompt once for its whole group where
TRL prefills all G copies. Target: kljax ≤ 0.8× TRL's time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LEN, NEW_TOKENS, PROMPTS, GROUP, BETA = 16, 32, 8, 8, 0.04


def time_phases(trainer, timings: list[dict]) -> None:
  """Wraps a TRL `GRPOTrainer`'s generation, log-prob pass and training step so that every step
  appends {"total", "cpu", "generate", "reference", "update"} (seconds; "cpu": the process's user +
  system seconds) to `timings`; "update" is what the step spent outside generation and the
  reference model's log-prob pass."""
  import resource

  def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  generate, ref_pass, step = (trainer._generate, trainer._get_per_token_logps_and_entropies,
                              trainer.training_step)
  cur: dict[str, float] = {}

  def timed_generate(*a, **k):
    t = time.perf_counter()
    out = generate(*a, **k)
    cur["generate"] = cur.get("generate", 0.0) + time.perf_counter() - t
    return out

  def timed_logps(model, *a, **k):
    t = time.perf_counter()
    out = ref_pass(model, *a, **k)
    if trainer.ref_model is not None and model is trainer.ref_model:
      cur["reference"] = cur.get("reference", 0.0) + time.perf_counter() - t
    return out

  def timed_step(*a, **k):
    cur.clear()
    t, c = time.perf_counter(), cpu()
    out = step(*a, **k)
    total = time.perf_counter() - t
    timings.append({"total": total, "cpu": cpu() - c, "generate": cur.get("generate", 0.0),
                    "reference": cur.get("reference", 0.0),
                    "update": total - cur.get("generate", 0.0) - cur.get("reference", 0.0)})
    return out

  trainer._generate, trainer._get_per_token_logps_and_entropies = timed_generate, timed_logps
  trainer.training_step = timed_step


def _matmul_peak() -> float:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * 2048**3 / best


# ---------------------------------------------------------------- kljax


def kljax_runner(data_dir: str):
  from kljax.train import grpo

  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", "grpo_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir = data_dir
  c.data.max_prompt_len = PROMPT_LEN
  c.model.preset = "small"
  c.batch_size, c.rollout.group_size, c.rollout.max_new_tokens = PROMPTS * GROUP, GROUP, NEW_TOKENS
  c.kl.term, c.kl.beta = "k3_as_loss", BETA  # TRL's default KL
  c.num_steps = 10**6
  c.metrics.exact_kl = False
  c.mesh.devices = 1
  setup, state = grpo.build(c)
  fns = grpo.compile_fns(setup)
  holder = {"state": state}

  def iteration():
    start = time.perf_counter()
    holder["state"], m = grpo.train_step(setup, holder["state"], fns)
    return time.perf_counter() - start, {"rollout": m["time_rollout"],
                                         "rewards": m["time_logprobs"],
                                         "update+reference": m["time_update"]}, m["length_mean"]

  return iteration


# ---------------------------------------------------------------- TRL


def trl_runner(steps: int):
  import torch
  from datasets import Dataset
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
  from trl import GRPOConfig, GRPOTrainer

  torch.manual_seed(0)
  vocab = {f"t{i}": i for i in range(512)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2",
                                      bos_token="t1", unk_token="t3")
  config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=256, tie_word_embeddings=False)
  rng = torch.Generator().manual_seed(1)
  prompts = [" ".join(f"t{int(i)}" for i in torch.randint(4, 512, (PROMPT_LEN,), generator=rng))
             for _ in range(PROMPTS * 64)]
  dataset = Dataset.from_dict({"prompt": prompts})

  def reward(completions, **_):
    return [float(len(c) % 7) for c in completions]

  model_dir = tempfile.mkdtemp()
  LlamaForCausalLM(config).save_pretrained(model_dir)  # TRL loads its reference from this path
  tokenizer.save_pretrained(model_dir)
  timings: list[dict] = []

  def make():
    out = tempfile.mkdtemp()
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, beta=BETA, bf16=False, use_cpu=True,
        gradient_checkpointing=False, max_steps=steps, logging_steps=10**6, report_to=[],
        save_strategy="no", learning_rate=1e-5, temperature=1.0, gradient_accumulation_steps=1,
        disable_dropout=True)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    time_phases(trainer, timings)
    return trainer

  def block():
    n = len(timings)
    make().train()
    return timings[n:]

  return block


# ---------------------------------------------------------------- main


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=4, help="iterations per block")
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  args = p.parse_args()

  import torch

  from kljax import models

  peak = _matmul_peak()
  kljax_iter = kljax_runner(args.data_dir)
  trl_block = trl_runner(args.steps + 1)
  for _ in range(2):  # compile / warm up
    kljax_iter()
  trl_block()
  k_times, t_times = [], []
  for _ in range(args.rounds):
    k_times += [kljax_iter() for _ in range(args.steps)]
    t_times += trl_block()[1:]  # the first step of each trainer includes its own warm-up

  cfg = models.preset("small")
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.d_model - (2 * cfg.num_layers + 1) * cfg.d_model
  gen_len = statistics.median(t[2] for t in k_times)
  seq_tokens = PROMPTS * GROUP * (PROMPT_LEN + gen_len)
  fwd = 2 * matmul_params * seq_tokens  # one forward pass over every sequence
  flops = {"generate": fwd, "reference": fwd, "update": 3 * fwd,
           "rollout": fwd, "rewards": 0.0, "update+reference": 4 * fwd}

  med = lambda xs: statistics.median(xs)
  k_total = med([t[0] for t in k_times])
  t_total = med([t["total"] for t in t_times])
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s; {len(k_times)} kljax and {len(t_times)} TRL iterations, "
        f"alternating blocks of {args.steps}")
  print(f"TRL GRPOTrainer: {t_total:.3f} s/iteration")
  for phase in ("generate", "reference", "update"):
    s = med([t[phase] for t in t_times])
    print(f"  {phase:16s} {s:.3f} s  {flops[phase] / s / 1e9:7.1f} GFLOP/s "
          f"({flops[phase] / s / peak:.0%} of peak)")
  print(f"kljax:           {k_total:.3f} s/iteration")
  for phase in ("rollout", "rewards", "update+reference"):
    s = med([t[1][phase] for t in k_times])
    rate = (f"{flops[phase] / s / 1e9:7.1f} GFLOP/s ({flops[phase] / s / peak:.0%} of peak)"
            if flops[phase] else "(host)")
    print(f"  {phase:16s} {s:.3f} s  {rate}")
  print(f"kljax / TRL time per iteration: {k_total / t_total:.2f} (target ≤ 0.80)")


if __name__ == "__main__":
  main()
