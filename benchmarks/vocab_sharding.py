"""Which dimension of the embedding `fsdp` splits: the update's and sampler's temporaries per device.

  python benchmarks/vocab_sharding.py [experiments.plan flags]

Compiles (experiments.plan, nothing runs) the GRPO update and the sampler under the two embedding
splits (`--embedding_split embed`: the `embed` dimension on fsdp, `vocab` on `tensor` only;
`--embedding_split vocab`: the vocabulary rows take fsdp first); `auto` picks one by the update's
size (`kljax.sharding.rules_for`). The default flags are the real-shape run's case:
qwen2.5-0.5b with 1 layer (real vocabulary 151,936) on 8 simulated CPU devices with fsdp=8, 8
sequences of 8 + 4 tokens, remat on. XLA:CPU's compiled estimates, per device (on one host the 8
simulated devices add up).
"""

from __future__ import annotations

import os
import sys

DEFAULT = ("--preset qwen2.5-0.5b --devices 8 --fsdp 8 --layers 1 --batch 8 --prompt_len 8 "
           "--new_tokens 4 --remat").split()


def main() -> None:
  argv = sys.argv[1:] or DEFAULT
  devices = argv[argv.index("--devices") + 1] if "--devices" in argv else "8"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import plan as plan_lib

  print("python -m experiments.plan " + " ".join(argv) + " --embedding_split embed|vocab")
  print(f"GiB per device (XLA:CPU compiled estimates)\n{'rules':32s} {'params':>7s} "
        f"{'update temp':>12s} {'sampler temp':>13s} {'peak':>7s}")
  for name, split in (("embed on fsdp", "embed"), ("vocab on fsdp", "vocab")):
    r = plan_lib.plan(plan_lib._parser().parse_args([*argv, "--embedding_split", split]))
    b, c, g = r["per_device_bytes"], r["compiled"], 2**30
    print(f"{name:32s} {b['params'] / g:7.3f} {c['update']['temp'] / g:12.2f} "
          f"{c['sampler']['temp'] / g:13.2f} {b['total'] / g:7.2f}", flush=True)

if __name__ == "__main__":
  main()
