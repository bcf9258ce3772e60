"""GRPO at qwen2.5-0.5b's real shape on 8 simulated CPU devices: save, SIGKILL, resume.

  flock /tmp/kljax-heavy.lock python benchmarks/real_shape.py [--layers N] [--out FILE]

Three phases, each its own process (so each has its own peak memory):
  init    a randomly initialised `qwen2.5-0.5b` (vocabulary 151,936, tied embeddings; `--layers`
          fewer for a quick check) written as an HF safetensors checkpoint (`kljax.models.export_hf`);
  killed  `kljax.train.grpo.train` from that checkpoint (`model.init`), mesh fsdp=8, bfloat16
          compute, float32 master weights, remat on, `--steps` iterations of `--prompts` × G=`--group`
          × `--new_tokens` new tokens, a checkpoint every `--steps - 1` steps (waited for, not left
          in the background); SIGKILL as soon as that checkpoint is on disk (the last iteration is
          then under way);
  resumed the same command again: it restores the checkpoint and runs the last iteration.

Reported per phase: wall time, peak host memory (the child's `ru_maxrss` from `os.wait4`, so the
killed process counts too), and from the trainer's metrics the seconds of each iteration's
rollout, statistics and update. The killed phase also asserts that every device holds ≈ 1/8 of the
parameters (`kljax.sharding.bytes_per_device`; only the norm vectors and q/k/v biases are
replicated).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

# Runnable as a script from anywhere, the kljax beside it first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESET = "qwen2.5-0.5b"
DEVICES = 8


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
  p.add_argument("--preset", default=PRESET, help="a smaller preset checks the script quickly")
  p.add_argument("--steps", type=int, default=3, help="GRPO iterations (a checkpoint before the last)")
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="master weights (and Adam's moments, which follow them)")
  p.add_argument("--data_dir", default="~/.cache/kljax/tfds", help="the TFDS directory")
  p.add_argument("--workdir", default="", help="(default: a temporary directory)")
  p.add_argument("--out", default="", help="also write the report to this file")
  p.add_argument("--child", choices=("init", "train"), help=argparse.SUPPRESS)
  return p


def _config(args, init: str):
  from kljax.train.config import grpo_tiny

  c = grpo_tiny()
  c.num_steps, c.checkpoint_every = args.steps, args.steps - 1
  c.batch_size = args.prompts * args.group
  c.rollout.group_size, c.rollout.max_new_tokens = args.group, args.new_tokens
  c.data.data_dir = args.data_dir
  c.model.preset, c.model.init = args.preset, init
  c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", args.param_dtype, True
  c.mesh.data, c.mesh.fsdp, c.mesh.devices = 1, DEVICES, DEVICES
  c.metrics.tensorboard = False
  return c


def replicated_bytes(c) -> int:
  """Bytes of the parameters with no dimension on fsdp: the norm vectors ([L, D] twice and [D]) and
  the q/k/v biases ([L, H·Hd + 2·K·Hd]); every other parameter has a vocab or embed axis."""
  return c.jnp_param_dtype.itemsize * (
      (2 * c.num_layers + 1) * c.d_model
      + (c.num_layers * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim if c.qkv_bias else 0))


def expected_per_device(c) -> int:
  """Parameter bytes per device under fsdp=8, from the shapes alone (≈ total/8)."""
  total = c.jnp_param_dtype.itemsize * c.num_params()
  return (total - replicated_bytes(c)) // DEVICES + replicated_bytes(c)


def _child_init(args, workdir: str) -> None:
  from kljax import models

  cfg = models.preset(args.preset)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  model = models.create(cfg, seed=0)
  models.export_hf(model, os.path.join(workdir, "init"))
  print(json.dumps({"param_count": models.count_params(model)}))


def _child_train(args, workdir: str) -> None:
  from kljax.train import grpo
  from kljax.train.checkpoint import Checkpointer

  save = Checkpointer.maybe_save

  def save_and_wait(self, step, state, *, force=False):
    # The checkpoint is on disk before the next iteration starts, so the parent's SIGKILL lands
    # inside that iteration (with an asynchronous save, a short iteration could finish first).
    saved = save(self, step, state, force=force)
    if saved:
      self.wait()
    return saved

  Checkpointer.maybe_save = save_and_wait

  config = _config(args, os.path.join(workdir, "init"))
  # Nothing here keeps the warm start: a resume frees it once the checkpoint is restored.
  history = grpo.train(config, workdir, init_model=_warm_start(config, workdir), progress=False)
  print(json.dumps({"steps_run": [int(r["step"]) for r in history]}), flush=True)


def _warm_start(config, workdir: str):
  """The HF checkpoint loaded and sharded over fsdp, each device holding ≈ 1/8 (asserted)."""
  import jax
  from flax import nnx

  from kljax import sharding
  from kljax.train.sft import initial_model

  t0 = time.perf_counter()
  model = initial_model(config, os.path.join(workdir, "unused"))
  load_s = time.perf_counter() - t0
  mesh = sharding.make_mesh(data=1, fsdp=DEVICES, tensor=1)
  model = sharding.shard_module(model, mesh)
  state = nnx.state(model)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sorted(sharding.bytes_per_device(state).values())
  assert len(per_device) == DEVICES, per_device
  assert per_device[0] == per_device[-1] == expected_per_device(model.config), (per_device, total)
  print(json.dumps({"load_s": load_s, "param_bytes_total": total,
                    "param_bytes_per_device": per_device[-1]}), flush=True)
  return model


def _spawn(args, child: str, workdir: str, log: str, *, kill_when: str | None = None) -> dict:
  """Runs a child phase; returns its wall time, peak RSS, exit status and JSON lines."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  argv = [sys.executable, os.path.abspath(__file__), "--child", child, "--workdir", workdir,
          *[f"--{k}={getattr(args, k)}" for k in ("layers", "preset", "param_dtype", "steps",
                                                  "prompts", "group", "new_tokens", "data_dir")]]
  t0 = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    killed_at = None
    while True:  # os.wait4, not Popen.poll, so that the child's rusage is ours to read
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if kill_when is not None and killed_at is None and os.path.exists(kill_when):
        proc.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter() - t0
      time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  with open(log) as f:
    text = f.read()
  lines = [json.loads(s) for s in text.splitlines() if s.startswith("{")]
  info = {k: v for line in lines for k, v in line.items()}
  code = proc.returncode
  if kill_when is None and code != 0:
    raise SystemExit(f"phase {child} failed with status {code}:\n{text[-3000:]}")
  return {"wall_s": wall, "killed_at_s": killed_at, "exit": code,
          "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, **info, "log": text}


def main(argv=None) -> dict | None:
  args = _parser().parse_args(argv)
  if args.steps < 2:
    raise SystemExit("error: --steps must be >= 2 (a checkpoint, then an iteration to kill).")
  workdir = args.workdir or tempfile.mkdtemp(prefix="kljax-real-shape-")
  os.makedirs(workdir, exist_ok=True)
  if args.child == "init":
    return _child_init(args, workdir)
  if args.child == "train":
    return _child_train(args, workdir)

  from kljax.train.metrics import read_jsonl

  ckpt = os.path.join(workdir, "checkpoints", str(args.steps - 1))
  init = _spawn(args, "init", workdir, os.path.join(workdir, "init.log"))
  killed = _spawn(args, "train", workdir, os.path.join(workdir, "killed.log"), kill_when=ckpt)
  if killed["killed_at_s"] is None or killed["exit"] != -signal.SIGKILL:
    raise SystemExit(f"the run ended (status {killed['exit']}, peak RSS "
                     f"{killed['peak_rss_gib']:.1f} GiB) before checkpoint {args.steps - 1} "
                     f"appeared:\n{killed['log'][-3000:]}")
  done_before = [int(r["step"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  if done_before != list(range(args.steps - 1)):
    raise SystemExit(f"killed run: metrics of steps {done_before}, expected 0..{args.steps - 2}.")
  resumed = _spawn(args, "train", workdir, os.path.join(workdir, "resumed.log"))
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if [int(r["step"]) for r in rows] != list(range(args.steps)) or resumed["steps_run"] != [
      args.steps - 1]:
    raise SystemExit(f"resume: steps {[r['step'] for r in rows]}, ran {resumed['steps_run']}.")

  from kljax import models

  shape = models.preset(args.preset)
  layers = args.layers or shape.num_layers
  gib = 2**30
  per_dev, total = killed["param_bytes_per_device"], killed["param_bytes_total"]
  out = [
      f"benchmarks/real_shape.py: GRPO at {args.preset}'s shape ({layers} layers, vocabulary "
      f"{shape.vocab_size:,}, tied embeddings: {shape.tie_embeddings}, {init['param_count']:,} parameters), {DEVICES} simulated CPU devices "
      f"(fsdp={DEVICES}), {args.param_dtype} master weights and Adam moments, bfloat16 compute, "
      "remat on",
      f"batch {args.prompts} prompts × G={args.group} × {args.new_tokens} new tokens, "
      f"{args.steps} iterations, checkpoint at step {args.steps - 1}, SIGKILL, resume",
      f"host: {os.cpu_count()} CPU cores; command: python benchmarks/real_shape.py "
      + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
      "",
      f"parameters per device: {per_dev / gib:.4f} GiB of {total / gib:.4f} GiB total "
      f"(total/8 = {total / DEVICES / gib:.4f} GiB; ratio {per_dev * DEVICES / total:.4f})",
      "",
      "phase    wall s   peak RSS GiB   notes",
      f"init     {init['wall_s']:7.1f}   {init['peak_rss_gib']:12.2f}   random init + HF safetensors "
      "export",
      f"killed   {killed['wall_s']:7.1f}   {killed['peak_rss_gib']:12.2f}   HF load "
      f"{killed['load_s']:.1f} s; SIGKILL {killed['killed_at_s']:.1f} s after start, once "
      f"checkpoint {args.steps - 1} was on disk",
      f"resumed  {resumed['wall_s']:7.1f}   {resumed['peak_rss_gib']:12.2f}   HF load "
      f"{resumed['load_s']:.1f} s; restored step {args.steps - 1}, ran step(s) "
      f"{resumed['steps_run']}",
      "",
      "iteration  run      rollout s  stats s  update s  reward  exact KL(π‖π_ref)",
  ]
  for r in rows:
    run = "killed" if r["step"] < args.steps - 1 else "resumed"
    out.append(f"{int(r['step']):9d}  {run:7s}  {r['time_rollout']:9.1f}  {r['time_logprobs']:7.1f}"
               f"  {r['time_update']:8.1f}  {r['reward_mean']:6.3f}  {r['exact_rkl']:.3g}")
  out.append("(the first iteration of each process includes compiling its programs)")
  report = "\n".join(out)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")
  return {"init": init, "killed": killed, "resumed": resumed, "metrics": rows, "report": report}


if __name__ == "__main__":
  main()
