"""kljax, TRL 1.16 and tunix 0.1.7 side by side: one GRPO iteration, the sampler, the update.

  pip install -e ".[bench]"    # TRL 1.16.0 and google-tunix 0.1.7 (with kljax's jax and flax)
  flock /tmp/kljax-heavy.lock python benchmarks/vs_peers.py [--layers L] [--iters N] [--json FILE]

Same shape and settings on every side: qwen2.5-0.5b's (vocabulary 151,936, d 896, 14 heads, 2 KV
heads, MLP 4,864, tied embeddings; `--layers` of its 24), random weights, float32 weights and
compute, one CPU device (XLA) / the process's threads (PyTorch); 2 prompts × G=4 completions of 32
new tokens after 16-token prompts, temperature 1, β = 0.04 with a reference model, one AdamW step
per iteration. Each side runs in its own process (`peer_kljax.py`, `peer_trl.py`,
`peer_tunix.py`: two 0.5B models with AdamW do not fit this machine twice), `--rounds` times in
alternation (round r starts with the r-th side), each process timing `--iters` iterations after an
untimed warm-up; every figure is the median over all rounds (tunix's process reports its own
medians: the median of those), with wall and CPU seconds (user +
system). Per side: the GRPO iteration, the sampler's tokens/s (HF `generate` is TRL's), and the
update (reference pass + policy forward + backward + optimizer); the machine's float32 matmul
peak is measured by each process (XLA's and torch's).

Targets (ratios of one run): GRPO iteration ≤ 0.7× TRL's; update ≤ tunix's; sampler ≥ tunix's
tokens/s and ≥ 1.5× HF generate's; kljax's update ≥ 50% of XLA's matmul peak (analytic FLOPs:
2·(matmul parameters)·tokens a forward pass, ×4 for reference + forward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIDES = ("kljax", "trl", "tunix")
SCRIPTS = {"kljax": "peer_kljax.py", "trl": "peer_trl.py", "tunix": "peer_tunix.py"}
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 2, 4, 16, 32


def _layers(args) -> int:
  from kljax import models

  return args.layers or models.preset(args.preset).num_layers


def _child(side: str, args) -> dict:
  argv = [sys.executable, os.path.join(HERE, SCRIPTS[side]), "--layers", str(_layers(args)),
          "--iters", str(args.iters), "--prompts", str(PROMPTS), "--group", str(GROUP),
          "--prompt_len", str(PROMPT_LEN), "--new_tokens", str(NEW_TOKENS)]
  if side != "tunix":
    argv += ["--preset", args.preset]
  if side == "kljax":
    argv += ["--data_dir", args.data_dir, "--rollout_dtype", args.rollout_dtype]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device
  t = time.perf_counter()
  out = subprocess.run(argv, capture_output=True, text=True, env=env)
  if out.returncode:
    raise SystemExit(f"the {side} side failed:\n{out.stderr[-4000:]}")
  print(f"  {side}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _as_list(x) -> list:
  return list(x) if isinstance(x, (list, tuple)) else [x]


def run(args) -> dict:
  sides = [s.strip() for s in args.sides.split(",")]
  unknown = set(sides) - set(SIDES)
  if unknown:
    raise SystemExit(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}.")
  raw: dict[str, list[dict]] = {s: [] for s in sides}
  for r in range(args.rounds):
    order = sides[r % len(sides):] + sides[:r % len(sides)]
    print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
    for side in order:
      raw[side].append(_child(side, args))

  med = lambda runs, key: statistics.median(v for run in runs for v in _as_list(run[key]))  # noqa: E731
  if any(run["layers"] != _layers(args) for runs in raw.values() for run in runs):
    raise SystemExit(f"a side ran another depth than {_layers(args)} layers: {raw}")
  result: dict = {"shape": {"preset": args.preset, "layers": _layers(args),
                            "prompts": PROMPTS, "group": GROUP, "prompt_len": PROMPT_LEN,
                            "new_tokens": NEW_TOKENS, "dtype": "float32",
                            "kljax_rollout_dtype": args.rollout_dtype},
                  "timed_iterations_per_side": args.rounds * args.iters,
                  "cpu_cores": os.cpu_count(), "matmul_peak_gflops": {}}
  for side, runs in raw.items():
    tokens_per_s = [t / s for run in runs for t, s in zip(
        _as_list(run.get("sampler_tokens", run.get("sampler_tokens_per_s", 0) * run["sampler_s"])),
        _as_list(run["sampler_s"]))]
    result[side] = {
        "iteration_s": med(runs, "iteration_s"), "cpu_s": med(runs, "cpu_s"),
        "update_s": med(runs, "update_s"), "sampler_tokens_per_s": statistics.median(tokens_per_s),
        "sampler_cpu_s": med(runs, "sampler_cpu_s")}
    if "matmul_peak_flops" in runs[0]:  # kljax's process measures XLA's, TRL's torch's
      result["matmul_peak_gflops"][{"kljax": "xla", "trl": "torch"}[side]] = (
          med(runs, "matmul_peak_flops") / 1e9)
  if "trl" in raw:  # HF generate is the TRL process's sampler
    result["hf_generate"] = {"sampler_tokens_per_s": result["trl"].pop("sampler_tokens_per_s")}
    result["trl"]["sampler_tokens_per_s"] = None  # TRL samples with generate: see hf_generate
  if "kljax" in raw:
    from kljax import models

    cfg = models.preset(args.preset).replace(num_layers=_layers(args))
    length = statistics.median(v for run in raw["kljax"] for v in run["length"])
    matmul_params = cfg.num_params() - (2 * cfg.num_layers + 1) * cfg.d_model
    flops = 4 * 2 * matmul_params * PROMPTS * GROUP * (PROMPT_LEN + length)
    result["kljax"]["update_fraction_of_peak"] = (
        flops / result["kljax"]["update_s"] / (result["matmul_peak_gflops"]["xla"] * 1e9))
  result["targets"] = _targets(result)
  return result


def _targets(r: dict) -> list[dict]:
  """[{name, value, target, met}] for every target whose sides ran."""
  out = []

  def add(name, value, target, higher_is_better):
    out.append({"name": name, "value": value, "target": target,
                "bound": "≥" if higher_is_better else "≤",
                "met": value >= target if higher_is_better else value <= target})

  k = r.get("kljax")
  if k and "trl" in r:
    add("GRPO iteration, kljax / TRL", k["iteration_s"] / r["trl"]["iteration_s"], 0.7, False)
  if k and "tunix" in r:
    add("update, kljax / tunix", k["update_s"] / r["tunix"]["update_s"], 1.0, False)
    add("sampler tokens/s, kljax / tunix",
        k["sampler_tokens_per_s"] / r["tunix"]["sampler_tokens_per_s"], 1.0, True)
  if k and "hf_generate" in r:
    add("sampler tokens/s, kljax / HF generate",
        k["sampler_tokens_per_s"] / r["hf_generate"]["sampler_tokens_per_s"], 1.5, True)
  if k:
    add("kljax update, fraction of XLA's matmul peak", k["update_fraction_of_peak"], 0.5, True)
  return out


def render(r: dict) -> str:
  s = r["shape"]
  lines = [f"benchmarks/vs_peers.py: {s['preset']} shape with {s['layers']} layers, {s['dtype']}, "
           f"{s['prompts']} prompts × G={s['group']} × {s['new_tokens']} new tokens after "
           f"{s['prompt_len']}-token prompts; {r['timed_iterations_per_side']} timed iterations a "
           f"side (medians); {r['cpu_cores']} CPU cores; matmul peak "
           + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["matmul_peak_gflops"].items()), "",
           f"{'side':12s} {'iteration s':>12s} {'CPU s':>8s} {'update s':>9s} {'sampler tok/s':>14s}"]
  for side in (*SIDES, "hf_generate"):
    if side in r:
      x = r[side]
      cell = lambda key, w, d: (f"{x[key]:{w}.{d}f}" if x.get(key) is not None  # noqa: E731
                                else f"{'–':>{w}}")
      lines.append(f"{side:12s} {cell('iteration_s', 12, 2)} {cell('cpu_s', 8, 1)} "
                   f"{cell('update_s', 9, 2)} {cell('sampler_tokens_per_s', 14, 1)}")
  lines.append("")
  for t in r["targets"]:
    lines.append(f"{t['name']}: {t['value']:.2f} (target {t['bound']} {t['target']:.2f}) "
                 + ("met" if t["met"] else "MISSED"))
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's 24)")
  p.add_argument("--iters", type=int, default=2, help="timed iterations per side and round")
  p.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
  p.add_argument("--sides", default=",".join(SIDES))
  p.add_argument("--preset", default="qwen2.5-0.5b", help="kljax's and TRL's shape (tunix: 0.5b)")
  p.add_argument("--rollout_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="kljax's sampler dtype")
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  p.add_argument("--json", default="", help="write the figures to this file")
  args = p.parse_args(argv)
  result = run(args)
  result["command"] = "python benchmarks/vs_peers.py " + " ".join(argv or sys.argv[1:])
  print(render(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
