"""The vLLM rollout engine against the jax engine and HF `generate`; GRPO runs on each engine.

  python benchmarks/vllm_engine.py --preset small --sync --iters 5 \
      --json benchmarks/results/vllm_engine_small.json
  python benchmarks/vllm_engine.py --preset qwen2.5-0.5b --sync \
      --json benchmarks/results/vllm_engine_qwen2.5-0.5b.json
  python benchmarks/vllm_engine.py --grpo --json benchmarks/results/vllm_grpo.json
  python benchmarks/vllm_engine.py --quick            # CI: tiny sizes, prints only

Throughput (default): one model with random weights (the preset's shape, float32), the same
left-padded prompts (--prompts × --group samples, --new_tokens each, temperature 1), sampled by
each side once to warm up, then --iters rounds in which the sides alternate (jax, vLLM's weight
push, vLLM, HF generate); medians of wall seconds and of CPU seconds (user+sys). The push is
HF-layout conversion, in-place reload and the sync check; the sync gap is the mean
|log p_vLLM − log p_trainer| on the probe batch (`--sync`: also at bfloat16).

GRPO (--grpo): `python -m experiments.grpo` on arithmetic with the `small` preset, once per row of
RUNS: the jax and vllm engines in float32, then vLLM sampling in bfloat16 (μ ≠ π_old) with the
truncated importance weight (rollout.correction=tis_token) on the policy gradient only
(rollout.correct_kl=False, TRL's choice) or on the policy gradient and the KL term, and the same
two with vLLM sampling at temperature 0.7 (a mismatch large enough to move the weights). Each run's
metrics.jsonl goes into the JSON: reward, exact KL(π‖π_ref), sampler_ess, sampler_logprob_gap,
and a figure beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNS = {  # name: extra flags of `python -m experiments.grpo`
    "jax": ["--config.rollout.engine=jax"],
    "vllm": ["--config.rollout.engine=vllm"],
    "vllm_bf16_tis_pg": ["--config.rollout.engine=vllm", "--config.rollout.dtype=bfloat16",
                         "--config.rollout.correction=tis_token",
                         "--config.rollout.correct_kl=False"],
    "vllm_bf16_tis_pg_kl": ["--config.rollout.engine=vllm", "--config.rollout.dtype=bfloat16",
                            "--config.rollout.correction=tis_token",
                            "--config.rollout.correct_kl=True"],
    # a larger mismatch: vLLM samples at temperature 0.7 while the trainer's π_old is at 1
    "vllm_t0.7_tis_pg": ["--config.rollout.engine=vllm", "--config.rollout.temperature=0.7",
                         "--config.rollout.correction=tis_token",
                         "--config.rollout.correct_kl=False"],
    "vllm_t0.7_tis_pg_kl": ["--config.rollout.engine=vllm", "--config.rollout.temperature=0.7",
                            "--config.rollout.correction=tis_token",
                            "--config.rollout.correct_kl=True"],
}


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def throughput(args) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from kljax import models
  from kljax.models import hf
  from kljax.rollout import JaxEngine, SamplingOptions, torch_env
  from kljax.rollout.vllm_engine import VLLMEngine, kv_cache_bytes_for

  torch_env.hide_broken()
  overrides = {"num_layers": args.layers} if args.layers else {}
  config = models.preset(args.preset, dtype="float32", scan_layers=False, **overrides)
  graphdef, params = nnx.split(models.create(config, seed=0))
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, config.vocab_size - 1, (args.prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  options = SamplingOptions(max_new_tokens=args.new_tokens, eos_id=config.vocab_size - 1,
                            pad_id=0)
  key = jax.random.PRNGKey(0)
  model_fn = lambda p: nnx.merge(graphdef, p)  # noqa: E731
  shape = {"preset": args.preset, "layers": config.num_layers, "prompts": args.prompts,
           "group": args.group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
  out = {"command": "python benchmarks/vllm_engine.py " + " ".join(sys.argv[1:]), "shape": shape,
         "iters": args.iters}
  max_len = args.prompt_len + args.new_tokens
  kv = lambda dtype: kv_cache_bytes_for(config, sequences=args.prompts * args.group,  # noqa: E731
                                        max_model_len=max_len, dtype=dtype)

  jax_engine = JaxEngine(model_fn)

  def jax_side():
    jax_engine.push(params)
    s = jax_engine.generate(prompt, mask, key, samples_per_prompt=args.group, options=options)
    jax.block_until_ready(s.tokens_bt)
    return int(np.asarray(s.completion_mask_bn).sum())

  start = time.perf_counter()
  engine = VLLMEngine(config, graphdef, model_fn, dtype="float32", max_model_len=max_len,
                      kv_cache_bytes=kv("float32"))
  startup = time.perf_counter() - start

  def vllm_side():
    s = engine.generate(prompt, mask, key, samples_per_prompt=args.group, options=options)
    return int(s.completion_mask_bn.sum())

  pushed = {}

  def push_side():
    pushed.update(engine.push(params))
    return 0

  sides = {"jax": jax_side, "vllm_push": push_side, "vllm": vllm_side}
  if not args.skip_hf:  # HF generate on the same weights (on the CPU)
    import torch
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
      hf.export_hf(nnx.merge(graphdef, params), d)
      hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf_model.eval()
    ids = torch.from_numpy(prompt.astype(np.int64))

    def hf_side():
      with torch.no_grad():
        s = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              max_new_tokens=args.new_tokens, num_return_sequences=args.group,
                              eos_token_id=config.vocab_size - 1, pad_token_id=0, top_k=0)
      return int((s[:, args.prompt_len:] != 0).sum())

    sides["hf_generate"] = hf_side
    out["transformers"] = transformers.__version__

  # one warm-up each, then the sides alternate within each round; medians over the rounds
  for fn in sides.values():
    fn()
  times = {name: ([], [], []) for name in sides}
  for _ in range(args.iters):
    for name, fn in sides.items():
      w, c = time.perf_counter(), _cpu_s()
      n = fn()
      times[name][0].append(time.perf_counter() - w)
      times[name][1].append(_cpu_s() - c)
      times[name][2].append(n)
  for name, (walls, cpus, counts) in times.items():
    wall = statistics.median(walls)
    out[name] = {"wall_s": wall, "cpu_s": statistics.median(cpus)}
    if name != "vllm_push":
      out[name]["tokens_per_s"] = statistics.median(counts) / wall
  out["vllm"] |= {"startup_s": startup, "push_s": out["vllm_push"]["wall_s"],
                  "push_cpu_s": out["vllm_push"]["cpu_s"],
                  "sync_gap_float32": pushed["sampler_sync_gap"]}
  engine.close()
  for name in ("jax", "vllm", "hf_generate"):
    if name in out:
      print(f"{name}: {out[name]['tokens_per_s']:.1f} tokens/s ({out[name]['wall_s']:.2f} s, "
            f"CPU {out[name]['cpu_s']:.1f} s)")
  print(f"vllm: start-up {startup:.1f} s, push + sync check {out['vllm']['push_s']:.2f} s (CPU "
        f"{out['vllm']['push_cpu_s']:.1f} s), sync gap {pushed['sampler_sync_gap']:.2g}")
  if args.sync:
    engine = VLLMEngine(config, graphdef, lambda p: _bf16(graphdef, p), dtype="bfloat16",
                        max_model_len=max_len, kv_cache_bytes=kv("bfloat16"))
    out["vllm"]["sync_gap_bfloat16"] = engine.push(params)["sampler_sync_gap"]
    engine.close()
    print(f"vllm bfloat16 sync gap {out['vllm']['sync_gap_bfloat16']:.3g}")
  out["ratios"] = {"vllm_over_jax": out["vllm"]["tokens_per_s"] / out["jax"]["tokens_per_s"]}
  if "hf_generate" in out:
    out["ratios"] |= {
        "vllm_over_hf": out["vllm"]["tokens_per_s"] / out["hf_generate"]["tokens_per_s"],
        "jax_over_hf": out["jax"]["tokens_per_s"] / out["hf_generate"]["tokens_per_s"]}
  print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in out["ratios"].items()))
  return out


def _bf16(graphdef, params):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)
  model = nnx.merge(graphdef, cast)
  model.config = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
  return model


def grpo_runs(args) -> dict:
  from kljax.train.metrics import read_jsonl

  keys = ("reward_mean", "exact_rkl", "sampler_ess", "sampler_logprob_gap", "sampler_sync_gap",
          "sampler_corrected_fraction", "time_rollout")
  base = [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
          "--config.model.preset=small", f"--config.num_steps={args.steps}",
          f"--config.sft.steps={args.sft_steps}", "--config.kl.term=k3_as_loss",
          "--config.kl.beta=0.05", "--config.metrics.tensorboard=False", "--config.mesh.devices=1"]
  out = {"command": "python benchmarks/vllm_engine.py " + " ".join(sys.argv[1:]),
         "flags": base[2:], "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    sft = None
    for name, flags in RUNS.items():
      workdir = os.path.join(tmp, name)
      if sft is not None:  # every run starts from the same warm start
        shutil.copytree(sft, os.path.join(workdir, "sft"))
      start = time.perf_counter()
      done = subprocess.run(base + [f"--workdir={workdir}"] + flags, cwd=ROOT,
                            capture_output=True, text=True)
      if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
      sft = sft or os.path.join(workdir, "sft")
      rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
      out["runs"][name] = {"flags": flags, "wall_s": time.perf_counter() - start,
                           **{k: [r.get(k) for r in rows] for k in keys}}
      last = rows[-1]
      print(f"{name}: reward {last['reward_mean']:.3f}, exact KL {last['exact_rkl']:.4f}, "
            f"ESS {last['sampler_ess']:.4f}, gap {last['sampler_logprob_gap']:.2g}, "
            f"{out['runs'][name]['wall_s']:.0f} s")
  return out


def figure(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (("reward_mean", "reward"), ("exact_rkl", "exact KL(π‖π_ref)"),
            ("sampler_ess", "sampler ESS (π_old/μ)"), ("sampler_logprob_gap", "|log μ − log π_old|"))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  for ax, (key, title) in zip(axes, panels):
    for name, run in result["runs"].items():
      ax.plot(run[key], label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    if key == "sampler_logprob_gap":
      ax.set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--group", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--sync", action="store_true", help="also the bfloat16 sync gap")
  p.add_argument("--skip_hf", action="store_true",
                 help="no HF generate side (it runs on the CPU: skip it on a GPU)")
  p.add_argument("--grpo", action="store_true", help="the GRPO runs of RUNS instead")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--sft_steps", type=int, default=100)
  p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
  p.add_argument("--json", default=None)
  args = p.parse_args()
  if args.quick:
    args.layers, args.new_tokens, args.iters, args.steps, args.sft_steps = 1, 4, 1, 2, 5
  result = grpo_runs(args) if args.grpo else throughput(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    if args.grpo:
      figure(result, os.path.splitext(args.json)[0] + ".png")
  print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
  main()
