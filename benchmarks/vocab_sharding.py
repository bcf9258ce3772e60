"""Which dimension of the embedding `fsdp` splits: the update's and sampler's temporaries per device.

  python benchmarks/vocab_sharding.py [--layers 1]

Compiles (experiments.plan, nothing runs) the GRPO update and the sampler of qwen2.5-0.5b (real
vocabulary 151,936; `--layers` of its 24 layers) on 8 simulated CPU devices with fsdp=8, 8
sequences of 8 + 4 tokens, remat on, under two rule sets: the embedding's `embed` dimension on fsdp
(the rules before 2026-11-27: `vocab` on `tensor` only) and kljax's rules (`vocab` takes fsdp
first). XLA:CPU's compiled estimates, per device; on one host the 8 simulated devices add up.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  from experiments import plan as plan_lib
  from kljax import sharding

  layers = sys.argv[sys.argv.index("--layers") + 1] if "--layers" in sys.argv else "1"
  args = plan_lib._parser().parse_args([
      "--preset", "qwen2.5-0.5b", "--devices", "8", "--fsdp", "8", "--layers", layers,
      "--batch", "8", "--prompt_len", "8", "--new_tokens", "4", "--remat"])
  embed_first = tuple((k, "tensor") if k == "vocab" else (k, v) for k, v in sharding.DEFAULT_RULES)
  state_shardings = sharding.state_shardings
  print(f"qwen2.5-0.5b, {layers} layer(s), vocabulary 151,936, 8 devices (fsdp=8), 8 × (8 + 4) "
        "tokens, remat; GiB per device (XLA:CPU compiled estimates)")
  print(f"{'rules':34s} {'params':>7s} {'update temp':>12s} {'update peak':>12s} {'sampler temp':>13s}")
  try:
    for name, rules in (("embed on fsdp (before)", embed_first),
                        ("vocab on fsdp (kljax's rules)", sharding.DEFAULT_RULES)):
      sharding.state_shardings = functools.partial(state_shardings, rules=rules)
      r = plan_lib.plan(args)
      c, g = r["compiled"], 2**30
      print(f"{name:34s} {r['per_device_bytes']['params'] / g:7.3f} {c['update']['temp'] / g:12.2f} "
            f"{c['update']['peak'] / g:12.2f} {c['sampler']['temp'] / g:13.2f}")
  finally:
    sharding.state_shardings = state_shardings


if __name__ == "__main__":
  main()
