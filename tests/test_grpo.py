"""The GRPO trainer end to end on CPU: config errors, metrics, variants, faults, sharding, resume."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kljax.train import grpo
from kljax.train.checkpoint import CheckpointError, Checkpointer
from kljax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"step", "reward_mean", "exact_rkl", "exact_fkl", "entropy", "loss", "accuracy",
            "length_mean", "clip_fraction", "ppo_kl", "grad_norm", "k1", "k2", "k3",
            "clamped_tokens", "sampler_logprob_gap", "time_rollout", "tokens_per_second"}
TIMING = {"time_rollout", "time_logprobs", "time_update", "tokens_per_second"}


def tiny_config(data_dir, **changes):
  spec = importlib.util.spec_from_file_location("grpo_tiny", os.path.join(REPO, "configs",
                                                                          "grpo_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir = data_dir
  c.batch_size, c.rollout.group_size, c.rollout.max_new_tokens = 16, 4, 3
  c.num_steps, c.checkpoint_every, c.metrics.tensorboard = 2, 1, False
  c.mesh.devices = 1
  c.update_from_flattened_dict(changes)  # {"kl.term": …}
  return c


def child_xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a child process on `devices` CPU devices, with the suite's other flags
  (tests/conftest.py)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def _init(path):
  from kljax import models

  return models.from_hf(path)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"kl.term": "k4_as_loss"}, r"--config.kl.term: unknown KL term 'k4_as_loss'.*'none'"),
        ({"kl.beta": -0.1}, r"--config.kl.beta: must be a finite number >= 0, got -0.1"),
        ({"batch_size": 18}, r"--config.batch_size: 18 completions a step must be a multiple of "
                             r"rollout.group_size \(4\)"),
        ({"rollout.group_size": 1}, r"--config.rollout.group_size: must be >= 2"),
        ({"loss.minibatches": 3}, r"--config.loss.minibatches: 3 does not divide batch_size 16"),
        ({"mesh.data": 3, "mesh.devices": 0}, r"--config.mesh: mesh data×fsdp×tensor = 3×1×1 = 3 "
                                              r"does not match the 8 available devices"),
        ({"advantage.estimator": "gae"}, r"--config.advantage.estimator: must be one of grpo"),
        ({"kl.reward_stage": "pre"}, r"--config.kl.reward_stage: must be one of after_norm, "
                                     r"before_norm, got 'pre'"),
    ],
)
def test_bad_configs_fail_before_compilation(data_dir, changes, match):
  with pytest.raises(grpo.ConfigError, match=match):
    grpo.validate(tiny_config(data_dir, **changes))


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    {},
    {"kl.term": "k1_in_reward_rtg"},
    {"kl.term": "k1_in_reward", "kl.reward_stage": "before_norm"},
    {"kl.term": "k1_in_reward", "kl.reward_stage": "before_norm", "loss.epochs": 2},
    {"kl.term": "k2_as_loss+detached_ratio", "loss.epochs": 2, "loss.minibatches": 2,
     "loss.aggregation": "seq-mean-token-sum-norm", "advantage.estimator": "rloo"},
    {"kl.term": "none", "kl.controller": "adaptive", "kl.reset_ref_every": 1},
    {"kl.controller": "linear_warmup", "kl.warmup_steps": 2, "kl.beta": 0.1},
])
def test_short_runs_write_every_metric(data_dir, tmp_path, changes):
  history = grpo.train(tiny_config(data_dir, **changes), str(tmp_path), progress=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1] and len(history) == 2
  assert REQUIRED <= set(rows[0])
  for r in rows:
    assert all(np.isfinite(v) for v in r.values())
    assert 0.0 <= r["accuracy"] <= 1.0 and r["exact_rkl"] >= -1e-6 and r["entropy"] >= 0
  assert rows[0]["exact_rkl"] == pytest.approx(0.0, abs=1e-6)  # step 0: policy == reference
  assert Checkpointer(str(tmp_path), every=1).latest_step() == 2
  if changes.get("kl.controller") == "linear_warmup":  # β follows the optax schedule per step
    assert [r["beta"] for r in rows] == pytest.approx([0.0, 0.05])


@pytest.mark.slow
def test_without_a_reference_its_metrics_are_absent_not_zero(data_dir, tmp_path):
  """kl.term = "none" without the exact KL runs no reference model: the metrics that compare the
  policy to it are NaN in metrics.jsonl (a false 0 would read as "no drift"), the rest finite."""
  config = tiny_config(data_dir, **{"kl.term": "none", "metrics.exact_kl": False})
  grpo.train(config, str(tmp_path), progress=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert len(rows) == 2 and {"k1", "k2", "k3", "max_log_ratio"} <= set(grpo.REFERENCE_METRICS)
  for r in rows:
    assert all(np.isnan(r[k]) for k in grpo.REFERENCE_METRICS)
    assert all(np.isfinite(v) for k, v in r.items() if k not in grpo.REFERENCE_METRICS)
    assert r["entropy"] > 0


def _whole_sequence_credit(logp, ref_logp, old_logp, mask):
  """before_norm's KL part with σ_g held fixed: every token's score weighted by sg(Σ_s k1_s)."""
  import jax.numpy as jnp

  total = jnp.sum((old_logp - ref_logp) * mask, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(total) * logp


def test_reward_stages_follow_what_grpo_py_says():
  """after_norm (token credit) follows the frozen-prefix ∇RKL, after_norm with reward-to-go and
  before_norm (whole-sequence credit, σ_g fixed) the sequence ∇RKL, by exact enumeration."""
  from kljax import audit

  seq = "sequences, on-policy"
  audit.assert_follows("k1_in_reward", "frozen_reverse", setting=seq, seeds=1)
  audit.assert_follows("k1_in_reward_rtg", "reverse", setting=seq, seeds=1)
  audit.assert_follows(_whole_sequence_credit, "reverse", setting=seq, signature="sequence",
                       seeds=1)
  with pytest.raises(AssertionError):  # token credit is not the sequence gradient
    audit.assert_follows("k1_in_reward", "reverse", setting=seq, seeds=1)


def test_tokens_hash_tells_batches_apart():
  a = np.arange(12, dtype=np.int32).reshape(3, 4)
  assert grpo.tokens_hash(a) == grpo.tokens_hash(a.copy())
  b = a.copy()
  b[2, 3] += 1  # one token differs
  assert grpo.tokens_hash(a) != grpo.tokens_hash(b)
  assert grpo.tokens_hash(a) != grpo.tokens_hash(a.reshape(4, 3))
  assert float(int(grpo.tokens_hash(a))) == grpo.tokens_hash(a) < 2.0**53  # exact in float64


@pytest.mark.slow
def test_non_finite_stops_with_the_last_good_checkpoint_intact(data_dir, tmp_path, monkeypatch):
  # A reward that varies within every group whatever the (random) policy writes, so the first
  # update is non-zero and the huge learning rate blows the parameters up.
  (tmp_path / "parity_reward.py").write_text(
      "def parity(prompts, completions, **_):\n"
      "  return [float(sum(map(ord, c)) % 2) for c in completions]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny_config(data_dir, num_steps=6, **{"optim.learning_rate": 1e30,
                                                  "optim.warmup_steps": 0,
                                                  "reward.fns": ("parity_reward:parity",)})
  with pytest.raises(grpo.NonFiniteError, match=r"non-finite .*The last checkpoint that verifies "
                                                r"is step (\d).*lower the learning rate") as err:
    grpo.train(config, str(tmp_path), progress=False)
  ckpt = Checkpointer(str(tmp_path), every=1)
  good = ckpt.latest_step()
  assert f"verifies is step {good} " in str(err.value)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert good is not None and len(rows) == good  # nothing was written past the last good step
  _, state = grpo.build(config)
  restored = ckpt.restore(state)
  assert restored.step == good and not restored.rejected
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.state.params))


def test_corrupt_checkpoint_gives_a_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir)
  _, state = grpo.build(config)
  ckpt = Checkpointer(str(tmp_path), every=1)
  ckpt.maybe_save(1, state)
  ckpt.close()  # the save is asynchronous
  for root, _, files in os.walk(ckpt.directory):
    for f in files:
      if "array_metadatas" not in root and not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies: step 1: it cannot be "
                                            r"read .* damaged, or written by a different "
                                            r"configuration"):
    Checkpointer(str(tmp_path), every=1).restore(state)


@pytest.mark.slow
def test_sharded_step_equals_single_device(data_dir, sft_dir, tmp_path):
  one = grpo.train(tiny_config(data_dir), str(tmp_path / "one"), init_model=_init(sft_dir),
                   progress=False)
  eight = grpo.train(tiny_config(data_dir, **{"mesh.devices": 0, "mesh.data": 4, "mesh.fsdp": 2}),
                     str(tmp_path / "eight"), init_model=_init(sft_dir), progress=False)
  assert 0 < one[0]["reward_mean"] < 1  # a non-degenerate batch
  for a, b in zip(one, eight):
    for k in a:
      if k not in TIMING:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def _cli(workdir, sft_dir, *extra):
  return [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
          f"--workdir={workdir}", f"--config.model.init={sft_dir}", "--config.num_steps=6",
          "--config.checkpoint_every=2", "--config.batch_size=16", "--config.rollout.group_size=4",
          "--config.rollout.max_new_tokens=3", "--config.metrics.tensorboard=False",
          "--config.mesh.devices=1", *extra]


@pytest.mark.slow
def test_sigkill_and_restart_resumes_like_an_uninterrupted_run(data_dir, sft_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())
  flags = [f"--config.data.data_dir={data_dir}"]
  clean = subprocess.run(_cli(tmp_path / "clean", sft_dir, *flags), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert clean.returncode == 0, clean.stderr[-2000:]

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed_dir, sft_dir, *flags), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (killed_dir / "checkpoints" / "4").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (killed_dir / "checkpoints" / "4").exists()
  resumed = subprocess.run(_cli(killed_dir, sft_dir, *flags), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  assert_same_runs(tmp_path / "clean", killed_dir, steps=6)


def assert_same_runs(clean_dir, resumed_dir, *, steps: int) -> None:
  """The resumed run's metrics rows are the uninterrupted run's, bit for bit (CPU, same seeds),
  timings aside."""
  a = read_jsonl(str(clean_dir / "metrics.jsonl"))
  b = read_jsonl(str(resumed_dir / "metrics.jsonl"))
  assert [r["step"] for r in b] == list(range(steps))
  for ra, rb in zip(a, b):
    for k in ra:
      if k not in TIMING:
        assert rb[k] == ra[k], (ra["step"], k)


def test_real_model_config_validates_and_plot_cli(data_dir, tmp_path):
  spec = importlib.util.spec_from_file_location(
      "grpo_qwen", os.path.join(REPO, "configs", "grpo_qwen_math_gsm8k.py"))
  sys.path.insert(0, REPO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  grpo.validate(config)  # names, divisibility and the fsdp mesh over all 8 devices
  assert config.kl.beta == 0.5 and config.data.name == "gsm8k"
  assert "{question}" in config.data.prompt_template
  spec = importlib.util.spec_from_file_location(
      "grpo_openr1", os.path.join(REPO, "configs", "grpo_qwen_math_openr1.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  paper = module.get_config()
  grpo.validate(paper)
  assert paper.kl.beta == 0.5 and paper.data.name == "openr1_math" and paper.data.manual_dir

  from experiments.plot import plot_runs

  rows = [{"step": s, "reward_mean": s / 10, "exact_rkl": 0.01 * s, "loss": 1.0} for s in range(10)]
  paths = plot_runs({"run": rows}, str(tmp_path), smooth=3)
  # a group whose metrics are absent or constant (here the loss) draws no figure
  assert [os.path.basename(p) for p in paths] == ["reward.png", "kl.png"]
  assert all(os.path.getsize(p) > 0 for p in paths)
