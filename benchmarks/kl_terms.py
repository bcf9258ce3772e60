"""Forward+backward time of every KL term's surrogate vs the bare policy-gradient surrogate.

  python benchmarks/kl_terms.py                 # 64×4096 tokens, every term, on- and off-policy
  python benchmarks/kl_terms.py --quick         # a smoke run (small, few repeats)

Each entry is `jax.jit(jax.grad(mean surrogate))` w.r.t. logp on the same [B, T] float32 tokens.
Three ratios, all measured in one run (timings interleave round-robin; medians):
  ×PG      to the bare policy-gradient surrogate −A·logp (REINFORCE: one multiply, no exp);
  ×PPO     to the PPO-clip surrogate −min(ρA, clip(ρ)A), ρ = exp(logp − old_logp), which a GRPO
           step computes anyway;
  +KL      (PPO-clip + KL term, fused in one jitted loss) / (PPO-clip alone): what adding the
           term to a real loss costs.
A row "exp(x) alone" shows what one vectorized exp costs on this machine relative to the bare
surrogate: any term that needs δ or ρ pays at least that. Target: every term ≤ 1.5× the bare surrogate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kljax

BARE = "bare PG surrogate −A·logp"
PPO = "PPO-clip surrogate"
EXP = "exp(x) alone (forward only)"


def _timed(fn, args, inner: int) -> float:
  start = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner


def _ppo(lp, old, adv, eps=0.2):
  rho = jnp.exp(lp - old)
  return -jnp.mean(jnp.minimum(rho * adv, jnp.clip(rho, 1 - eps, 1 + eps) * adv))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--rounds", type=int, default=30, help="round-robin rounds (medians over them)")
  parser.add_argument("--inner", type=int, default=20, help="calls per timed sample")
  parser.add_argument("--terms", default="all", help="comma-separated KL-term names, or 'all'")
  parser.add_argument("--quick", action="store_true", help="8×256 tokens, 3 rounds: a smoke test")
  parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
  args = parser.parse_args()
  if args.quick:
    args.batch, args.length, args.rounds, args.inner = 8, 256, 3, 2
  names = kljax.kl_term_names() if args.terms == "all" else args.terms.split(",")
  terms = [kljax.kl_term(n) for n in names]

  rng = np.random.default_rng(0)
  shape = (args.batch, args.length)
  logp = jnp.asarray(rng.normal(-2.0, 1.0, shape), jnp.float32)
  ref = logp + jnp.asarray(rng.normal(0.0, 0.3, shape), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
  adv = jnp.asarray(rng.normal(size=shape), jnp.float32)

  fns = {
      BARE: (jax.grad(lambda lp, a: -jnp.mean(a * lp)), (logp, adv)),
      PPO: (jax.grad(_ppo), (logp, old, adv)),
      EXP: (jnp.exp, (logp,)),
  }
  for t in terms:
    fns[f"{t.name} | on"] = (jax.grad(lambda lp, r, t=t: jnp.mean(t.surrogate(lp, r))), (logp, ref))
    fns[f"{t.name} | off"] = (
        jax.grad(lambda lp, r, o, t=t: jnp.mean(t.surrogate(lp, r, o))), (logp, ref, old))
    fns[f"{t.name} | ppo+"] = (
        jax.grad(lambda lp, r, o, a, t=t: _ppo(lp, o, a) + 0.1 * jnp.mean(t.surrogate(lp, r, o))),
        (logp, ref, old, adv))
  fns = {k: (jax.jit(f), a) for k, (f, a) in fns.items()}
  for fn, fargs in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*fargs))
  samples = {k: [] for k in fns}
  for _ in range(args.rounds):
    for k, (fn, fargs) in fns.items():
      samples[k].append(_timed(fn, fargs, args.inner))
  med = {k: statistics.median(v) for k, v in samples.items()}
  bare, ppo = med[BARE], med[PPO]

  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), tokens "
        f"{shape[0]}×{shape[1]}, {args.rounds} rounds × {args.inner} calls, medians")
  print(f"{BARE}: {bare * 1e6:.1f} µs;  {PPO}: {ppo * 1e6:.1f} µs ({ppo / bare:.2f}×PG);  "
        f"{EXP}: {med[EXP] * 1e6:.1f} µs ({med[EXP] / bare:.2f}×PG)")
  header = (f"{'KL term':34s} {'on µs':>8s} {'×PG':>6s} {'off µs':>8s} {'×PG':>6s} {'×PPO':>6s} "
            f"{'+KL':>6s}")
  print(header)
  rows = {}
  for t in terms:
    on, off, fused = med[f"{t.name} | on"], med[f"{t.name} | off"], med[f"{t.name} | ppo+"]
    rows[t.name] = dict(on_us=on * 1e6, off_us=off * 1e6, on_x_pg=on / bare, off_x_pg=off / bare,
                        off_x_ppo=off / ppo, fused_over_ppo=fused / ppo)
    r = rows[t.name]
    print(f"{t.name:34s} {r['on_us']:8.1f} {r['on_x_pg']:6.2f} {r['off_us']:8.1f} "
          f"{r['off_x_pg']:6.2f} {r['off_x_ppo']:6.2f} {r['fused_over_ppo']:6.2f}")
  for key, label in [("on_x_pg", "on-policy ×PG"), ("off_x_pg", "off-policy ×PG"),
                     ("off_x_ppo", "off-policy ×PPO"), ("fused_over_ppo", "(PPO+KL)/PPO")]:
    worst = max(rows, key=lambda n: rows[n][key])
    within = sum(rows[n][key] <= 1.5 for n in rows)
    print(f"{label:18s} worst {rows[worst][key]:.2f} ({worst}); {within}/{len(rows)} terms ≤ 1.5")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"shape": shape, "bare_us": bare * 1e6, "ppo_us": ppo * 1e6,
                 "exp_us": med[EXP] * 1e6, "terms": rows}, f, indent=1)


if __name__ == "__main__":
  main()
