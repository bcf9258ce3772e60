"""Every benchmark runs end to end in its --quick mode (the figures themselves come from full runs)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,expect",
    [
        ("kl_terms.py", ["--terms", "k2_as_loss,k3_as_loss+clipped,k1_in_reward_rtg"], "(PPO+KL)/PPO"),
        ("logprobs.py", [], "targets: memory ratio"),
        ("sampler.py", [], "speed-up"),
        ("train_step.py", [], "fraction"),
        ("grpo_step.py", ["--data_dir", "{tmp}"], "seconds per iteration"),
        ("checkpoint.py", ["--dir", "{tmp}"], "kljax/orbax"),
        ("phases.py", ["--data_dir", "{tmp}"], "minor faults"),
        ("vllm_engine.py", [], "ratios: vllm_over_jax"),
    ],
)
def test_benchmark_quick(script, args, expect, tmp_path):
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device
  out = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--quick", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert expect in out.stdout


@pytest.mark.slow
def test_gpu_benchmark_script_runs_quick_on_cpu():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(["bash", os.path.join("benchmarks", "gpu.sh"), "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "bf16 matmul peak" in out.stdout and "MFU" in out.stdout
  assert "vs_peers kljax side: ran" in out.stdout


@pytest.mark.slow
def test_vs_peers_runs_its_kljax_side_and_writes_the_json(tmp_path):
  """The orchestration (rounds, medians, targets, JSON) on kljax's side at one small layer; the
  peers' sides need the `bench` extra and run in the committed benchmark."""
  import json

  out = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "vs_peers.py"), "--sides", "kljax", "--preset",
       "small", "--layers", "1", "--iters", "1", "--rounds", "2", "--data_dir", str(tmp_path),
       "--json", str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["timed_iterations_per_side"] == 2 and r["shape"]["layers"] == 1
  k = r["kljax"]
  assert 0 < k["update_s"] < k["iteration_s"] and k["cpu_s"] > 0 and k["sampler_tokens_per_s"] > 0
  assert [t["name"] for t in r["targets"]] == ["kljax update, fraction of XLA's matmul peak"]
  assert "kljax" in out.stdout and ("MISSED" in out.stdout or "met" in out.stdout)
