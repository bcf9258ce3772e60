"""Peak memory and time: naive vs chunked log-prob + entropy + exact KL, forward+backward.

  python benchmarks/logprobs.py                       # V=151,936, d=896, B×T up to 8×1024
  python benchmarks/logprobs.py --quick               # small smoke run

For each token count it reports XLA's compiled memory (temporaries + arguments + outputs) of both
versions; where they fit in `--max-gb`, the measured peak RSS of a fresh process running each one
(so one's memory never counts against the other), and the median of `--reps` timings taken in one
process that alternates the two rep by rep (so machine noise hits both alike).
Target: ≥4× lower peak memory at ≤1.3× the time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _build(kind, b, t, d, v, chunk):
  import jax
  import jax.numpy as jnp

  from kljax import logprobs

  def stats(h, w, y, rh, rw):
    if kind == "naive":
      return logprobs.naive_token_stats(h, w, y, ref_hidden_btd=rh, ref_unembed_dv=rw)
    return logprobs.token_stats(h, w, y, ref_hidden_btd=rh, ref_unembed_dv=rw, chunk_size=chunk)

  def loss(h, w, y, rh, rw):
    s = stats(h, w, y, rh, rw)
    return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy) + jnp.sum(s.reverse_kl) + jnp.sum(s.forward_kl)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32))
  return fn, shapes


def compiled_bytes(kind, b, t, d, v, chunk) -> int:
  fn, shapes = _build(kind, b, t, d, v, chunk)
  m = fn.lower(*shapes).compile().memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def _args(b, t, d, v):
  import jax

  k = jax.random.split(jax.random.PRNGKey(0), 5)
  return (jax.random.normal(k[0], (b, t, d)), 0.03 * jax.random.normal(k[1], (d, v)),
          jax.random.randint(k[2], (b, t), 0, v), jax.random.normal(k[3], (b, t, d)),
          0.03 * jax.random.normal(k[4], (d, v)))


def memory_worker(kind, b, t, d, v, chunk) -> dict:
  """Peak RSS of a fresh process that compiles and runs one version once."""
  import jax

  fn, _ = _build(kind, b, t, d, v, chunk)
  jax.block_until_ready(fn(*_args(b, t, d, v)))
  return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def timing_worker(b, t, d, v, chunk, reps) -> dict:
  """Both versions in one process, alternating rep by rep: noise hits both alike."""
  import jax

  fns = {k: _build(k, b, t, d, v, chunk)[0] for k in ("naive", "chunked")}
  args = _args(b, t, d, v)
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in times.items()}


def _run(*worker_args) -> dict:
  out = subprocess.run([sys.executable, __file__, "--worker", *map(str, worker_args)],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vocab", type=int, default=151_936)
  p.add_argument("--dim", type=int, default=896)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lengths", default="256,512,1024")
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--max-gb", type=float, default=14.0,
                 help="run naive (and time the pair) only where XLA's estimate of both fits in this")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    kind, *nums = args.worker
    nums = list(map(int, nums))
    out = timing_worker(*nums) if kind == "time" else memory_worker(kind, *nums)
    print(json.dumps(out))
    return
  if args.quick:
    args.vocab, args.dim, args.lengths, args.chunk, args.reps = 4096, 64, "128", 64, 1

  print(f"V={args.vocab}, d={args.dim}, B={args.batch}, chunk={args.chunk}; value_and_grad of "
        f"log-prob + entropy + reverse KL + forward KL w.r.t. hidden states and unembedding")
  print(f"{'B×T':>8s} | {'XLA naive GB':>12s} {'XLA chunked GB':>14s} {'ratio':>6s} | "
        f"{'RSS naive GB':>12s} {'RSS chunked GB':>14s} {'ratio':>6s} | {'naive s':>8s} "
        f"{'chunked s':>9s} {'time ratio':>10s}")
  results = []
  for t in map(int, args.lengths.split(",")):
    shape = (args.batch, t, args.dim, args.vocab, args.chunk)
    xla = {k: compiled_bytes(k, *shape) for k in ("naive", "chunked")}
    row = {"tokens": args.batch * t, "xla_bytes": xla}
    runs = {"chunked": _run("chunked", *shape)}
    if xla["naive"] <= args.max_gb * 1e9:
      runs["naive"] = _run("naive", *shape)
    if xla["naive"] + xla["chunked"] <= args.max_gb * 1e9:
      runs["time"] = _run("time", *shape, args.reps)
    row["runs"] = runs
    results.append(row)
    gb = lambda x: f"{x / 1e9:.2f}"
    line = (f"{args.batch}×{t:<6d} | {gb(xla['naive']):>12s} {gb(xla['chunked']):>14s} "
            f"{xla['naive'] / xla['chunked']:6.1f} | ")
    c = runs["chunked"]["peak_rss"]
    if "naive" in runs:
      n = runs["naive"]["peak_rss"]
      line += f"{gb(n):>12s} {gb(c):>14s} {n / c:6.1f} | "
    else:
      line += f"{'(too big)':>12s} {gb(c):>14s} {'':>6s} | "
    if "time" in runs:
      tn, tc = runs["time"]["naive"], runs["time"]["chunked"]
      line += f"{tn:8.2f} {tc:9.2f} {tc / tn:10.2f}"
    else:
      line += f"{'(too big)':>8s}"
    print(line, flush=True)
  print("targets: memory ratio ≥ 4, time ratio ≤ 1.3")


if __name__ == "__main__":
  main()
