"""Faults of operations on preemptible and shared machines (issue 25), injected into tiny runs:
stop signals, a resume under a changed config, saves that cannot be written, rewards that hang or
return the wrong thing, bad data and models, and config values out of range. Each is survived
(the rerun reproduces the uninterrupted metrics, from test_faults.py's `clean` run) or stops, before
any work where it can, with one line naming the flag, file or function at fault."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kljax.train import grpo
from kljax.train.checkpoint import Checkpointer
from kljax.train.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults import EVERY, STEPS, _config, _same_metrics, clean  # noqa: E402,F401
from test_grpo import REPO, _cli, _init, child_xla_flags  # noqa: E402

# A reward that scores like numeric_match and, at the calls listed in $KLJAX_TEST_SIGNAL_AT, sends
# its own process the signal $KLJAX_TEST_SIGNAL: the signal then arrives during a known step.
SIGNALLING_REWARD = """
import os, signal
from kljax import rewards

_calls = [0]

def score(prompts, completions, **fields):
  _calls[0] += 1
  if _calls[0] in [int(c) for c in os.environ.get("KLJAX_TEST_SIGNAL_AT", "").split(",") if c]:
    os.kill(os.getpid(), getattr(signal, os.environ.get("KLJAX_TEST_SIGNAL", "SIGTERM")))
  return rewards.numeric_match(prompts, completions, **fields)
"""


def _env(tmp_path, **extra):
  """A child's environment: one CPU device, tmp_path/mods importable (test reward modules)."""
  mods = tmp_path / "mods"
  return dict(os.environ, XLA_FLAGS=child_xla_flags(),
              PYTHONPATH=os.pathsep.join([str(mods), REPO, os.environ.get("PYTHONPATH", "")]),
              **extra)


def _module(tmp_path, name, source):
  (tmp_path / "mods").mkdir(exist_ok=True)
  (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(source))


def _lines(stderr):
  """stderr's lines without the progress bar's."""
  return [ln for ln in stderr.replace("\r", "\n").splitlines()
          if ln.strip() and not ln.startswith("grpo:")]


# ---------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigterm_after_step_k_saves_checkpoint_k_and_the_rerun_matches(data_dir, sft_dir,
                                                                       tmp_path):
  _module(tmp_path, "signalling", SIGNALLING_REWARD)
  flags = [f"--config.data.data_dir={data_dir}", "--config.reward.fns=signalling:score"]
  uninterrupted = subprocess.run(_cli(tmp_path / "clean", sft_dir, *flags), cwd=REPO,
                                 env=_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  workdir = tmp_path / "run"
  cmd = _cli(workdir, sft_dir, *flags)
  # scoring step 2 (the third call) sends SIGTERM: step 2 completes, so 3 steps are done
  out = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, KLJAX_TEST_SIGNAL_AT="3"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
  lines = _lines(out.stderr)
  assert lines == [f"kljax: stopped by SIGTERM: checkpoint step 3 saved and verified in "
                   f"{workdir}/checkpoints, metrics flushed; rerun the same command to resume "
                   f"from it."], out.stderr[-3000:]
  assert [r["step"] for r in read_jsonl(str(workdir / "metrics.jsonl"))] == [0, 1, 2]
  assert Checkpointer(str(workdir), every=EVERY).latest_step() == 3  # not the scheduled 2

  rerun = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _same_metrics(read_jsonl(str(workdir / "metrics.jsonl")),
                read_jsonl(str(tmp_path / "clean" / "metrics.jsonl")))


_SIGNALS_SCRIPT = """
import os, signal, sys, time
from kljax.train import preempt

with preempt.on_signals(float(sys.argv[1])) as stop:
  os.kill(os.getpid(), signal.SIGHUP)
  print("asked", stop.name, flush=True)
  if sys.argv[2] == "twice":
    os.kill(os.getpid(), signal.SIGINT)
  time.sleep(60)  # a step, or a save, that does not end
"""


@pytest.mark.parametrize("how", ["twice", "grace"])
def test_a_second_signal_or_the_grace_budget_ends_the_process_at_once(tmp_path, how):
  start = time.time()
  out = subprocess.run([sys.executable, "-c", _SIGNALS_SCRIPT, "1.5" if how == "grace" else "0",
                        how], cwd=REPO, capture_output=True, text=True, timeout=60)
  took = time.time() - start
  assert out.stdout == "asked SIGHUP\n"  # the first signal only asked
  if how == "twice":
    assert out.returncode == 128 + signal.SIGINT and took < 30
    assert out.stderr == ("kljax: second signal (SIGINT) while stopping after SIGHUP: exiting at "
                          "once, without a checkpoint of the steps since the last one.\n")
  else:
    assert out.returncode == 128 + signal.SIGHUP and 1.5 <= took < 30
    assert out.stderr == ("kljax: SIGHUP: the step in progress and its checkpoint did not finish "
                          "within the grace budget (stop_grace_s=1.5); exiting without saving "
                          "them.\n")


# ---------------------------------------------------------------- one config per run directory


def _recorded_run(clean_dir, tmp_path, config):
  """A copy of the uninterrupted run with the config.json the CLI writes for `config`."""
  workdir = str(tmp_path / "run")
  shutil.copytree(clean_dir, workdir)
  grpo.record_config(config, workdir, {})
  return workdir


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_stops_naming_it_unless_meant(data_dir, sft_dir, clean,
                                                                        tmp_path, capsys):
  config = _config(data_dir, **{"model.init": sft_dir})  # what _cli passes
  workdir = _recorded_run(clean[0], tmp_path, config)
  cmd = _cli(workdir, sft_dir, f"--config.data.data_dir={data_dir}", "--config.num_steps=8",
             "--config.optim.learning_rate=0.001")
  out = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert len(_lines(out.stderr)) == 1, out.stderr
  assert (f"--workdir: {workdir} holds a run started with another config (config.json); this "
          f"command changes optim.learning_rate: 0.0005 -> 0.001. A resume may change only "
          in out.stderr)  # num_steps changed too, freely
  assert "--config.resume_changed=True" in out.stderr
  assert Checkpointer(workdir, every=EVERY).latest_step() == STEPS  # no work was done
  assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == STEPS

  # on purpose: continues, and says so on the console, in config.json and in the metrics
  config.optim.learning_rate, config.num_steps, config.resume_changed = 0.001, STEPS + 1, True
  history = grpo.train(config, workdir, init_model=_init(sft_dir), progress=False)
  assert [r["step"] for r in history] == [STEPS]
  assert history[0]["resumed_with_config_changes"] == 1
  assert "optim.learning_rate: 0.0005 -> 0.001" in capsys.readouterr().err
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["optim"]["learning_rate"] == 0.001
  assert recorded["resume_changes"] == [
      {"from_step": STEPS, "changes": {"optim.learning_rate": [0.0005, 0.001]}}]
  assert grpo.check_resume(config, workdir) == {}  # the directory now belongs to the new config


def test_every_trajectory_field_is_compared_and_only_cadence_may_change(data_dir, tmp_path):
  config = _config(data_dir)
  grpo.record_config(config, str(tmp_path), {})
  free = _config(data_dir, stop_grace_s=3.0, **{"metrics.tensorboard": True, "mesh.devices": 0})
  free.num_steps, free.checkpoint_every = 99, 7
  assert grpo.check_resume(free, str(tmp_path)) == {}
  for field, value in [("model.preset", "small"), ("batch_size", 32), ("seed", 1),
                       ("kl.term", "k3_as_loss"), ("kl.beta", 0.1), ("kl.controller", "adaptive"),
                       ("rollout.staleness", 1)]:
    changed = _config(data_dir, **{field: value})
    with pytest.raises(grpo.ConfigError, match=rf"this command changes {field}: \S+ -> "
                                               rf"{value!r}\. A resume"):
      grpo.check_resume(changed, str(tmp_path))


@pytest.mark.slow
def test_a_checkpoint_of_another_structure_is_a_mismatch_not_damage(data_dir, sft_dir, clean,
                                                                   tmp_path):
  from kljax.train.checkpoint import CheckpointMismatchError

  workdir = str(tmp_path / "run")
  shutil.copytree(clean[0], workdir)  # no config.json: the checkpoint itself tells
  with pytest.raises(CheckpointMismatchError, match=r"checkpoint step 6 in \S+ is intact but holds "
                                                    r"another state .*stale_params.*nothing was "
                                                    r"moved"):
    grpo.train(_config(data_dir, **{"rollout.staleness": 1}), workdir,
               init_model=_init(sft_dir), progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert not os.path.exists(os.path.join(workdir, "rejected_checkpoints"))


# ---------------------------------------------------------------- saves that fail: no hang


def _save_threads():
  import threading

  from orbax.checkpoint._src.futures import future

  return [t for t in threading.enumerate() if isinstance(t, future._SignalingThread)
          and t.is_alive()]


def test_a_failed_background_save_names_the_last_good_checkpoint_and_leaves_no_thread(
    tmp_path, monkeypatch):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.serialization import serialization

  from kljax.train.checkpoint import CheckpointSaveError

  state = {"w": jnp.arange(64, dtype=jnp.float32)}
  ckpt = Checkpointer(str(tmp_path), every=1)
  ckpt.maybe_save(1, state)
  ckpt.wait()
  failed, real_restore = ckpt._manager, ocp.CheckpointManager.restore

  async def no_space(*args, **kwargs):  # what TensorStore reports on a full filesystem
    raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device "
                     "[os_error_code='28']")

  def restore(self, *args, **kwargs):  # the failed manager re-raises its save's error
    if self is failed:
      raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    return real_restore(self, *args, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  with pytest.raises(CheckpointSaveError, match=r"cannot save checkpoint step 2 .*no space left "
                                                r"on device.*The last checkpoint that verifies is "
                                                r"step 1; free space \(or fix the cause\)"):
    ckpt.maybe_save(2, state)
    ckpt.wait()
  ckpt.close()
  assert not _save_threads()  # nothing left for the interpreter to wait for at exit


# Replaces WORKDIR/checkpoints by a file while step 1 is scored: the save of step 2 fails mid-run.
CHECKPOINTS_REPLACED = """
import os, shutil, time
from kljax import rewards

_calls = [0]

def score(prompts, completions, **fields):
  _calls[0] += 1
  if _calls[0] == 2:
    folder = os.path.join(os.environ["KLJAX_TEST_WORKDIR"], "checkpoints")
    shutil.rmtree(folder, ignore_errors=True)
    with open(folder, "w") as f:
      f.write("not a folder")
    with open(folder + ".replaced_at", "w") as f:
      f.write(repr(time.time()))
  return rewards.numeric_match(prompts, completions, **fields)
"""


@pytest.mark.slow
def test_checkpoints_folder_replaced_by_a_file_mid_run_ends_within_seconds(data_dir, sft_dir,
                                                                           tmp_path):
  _module(tmp_path, "replacing", CHECKPOINTS_REPLACED)
  workdir = tmp_path / "run"
  out = subprocess.run(_cli(workdir, sft_dir, f"--config.data.data_dir={data_dir}",
                            "--config.reward.fns=replacing:score"),
                       cwd=REPO, env=_env(tmp_path, KLJAX_TEST_WORKDIR=str(workdir)),
                       capture_output=True, text=True, timeout=300)
  ended = time.time()
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert ended - float((workdir / "checkpoints.replaced_at").read_text()) < 30  # not a hang
  lines = _lines(out.stderr)
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f"CheckpointSaveError: cannot save checkpoint step 2 in {workdir}/"
                             f"checkpoints (")
  assert "free space" not in lines[0].split("):", 1)[1]  # not blamed on the disk
  assert lines[0].endswith("The checkpoints folder is no longer a directory (a file is in its "
                           "place) during the run: its checkpoints are lost; restore it, or move "
                           "it aside and rerun the same command to start over.")

  # found before any work the next time
  with pytest.raises(grpo.ConfigError, match=rf"--workdir: {workdir}/checkpoints is a file, where "
                                             rf"the run keeps its checkpoints directory"):
    grpo.validate(_config(data_dir), str(workdir))
  os.remove(workdir / "checkpoints")
  os.makedirs(workdir / "metrics.jsonl.d")
  os.remove(workdir / "metrics.jsonl")
  os.rename(workdir / "metrics.jsonl.d", workdir / "metrics.jsonl")
  with pytest.raises(grpo.ConfigError, match=r"metrics.jsonl is a directory, where the run keeps "
                                             r"its metrics.jsonl file"):
    grpo.validate(_config(data_dir), str(workdir))


# ---------------------------------------------------------------- rewards

import threading  # noqa: E402

from kljax import rewards  # noqa: E402

_RELEASE = threading.Event()  # set at the end of the tests that hang a reward
_HALF = [0]


def never_returns(prompts, completions, **_):
  _RELEASE.wait()
  return [0.0] * len(completions)


def always_fails(prompts, completions, **_):
  raise ValueError("cannot parse")


def half_fail(prompts, completions, **_):
  """The batch call fails; alone, every other sample does: half the samples score 0."""
  _HALF[0] += 1
  if len(completions) > 1 or _HALF[0] % 2:
    raise ValueError("cannot parse")
  return [1.0]


def wrong_signature(completions):
  return [0.0] * len(completions)


@pytest.fixture
def release_hung_rewards():
  _RELEASE.clear()
  yield
  _RELEASE.set()


@pytest.mark.parametrize("returned,said", [
    (["0.5", "1"], r"returned a str \('0.5'\) among its values"),
    (None, r"returned NoneType None"),
    ("1 0", r"returned str '1 0'"),
    (1.0, r"returned float 1.0"),
    ({"a": 1.0}, r"returned a str \('a'\) among its values"),
    ([[1.0], [0.0]], r"returned a list \(\[1.0\]\) among its values"),
    ([1.0], r"returned 1 values"),
    ([1.0, float("nan")], r"returned non-finite values at \[1\]"),
])
def test_every_wrong_return_type_is_a_reward_error(returned, said):
  fn = lambda prompts, completions, **_: returned  # noqa: E731
  for on_error in ("raise", "zero"):
    with pytest.raises(rewards.RewardError, match=said + r"; it must return 2 finite numbers"):
      rewards.score([fn], ["q", "q"], ["a", "b"], on_error=on_error)


def test_a_reward_that_never_returns_is_stopped_at_its_timeout(release_hung_rewards):
  start = time.time()
  with pytest.raises(rewards.RewardError, match=r"reward function test_faults_ops.never_returns "
                                                r"did not return within reward.timeout_s=0.5 s on "
                                                r"a batch of 2"):
    rewards.score([never_returns], ["q", "q"], ["a", "b"], timeout_s=0.5)
  assert 0.5 <= time.time() - start < 5


@pytest.mark.slow
def test_a_run_whose_reward_never_returns_ends_within_the_timeout(data_dir, sft_dir, tmp_path,
                                                                  release_hung_rewards):
  config = _config(data_dir, **{"reward.fns": ("test_faults_ops:never_returns",),
                                "reward.timeout_s": 2.0})
  with pytest.raises(rewards.RewardError, match=r"never_returns did not return within "
                                                r"reward.timeout_s=2 s"):
    grpo.train(config, str(tmp_path), init_model=_init(sft_dir), progress=False)


def test_a_reward_with_the_wrong_signature_stops_before_any_work(data_dir, tmp_path):
  config = _config(data_dir, **{"reward.fns": ("test_faults_ops:wrong_signature",)})
  with pytest.raises(grpo.ConfigError, match=r"--config.reward.fns: reward function "
                                             r"'test_faults_ops:wrong_signature' cannot be called "
                                             r"as fn\(prompts, completions, answer=\[…\], level=\[…\]\) with "
                                             r"the fields of arithmetic/level1"):
    grpo.validate(config, str(tmp_path))
  config.reward.timeout_s = -1.0
  with pytest.raises(grpo.ConfigError, match=r"--config.reward.timeout_s: must be a number of "
                                             r"seconds >= 0"):
    grpo.validate(config)


@pytest.mark.slow
def test_on_error_zero_says_when_many_fail_and_stops_when_all_do(data_dir, sft_dir, tmp_path,
                                                                 capsys):
  half = _config(data_dir, **{"reward.fns": ("test_faults_ops:half_fail",),
                              "reward.on_error": "zero"})
  half.num_steps = 2  # (num_steps=1 trips optax: a cosine decay of 0 steps)
  grpo.train(half, str(tmp_path / "half"), init_model=_init(sft_dir), progress=False)
  assert ("kljax: step 0: 8 of 16 sample scores failed and were scored 0 "
          "(reward.on_error='zero')." in capsys.readouterr().err)

  every = _config(data_dir, **{"reward.fns": ("test_faults_ops:always_fails",),
                               "reward.on_error": "zero"})
  with pytest.raises(rewards.RewardError, match=r"step 0: every reward failed \(16 of 16 sample "
                                                r"scores"):
    grpo.train(every, str(tmp_path / "every"), init_model=_init(sft_dir), progress=False)
  assert read_jsonl(str(tmp_path / "every" / "metrics.jsonl")) == []
  assert Checkpointer(str(tmp_path / "every"), every=EVERY).latest_step() is None


# ---------------------------------------------------------------- config values out of range


@pytest.mark.parametrize("changes,match", [
    ({"optim.learning_rate": -5e-4}, r"--config.optim.learning_rate: must be a finite number >= 0, "
                                     r"got -0.0005 \(a negative rate ascends the loss\)"),
    ({"rollout.temperature": -1.0}, r"--config.rollout.temperature: must be a finite number >= 0"),
    ({"rollout.top_p": 0.0}, r"--config.rollout.top_p: must be in \(0, 1\]"),
    ({"rollout.top_p": 1.5}, r"--config.rollout.top_p: must be in \(0, 1\]"),
    ({"rollout.top_k": -1}, r"--config.rollout.top_k: must be an integer >= 0"),
    ({"stop_grace_s": -1.0}, r"--config.stop_grace_s: must be a number of seconds >= 0"),
])
def test_out_of_range_values_stop_before_any_work(data_dir, changes, match):
  with pytest.raises(grpo.ConfigError, match=match):
    grpo.validate(_config(data_dir, **changes))


def test_greedy_sampling_of_a_group_is_a_warning(data_dir, capsys):
  grpo.validate(_config(data_dir, **{"rollout.temperature": 0.0}))
  grpo.validate(_config(data_dir, **{"rollout.temperature": 0.0}))
  err = capsys.readouterr().err
  assert err == ("kljax: warning: --config.rollout.temperature=0 samples greedily: the 4 "
                 "completions of a prompt are identical, every group's rewards agree and GRPO has "
                 "nothing to learn from; use a temperature > 0.\n")  # once


@pytest.mark.slow
def test_a_parameter_norm_growing_tenfold_warns_naming_the_learning_rate(data_dir, sft_dir,
                                                                         tmp_path, capsys):
  history = grpo.train(_config(data_dir, **{"optim.learning_rate": 1e3}), str(tmp_path),
                       init_model=_init(sft_dir), progress=False)
  norms = [r["param_norm"] for r in history]
  assert max(norms) > 10 * norms[0]  # the fault did happen
  err = capsys.readouterr().err
  assert err.count("kljax: warning: the parameter norm grew from ") == 1
  assert "optim.learning_rate=1000 is likely too large for this model." in err


@pytest.mark.parametrize("args,said", [
    (["--workdir="], "--workdir is empty (an unset shell variable?); name the run directory."),
    (["--workdir=run", "--distributed"],
     "--distributed: coordinator_address should be defined. This host is not a TPU pod or SLURM "
     "job, where it is detected: pass --coordinator=HOST:PORT"),
])
def test_an_empty_workdir_or_distributed_without_a_coordinator_is_one_line(tmp_path, args, said):
  out = subprocess.run([sys.executable, "-m", "experiments.grpo", *args], cwd=tmp_path,
                       env=dict(_env(tmp_path), JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stderr.startswith(f"python -m experiments.grpo: {said}"), out.stderr[-3000:]
  assert len(out.stderr.splitlines()) == 1
  assert os.listdir(tmp_path) == []  # nothing written in the current directory


# ---------------------------------------------------------------- metrics


def test_a_metrics_file_deleted_during_a_run_is_recreated_and_the_loss_named(tmp_path, capsys):
  from kljax.train.metrics import MetricsWriter

  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(0, {"reward_mean": 0.5})
  os.remove(tmp_path / "metrics.jsonl")
  writer.write(1, {"reward_mean": 0.25})
  writer.close()
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "reward_mean": 0.25}]
  assert capsys.readouterr().err == (
      f"kljax: {tmp_path}/metrics.jsonl was deleted during the run: the rows of the steps before "
      f"1 are lost (rerun in a new --workdir to have them); writing from step 1 on.\n")


def test_a_model_init_with_non_finite_weights_is_named_before_any_step(data_dir, sft_dir,
                                                                       tmp_path):
  """NaN weights in model.init: one line naming the flag, the tensor and the file (before, the
  first step's non-finite loss advised lowering the learning rate)."""
  from safetensors.numpy import load_file, save_file

  bad = tmp_path / "bad_init"
  shutil.copytree(sft_dir, bad)
  tensors = load_file(str(bad / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][3, :5] = float("nan")
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  out = subprocess.run(_cli(tmp_path / "run", bad, f"--config.data.data_dir={data_dir}"),
                       cwd=REPO, env=dict(os.environ, XLA_FLAGS=child_xla_flags()),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert (f"--config.model.init: tensor {name} in model.safetensors holds 5 non-finite values"
          in out.stderr)
  assert "Traceback" not in out.stderr and "learning_rate" not in out.stderr
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_distributed_with_a_process_that_never_starts_ends_in_one_line(tmp_path):
  """Process 0 of 2 alone: one line when --init_timeout runs out (JAX would abort with a C++ stack
  dump after 5 silent minutes)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "experiments.grpo", "--config",
                        "configs/grpo_tiny.py", f"--workdir={tmp_path / 'run'}", "--distributed",
                        f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
                        "--init_timeout=4"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and time.time() - start < 60
  assert "waiting up to 4 s for every process to connect" in out.stderr
  assert "not every process connected within 4 s (--init_timeout)" in out.stderr
  assert "Traceback" not in out.stderr and "Check failure" not in out.stderr
