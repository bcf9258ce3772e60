"""Top-k + tail estimate of the per-position KL against the exact sum: bias, spread and time.

  python benchmarks/topk_tail.py          # V = 151,936, k ∈ {8, 64, 512}; writes benchmarks/results/
  python benchmarks/topk_tail.py --quick  # a smoke run (V = 4,096, few repeats, nothing written)

Logits come from hidden states [B, T, D] times an unembedding [D, V]; the policy's are scaled so a
position's entropy is LM-like (a few nats), and the reference is the policy with perturbed hidden
states and unembedding (the mean entropy is printed with the results). For each k:
  bias     |mean over R tail draws of Σ_t KL̂_t − Σ_t KL_t| / Σ_t KL_t, with its standard error;
  std      the spread of one draw's Σ_t KL̂_t, relative to Σ_t KL_t;
  grad     E‖∇_z KL̂ − ∇_z KL‖ / ‖∇_z KL‖ over the logits (one draw's gradient error);
  time     value_and_grad w.r.t. (hidden, unembedding) of Σ_t KL̂_t, jitted, median of `--reps`
           interleaved repeats, and its ratio to the exact chunked `logprobs.position_kl`.
Both paths form both models' full logits chunk by chunk (the reference normalizer needs them); the
top-k path adds a top-k selection and a tail draw per position.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kljax import full_kl, logprobs

HERE = os.path.dirname(os.path.abspath(__file__))


def _inputs(b, t, d, v, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(k[0], (b, t, d))
  # logit std ≈ 4.2 per position: a mean entropy of ≈ 5 nats at V = 151,936 (printed with the table)
  w = 4.2 / np.sqrt(d) * jax.random.normal(k[1], (d, v))
  rh = h + 0.3 * jax.random.normal(k[2], (b, t, d))
  rw = w + 0.3 * 4.2 / np.sqrt(d) * jax.random.normal(k[3], (d, v))
  return h, w, rh, rw


def _timed(fns, args, reps):
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def run(*, b, t, d, v, ks, repeats, grad_repeats, reps, chunk, tail_samples):
  h, w, rh, rw = _inputs(b, t, d, v)
  z = jnp.einsum("btd,dv->btv", h, w).reshape(b * t, v)
  rz = jnp.einsum("btd,dv->btv", rh, rw).reshape(b * t, v)
  log_p = jax.nn.log_softmax(z)
  entropy = float(jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, -1)))
  exact_kl = lambda x: jnp.sum(jnp.exp(jax.nn.log_softmax(x)) * (jax.nn.log_softmax(x)
                                                                 - jax.nn.log_softmax(rz)))
  true_value, true_grad = jax.value_and_grad(exact_kl)(z)
  true_value, true_norm = float(true_value), float(jnp.linalg.norm(true_grad))

  fns = {"exact": jax.jit(jax.value_and_grad(
      lambda h, w, rh, rw: jnp.sum(logprobs.position_kl(h, w, rh, rw, chunk_size=chunk)[0]),
      argnums=(0, 1)))}
  rows = []
  for k in ks:
    @jax.jit
    def draw(key, z, rz, k=k):
      tail = full_kl.sample_tail(key, z, k=k, num_samples=tail_samples)
      return jnp.sum(full_kl.topk_tail_kl(z, rz, tail, k=k))

    @jax.jit
    def grad_error(key, z, rz, true_grad, k=k):
      tail = full_kl.sample_tail(key, z, k=k, num_samples=tail_samples)
      g = jax.grad(lambda x: jnp.sum(full_kl.topk_tail_kl(x, rz, tail, k=k)))(z)
      return jnp.linalg.norm(g - true_grad)

    keys = jax.random.split(jax.random.PRNGKey(k), repeats)
    values = np.asarray([float(draw(kk, z, rz)) for kk in keys])
    gerr = np.asarray([float(grad_error(kk, z, rz, true_grad)) for kk in keys[:grad_repeats]])
    top_mass = float(jnp.mean(jnp.sum(jax.lax.top_k(jnp.exp(log_p), k)[0], -1)))
    rows.append({"k": k, "top_k_mass": top_mass,
                 "relative_bias": abs(values.mean() - true_value) / true_value,
                 "relative_bias_stderr": values.std() / np.sqrt(repeats) / true_value,
                 "relative_std": values.std() / true_value,
                 "relative_grad_error": float(gerr.mean()) / true_norm})
    fns[f"top{k}"] = jax.jit(jax.value_and_grad(
        lambda h, w, rh, rw, k=k: jnp.sum(full_kl.topk_position_kl(
            jax.random.PRNGKey(1), h, w, rh, rw, k=k, num_samples=tail_samples,
            chunk_size=chunk)), argnums=(0, 1)))
  times = _timed(fns, (h, w, rh, rw), reps)
  for row in rows:
    row["time_s"] = times[f"top{row['k']}"]
    row["time_ratio_to_exact"] = times[f"top{row['k']}"] / times["exact"]
  return {"shape": {"B": b, "T": t, "D": d, "V": v, "chunk": chunk, "tail_samples": tail_samples,
                    "repeats": repeats, "grad_repeats": grad_repeats, "reps": reps},
          "device": jax.devices()[0].device_kind, "mean_entropy_nats": entropy,
          "exact_kl_sum": true_value, "exact_time_s": times["exact"], "rows": rows}


def table(res) -> str:
  s = res["shape"]
  lines = [f"V = {s['V']:,}, B×T = {s['B']}×{s['T']}, D = {s['D']}, chunk {s['chunk']}, "
           f"{s['tail_samples']} tail draw(s) a position, {s['repeats']} repeats; "
           f"mean entropy {res['mean_entropy_nats']:.2f} nats, Σ_t KL_t = "
           f"{res['exact_kl_sum']:.4f}; device {res['device']}",
           "",
           "| k | top-k mass | relative bias (± s.e.) | relative std | relative grad error | "
           "time (s) | time / exact |",
           "|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    lines.append(f"| {r['k']} | {r['top_k_mass']:.3f} | {r['relative_bias']:.2e} "
                 f"(± {r['relative_bias_stderr']:.1e}) | {r['relative_std']:.3f} | "
                 f"{r['relative_grad_error']:.3f} | {r['time_s']:.3f} | "
                 f"{r['time_ratio_to_exact']:.2f}× |")
  lines.append(f"| exact | 1 | 0 | 0 | 0 | {res['exact_time_s']:.3f} | 1.00× |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a small smoke run; writes nothing")
  p.add_argument("--out", default=os.path.join(HERE, "results"), help="where the full run writes")
  args = p.parse_args()
  if args.quick:
    res = run(b=2, t=8, d=32, v=4096, ks=(8, 64, 512), repeats=20, grad_repeats=5, reps=2,
              chunk=8, tail_samples=1)
  else:
    res = run(b=4, t=16, d=64, v=151_936, ks=(8, 64, 512), repeats=400, grad_repeats=50, reps=7,
              chunk=32, tail_samples=1)
  text = table(res)
  print(text)
  if not args.quick:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "topk_tail.json"), "w") as f:
      json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "topk_tail.md"), "w") as f:
      f.write("Command: `python benchmarks/topk_tail.py`\n\n" + text + "\n")


if __name__ == "__main__":
  main()
