"""A memory plan for a GRPO run at a real shape, on paper: AOT compiles on simulated CPU devices.

  python -m experiments.plan --preset qwen2.5-7b --devices 64 --fsdp 64 [--tensor T] [--json FILE]

lowers and compiles, with abstract inputs (`jax.ShapeDtypeStruct`s carrying the real shardings) on
N simulated CPU devices, the real GRPO update step (`kljax.train.grpo.update`, on-policy: policy and
reference forward, backward, AdamW) and the real sampler (`kljax.sampling`, prefill + decode loop),
and prints per device: parameters, optimizer state, reference parameters, gradients and KV cache
(analytic, from the shardings), the temporaries XLA allocates (`memory_analysis()`), and FLOPs per
update (`cost_analysis()`). The update donates the parameters and the optimizer state (as the
trainer's does), so its peak, arguments + outputs − aliased + temporaries, holds them once.

A CPU compile *estimates* accelerator memory, it does not measure it: XLA:CPU's buffer assignment
and fusion differ from XLA:TPU's and XLA:GPU's, so treat temporaries as a guide (usually an upper
bound) and leave headroom.

`--table FILE` runs every preset × device count of the scale table in docs/scale.md (one subprocess
per device count, since the count is fixed when JAX starts) and writes it as markdown;
`python -m experiments.readme` then copies experiments/results/plan/table.md into docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GIB = 1 << 30
CAPACITIES = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80))  # GiB per chip
TABLE_PRESETS = ("qwen2.5-0.5b", "qwen2.5-math-1.5b", "qwen2.5-7b", "llama-3.1-8b")
TABLE_DEVICES = (8, 32, 64, 256)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="qwen2.5-0.5b", help="a kljax.models preset")
  p.add_argument("--devices", type=int, default=8, help="simulated devices (N)")
  p.add_argument("--fsdp", type=int, default=-1, help="fsdp axis size (-1: the rest)")
  p.add_argument("--tensor", type=int, default=1, help="tensor axis size")
  p.add_argument("--data", type=int, default=1, help="data axis size")
  p.add_argument("--batch", type=int, default=0,
                 help="completions per update (0: 2 per device, at least 8)")
  p.add_argument("--rollout_batch", type=int, default=0,
                 help="completions sampled at once (0: --batch)")
  p.add_argument("--prompt_len", type=int, default=256, help="prompt tokens a sequence")
  p.add_argument("--new_tokens", type=int, default=512, help="completion tokens a sequence")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param_dtype", default="float32", help="master-weight dtype")
  p.add_argument("--remat", action="store_true", help="rematerialize blocks in the backward pass")
  p.add_argument("--embedding_split", choices=("auto", "vocab", "embed"), default="auto",
                 help="which embedding dimension fsdp splits (the trainer's mesh.embedding_split; "
                      "auto: by the update's size)")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
  p.add_argument("--vocab_multiple", type=int, default=1,
                 help="pad the stored vocabulary to a multiple of this (ModelConfig.vocab_multiple), "
                      "so that the fsdp axis divides it")
  p.add_argument("--no_batch_constraint", action="store_true",
                 help="compile without jax.set_mesh, so without kljax's activation sharding "
                      "constraint (shows what it saves)")
  p.add_argument("--json", metavar="FILE", help="write the plan as JSON")
  p.add_argument("--table", metavar="FILE", help="write the scale table of docs/scale.md (all presets)")
  p.add_argument("--only", nargs="+", metavar="PRESET@DEVICES", default=(),
                 help="with --table: recompute only these rows of the existing FILE")
  return p


def plan(args: argparse.Namespace) -> dict:
  """Compiles the update and the sampler of `args` and returns the plan (JAX already started)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from kljax import models, sharding
  from kljax.sampling import _sample
  from kljax.train import grpo
  from kljax.train.config import grpo_tiny
  from kljax.train.options import Options

  mesh = sharding.make_mesh(data=args.data, fsdp=args.fsdp, tensor=args.tensor)
  cfg = models.preset(args.preset, dtype=args.dtype, param_dtype=args.param_dtype,
                      remat=args.remat, vocab_multiple=args.vocab_multiple)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  batch = args.batch or max(8, 2 * mesh.size)
  c = grpo_tiny()
  c.batch_size, c.data.max_prompt_len, c.rollout.max_new_tokens = batch, args.prompt_len, args.new_tokens
  c.model.preset = args.preset
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  graphdef, state = nnx.split(models.abstract(cfg))
  rules = sharding.rules_for(batch * (args.prompt_len + args.new_tokens), cfg.vocab_size,
                             args.embedding_split)
  shardings = sharding.state_shardings(state, mesh, rules=rules)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  params = jax.tree.map(lambda s, v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        shardings, state, is_leaf=is_var)
  setup = grpo.bare_setup(Options.of(c), graphdef, mesh)  # the trainer's optimizer and loss
  optimizer = setup.optimizer
  is_sds = lambda x: isinstance(x, (jax.ShapeDtypeStruct, jax.sharding.NamedSharding))  # noqa: E731
  # Adam's moments are placed like the parameters (as `optimizer.init` of placed parameters does).
  opt_state = optax.tree_map_params(
      optimizer, lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(optimizer.init, params), shardings,
      transform_non_params=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
      is_leaf=is_sds)
  beta_value = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  bs = sharding.batch_sharding(mesh)
  p_, n_ = args.prompt_len, args.new_tokens
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)  # noqa: E731
  rollout = args.rollout_batch or batch
  batch_in = {"tokens": sds((batch, p_ + n_), jnp.int32),
              "attn_mask": sds((batch, p_ + n_), jnp.bool_),
              "mask": sds((batch, n_), jnp.bool_), "advantages": sds((batch, n_), jnp.float32)}
  update = grpo.compile_fns(setup)["update"]  # the trainer's jitted update
  import contextlib

  # Under the mesh, activations keep their batch sharding (sharding.constrain_batch).
  in_mesh = contextlib.nullcontext if args.no_batch_constraint else functools.partial(jax.set_mesh,
                                                                                        mesh)
  with in_mesh():
    compiled = update.lower(params, opt_state, beta_value, batch_in, params).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)  # noqa: E731
  with in_mesh():
    sampler = _sample.lower(
        graphdef, params, sds((rollout, p_), jnp.int32), sds((rollout, p_), jnp.bool_), key,
        scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32),
        max_new_tokens=n_, top_k=0, greedy=False, nucleus=False, samples_per_prompt=1,
        per_layer=all(a.sharding.is_fully_replicated for a in jax.tree.leaves(params))).compile()
  smem = sampler.memory_analysis()

  def per_device(tree) -> int:
    return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(tree)))

  param_count = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
  p_bytes = per_device(params)
  b_dev = rollout // int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  kv_split = mesh.shape["tensor"] if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else 1
  kv = (2 * cfg.num_layers * max(b_dev, 1) * (p_ + n_) * (cfg.num_kv_heads // kv_split)
        * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize)
  update_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes)
  sampler_peak = (smem.argument_size_in_bytes + smem.output_size_in_bytes
                  - smem.alias_size_in_bytes + smem.temp_size_in_bytes)
  # While sampling the optimizer state and the reference stay resident too.
  sampler_peak += per_device(opt_state) + p_bytes
  total = max(update_peak, sampler_peak)
  unsharded = [jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_leaves_with_path(params)
               if a.size >= 1 << 20 and a.sharding.is_fully_replicated and mesh.size > 1]
  return {
      "preset": args.preset, "devices": mesh.size,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch": batch, "rollout_batch": rollout, "prompt_len": p_, "new_tokens": n_, "dtype": cfg.dtype,
      "param_dtype": cfg.param_dtype, "remat": bool(cfg.remat),
      "vocab_multiple": cfg.vocab_multiple, "padded_vocab": cfg.padded_vocab,
      "batch_constraint": not args.no_batch_constraint,
      "embedding_split": "vocab" if rules == sharding.DEFAULT_RULES else "embed",
      "param_count": param_count,
      "per_device_bytes": {
          "params": p_bytes, "optimizer": per_device(opt_state), "reference": p_bytes,
          "gradients": p_bytes, "kv_cache": int(kv), "temp": int(mem.temp_size_in_bytes),
          "sampler_temp": int(smem.temp_size_in_bytes), "total": int(total)},
      "compiled": {"update": {"argument": mem.argument_size_in_bytes,
                              "output": mem.output_size_in_bytes,
                              "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
                              "peak": int(update_peak)},
                   "sampler": {"argument": smem.argument_size_in_bytes,
                               "output": smem.output_size_in_bytes,
                               "temp": smem.temp_size_in_bytes, "peak": int(sampler_peak)}},
      "flops_per_step": float(cost.get("flops", float("nan"))) * mesh.size,
      "replicated_large_params": unsharded,
      "fits": {name: total <= gib * GIB for name, gib in CAPACITIES},
  }


def render(p: dict) -> str:
  b = p["per_device_bytes"]
  g = lambda x: f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / (1 << 20):.2f} MiB"  # noqa: E731
  lines = [
      f"{p['preset']}: {p['param_count'] / 1e9:.2f}B parameters on {p['devices']} simulated CPU "
      f"devices, mesh {p['mesh']}, update batch {p['batch']} (rollout {p['rollout_batch']}) × "
      f"({p['prompt_len']} + {p['new_tokens']}) tokens, {p['param_dtype']} weights, {p['dtype']} compute, remat {p['remat']}"
      + (f", vocabulary padded to {p['padded_vocab']}" if p.get("vocab_multiple", 1) > 1 else "")
      + (f", embedding split over fsdp by {p['embedding_split']}" if "embedding_split" in p else ""),
      "per device (analytic from the shardings, except temporaries: XLA:CPU's compiled estimate, "
      "not a TPU/GPU measurement):",
      f"  parameters {g(b['params'])}, optimizer {g(b['optimizer'])}, reference "
      f"{g(b['reference'])}, gradients {g(b['gradients'])}, KV cache {g(b['kv_cache'])}",
      f"  update temporaries {g(b['temp'])}, sampler temporaries {g(b['sampler_temp'])}; the "
      f"update donates {g(p['compiled']['update']['alias'])} (parameters and optimizer state, "
      "updated in place: counted once in its peak)",
      f"  peak (max of update and sampling) {g(b['total'])}; FLOPs per update "
      f"{p['flops_per_step']:.3g}",
      "  fits: " + ", ".join(f"{name} ({gib} GiB) {'yes' if p['fits'][name] else 'NO'}"
                             for name, gib in CAPACITIES),
  ]
  if p["replicated_large_params"]:
    lines.append("  replicated (a dimension does not divide the mesh): "
                 + ", ".join(p["replicated_large_params"]))
  return "\n".join(lines)


def _run_one(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  if jax.device_count() != args.devices:
    raise SystemExit(f"error: JAX started with {jax.device_count()} devices, not --devices "
                     f"{args.devices} (set before JAX is imported).")
  try:
    result = plan(args)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(render(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


def _row(r: dict) -> str:
  b = r["per_device_bytes"]
  return (f"| {r['preset']} | {r['devices']} | {r['batch']} | {'on' if r['remat'] else 'off'} "
          f"| {b['params'] / GIB:.2f} | {b['optimizer'] / GIB:.2f} | {b['temp'] / GIB:.2f} "
          f"| {b['total'] / GIB:.2f} | "
          + " | ".join("fits" if r["fits"][name] else "no" for name, _ in CAPACITIES) + " |")


def _table(path: str, args: argparse.Namespace) -> None:
  """Every preset × device count; the vocabulary padded to a multiple of the device count (a
  no-op wherever the device count already divides it). `--only` recomputes the rows named."""
  import tempfile

  only = {tuple(o.rsplit("@", 1)) for o in args.only}
  keys = [(preset, str(n)) for n in TABLE_DEVICES for preset in TABLE_PRESETS]
  unknown = only - set(keys)
  if unknown:
    raise SystemExit(f"error: --only {sorted(unknown)} is not a row of the table (PRESET@DEVICES "
                     f"with devices in {TABLE_DEVICES}).")
  old = {}
  if only:
    with open(path) as f:
      for line in f.read().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        old[(cells[0], cells[1])] = line
  rows = []
  for preset, n in keys:
    if only and (preset, n) not in only:
      rows.append(old[(preset, n)])
      continue
    for extra in ([], ["--remat"]):
      with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "experiments.plan", "--preset", preset, "--devices", n,
               "--fsdp", n, "--prompt_len", str(args.prompt_len), "--new_tokens",
               str(args.new_tokens), "--vocab_multiple", n, "--json", f.name, *extra]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        with open(f.name) as fh:
          result = json.load(fh)
      if all(result["fits"].values()):
        break
    rows.append(_row(result))
  out = ["| preset | devices (fsdp) | batch | remat | params/dev | optimizer/dev | update temp "
         "| peak/dev | TPU v5e 16 GiB | TPU v4 32 GiB | H100 80 GiB |", "|---" * 11 + "|", *rows]
  with open(path, "w") as f:
    f.write("\n".join(out) + "\n")
  print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = _parser().parse_args(argv)
  if args.table:
    _table(args.table, args)
  else:
    _run_one(argv)


if __name__ == "__main__":
  main()
