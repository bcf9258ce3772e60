"""kljax's side of `benchmarks/vs_peers.py`: one GRPO iteration, the sampler and the update at a
real model shape, in this process.

  python benchmarks/peer_kljax.py [--preset qwen2.5-0.5b] [--layers L] [--iters N]

Prints one JSON line (the last line of stdout). The GRPO iteration is the trainer's own
`kljax.train.grpo.train_step` (rollout with the KV-cache sampler, rewards, group advantages, and
the on-policy update, whose one compiled program runs the reference pass, the policy's forward and
backward and AdamW, donating the parameters and the optimizer state). The sampler is
`kljax.sampling.sample` on `prompts × group` distinct random prompts for `new_tokens` tokens
(EOS = id 0, which random weights draw with probability ~1/V a token; the tokens counted are
those generated). Each figure is taken
after one untimed warm-up (compilation), with wall and CPU seconds (user + system of the whole
process, all threads). `benchmarks/gpu.sh` runs this script on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Runnable as a script from anywhere, the kljax beside it first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BETA = 0.04  # TRL's default β, with k3 as a loss (TRL's KL term)


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn):
  """(result, wall seconds, CPU seconds) of `fn()`."""
  t, c = time.perf_counter(), cpu_seconds()
  out = fn()
  return out, time.perf_counter() - t, cpu_seconds() - c


def random_prompts(vocab: int, rows: int, length: int):
  """The same prompts on every side: token ids in [4, vocab) from numpy's generator seeded 1."""
  import numpy as np

  return np.random.default_rng(1).integers(4, vocab, (rows, length))


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """This process's dense float32 matmul rate (FLOP/s), best of `reps` after a warm-up."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  return 2 * n**3 / min(timed(lambda: mm(a, a).block_until_ready())[1] for _ in range(reps))


def measure(*, preset: str, layers: int, prompts: int, group: int, prompt_len: int,
            new_tokens: int, iters: int, data_dir: str, rollout_dtype: str = "float32",
            dtype: str = "float32") -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kljax import models
  from kljax.sampling import sample
  from kljax.train import grpo
  from kljax.train.config import grpo_tiny

  peak = matmul_peak()
  cfg = models.preset(preset, dtype=dtype, param_dtype=dtype)
  cfg = cfg.replace(num_layers=layers) if layers else cfg
  c = grpo_tiny()
  c.data.data_dir, c.data.max_prompt_len = data_dir, prompt_len
  c.batch_size, c.rollout.group_size = prompts * group, group
  c.rollout.max_new_tokens, c.rollout.dtype = new_tokens, rollout_dtype
  c.kl.term, c.kl.beta = "k3_as_loss", BETA
  c.num_steps, c.metrics.exact_kl, c.metrics.tensorboard, c.mesh.devices = 10**6, False, False, 1
  setup, state = grpo.build(c, init_model=models.create(cfg, seed=0))
  fns = grpo.compile_fns(setup)
  out = {"iteration_s": [], "cpu_s": [], "rollout_s": [], "update_s": [], "length": []}
  with jax.set_mesh(setup.mesh):
    for i in range(iters + 1):
      (state, m), wall, cpu = timed(lambda: grpo.train_step(setup, state, fns))
      if i:  # the first compiles
        for k, v in (("iteration_s", wall), ("cpu_s", cpu), ("rollout_s", m["time_rollout"]),
                     ("update_s", m["time_update"]), ("length", m["length_mean"])):
          out[k].append(v)

    rows = prompts * group
    prompt = jnp.asarray(random_prompts(cfg.vocab_size, rows, prompt_len), jnp.int32)
    policy = grpo.sampler_model(setup, state.params)
    run = lambda: int(np.sum(sample(  # noqa: E731
        policy, prompt, jnp.ones_like(prompt, bool), jax.random.PRNGKey(0),
        max_new_tokens=new_tokens, eos_id=0).completion_mask_bn))  # tokens generated
    run()
    out |= {"sampler_s": [], "sampler_cpu_s": [], "sampler_tokens": []}
    for _ in range(iters):
      tokens, wall, cpu = timed(run)
      out["sampler_s"].append(wall)
      out["sampler_cpu_s"].append(cpu)
      out["sampler_tokens"].append(tokens)
  return out | {"matmul_peak_flops": peak,
                "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                "jax": jax.__version__, "layers": cfg.num_layers, "params": cfg.num_params(),
                "rollout_dtype": rollout_dtype, "dtype": dtype}


def shape_parser(description: str) -> argparse.ArgumentParser:
  """The flags every side of `vs_peers.py` takes: the model's shape, the batch and the count."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--preset", default="qwen2.5-0.5b")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--group", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--iters", type=int, default=3)
  return p


def main(argv=None) -> None:
  p = shape_parser(__doc__.split("\n")[0])
  p.add_argument("--rollout_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weights and compute of the trained model")
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  a = p.parse_args(argv)
  print(json.dumps(measure(preset=a.preset, layers=a.layers, prompts=a.prompts, group=a.group,
                           prompt_len=a.prompt_len, new_tokens=a.new_tokens, iters=a.iters,
                           data_dir=a.data_dir, rollout_dtype=a.rollout_dtype, dtype=a.dtype)))


if __name__ == "__main__":
  main()
