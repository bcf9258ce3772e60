"""Faults injected into tiny GRPO runs: each is survived, or stops with one message that says what
to do. Expected metrics come from an uninterrupted run of the same configuration (bit-identical on
CPU with the same seeds); expected messages name the file, step, flag or holder at fault."""

import errno
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax.train import grpo, runlock
from kljax.train.checkpoint import CheckpointError, Checkpointer
from kljax.train.metrics import MetricsWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import TIMING, _cli, _init, child_xla_flags, tiny_config  # noqa: E402

STEPS, EVERY = 6, 2  # checkpoints 2, 4, 6 are saved; 4 and 6 are kept


def _config(data_dir, **changes):
  return tiny_config(data_dir, num_steps=STEPS, checkpoint_every=EVERY, **changes)


@pytest.fixture(scope="module")
def clean(data_dir, sft_dir, tmp_path_factory):
  """An uninterrupted run: its directory (checkpoints 4 and 6) and its metrics."""
  workdir = str(tmp_path_factory.mktemp("clean"))
  grpo.train(_config(data_dir), workdir, init_model=_init(sft_dir), progress=False)
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(STEPS))
  assert 0 < rows[0]["reward_mean"] < 1  # the policy changes, so a wrong restore would show
  return workdir, rows


def _copy(clean_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(clean_dir, workdir)
  return workdir


def _flip(path, n=64):
  """Inverts `n` bytes in the middle of the file."""
  with open(path, "rb") as f:
    data = bytearray(f.read())
  mid = len(data) // 2
  data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
  with open(path, "wb") as f:
    f.write(data)


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")),
             key=os.path.getsize)


def _same_metrics(got, want):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(want, got):
    for k in a:
      if k not in TIMING:
        assert b[k] == a[k], (a["step"], k)


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damage,why", [
    ("flip", r"array w differs from the digest recorded at save"),
    ("truncate", r"it cannot be read \("),
])
def test_a_damaged_checkpoint_names_its_first_bad_array_and_the_previous_one_is_restored(
    tmp_path, capsys, damage, why):
  state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones(3, jnp.bfloat16),
           "step": jnp.int32(0)}
  ckpt = Checkpointer(str(tmp_path), every=1)
  for step in (1, 2):
    ckpt.maybe_save(step, jax.tree.map(lambda x, s=step: x + s, state))
  ckpt.close()
  path = _largest_array_file(os.path.join(ckpt.directory, "2"))  # w dominates the data
  if damage == "flip":
    _flip(path)
  else:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)

  restored = Checkpointer(str(tmp_path), every=1).restore(state)
  assert restored.step == 1 and [s for s, _ in restored.rejected] == [2]
  assert np.array_equal(restored.state["w"], np.arange(4096, dtype=np.float32) + 1)
  err = capsys.readouterr().err
  assert f"checkpoint step 2 in {ckpt.directory} does not verify: " in err
  assert len(re.findall(why, err)) == 1
  assert "resuming from checkpoint step 1, the newest that verifies" in err
  assert os.path.isdir(tmp_path / "rejected_checkpoints" / "2")  # kept for inspection
  assert Checkpointer(str(tmp_path), every=1).latest_step() == 1


@pytest.mark.slow
def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_previous_one(
    data_dir, sft_dir, clean, tmp_path, capsys):
  clean_dir, clean_rows = clean
  workdir = _copy(clean_dir, tmp_path)
  _flip(_largest_array_file(os.path.join(workdir, "checkpoints", "6")))

  history = grpo.train(_config(data_dir), workdir, init_model=_init(sft_dir), progress=False)
  err = capsys.readouterr().err
  assert "checkpoint step 6 in" in err and "does not verify" in err
  assert "resuming from checkpoint step 4, the newest that verifies" in err
  assert [r["step"] for r in history] == [4, 5]
  assert history[0]["checkpoints_rejected"] == 1 and history[0]["resumed_from_step"] == 4
  _same_metrics(read_jsonl(os.path.join(workdir, "metrics.jsonl")), clean_rows)


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_with_what_to_do(data_dir, clean, tmp_path):
  workdir = _copy(clean[0], tmp_path)
  for step in (4, 6):
    _flip(_largest_array_file(os.path.join(workdir, "checkpoints", str(step))))
  with pytest.raises(CheckpointError, match=r"no checkpoint in \S+ verifies: step 6: .*; step 4: "
                                            r".*Nothing was moved.*move the checkpoints directory "
                                            r"aside or use a new --workdir"):
    grpo.train(_config(data_dir), workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == STEPS  # untouched


@pytest.mark.slow
def test_non_finite_right_after_a_restore_suspects_the_restored_state(data_dir, sft_dir, tmp_path):
  config = _config(data_dir)
  _, state = grpo.build(config, _init(sft_dir))
  poisoned = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params),
                            step=state.step + 2)
  ckpt = Checkpointer(str(tmp_path), every=EVERY)
  ckpt.maybe_save(2, poisoned)  # a checkpoint that verifies: the digest is of what was saved
  ckpt.close()
  with pytest.raises(grpo.NonFiniteError, match=r"step 2: non-finite .*The last checkpoint that "
                                                r"verifies is step 2 .*1 step\(s\) after restoring "
                                                r"checkpoint step 2, so the restored state is the "
                                                r"first suspect"):
    grpo.train(config, str(tmp_path), init_model=_init(sft_dir), progress=False)


# ---------------------------------------------------------------- failed saves


_FULL_DISK = """
import errno, runpy, sys
from orbax.checkpoint._src.serialization import serialization

async def no_space(*args, **kwargs):  # what TensorStore reports on a full filesystem
  raise ValueError("RESOURCE_EXHAUSTED: Error writing in OCDBT database: Failed to write: "
                   "No space left on device [os_error_code='28']")

serialization.async_serialize_from_host = no_space
sys.argv = ["experiments.grpo", *sys.argv[1:]]
runpy.run_module("experiments.grpo", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_message_and_a_rerun_resumes(data_dir, sft_dir, clean,
                                                                    tmp_path):
  workdir = _copy(clean[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # the run resumes at 4 and saves 6
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())  # one CPU device
  cmd = _cli(workdir, sft_dir, f"--config.data.data_dir={data_dir}")
  out = subprocess.run([sys.executable, "-c", _FULL_DISK, *cmd[3:]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  lines = [ln for ln in out.stderr.replace("\r", "\n").splitlines()
           if ln.strip() and not ln.startswith("grpo:")]
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(
      f"CheckpointSaveError: cannot save checkpoint step 6 in {workdir}/checkpoints (")
  assert "MiB free): ValueError: no space left on device" in lines[0]
  assert lines[0].endswith("The last checkpoint that verifies is step 4; free space (or fix the "
                           "cause) and rerun the same command to resume from it.")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[0] == "4"
  assert "6" not in os.listdir(os.path.join(workdir, "checkpoints"))  # at most a temporary dir
  assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == STEPS  # the steps ran

  # Space freed, a rerun restores 4 (test_flipped_bytes_... shows that training on from an older
  # checkpoint reproduces the uninterrupted metrics) and saves 6 over the partial one.
  _, state = grpo.build(_config(data_dir), _init(sft_dir))
  ckpt = Checkpointer(workdir, every=EVERY)
  restored = ckpt.restore(state)
  assert restored.step == 4 and not restored.rejected
  ckpt.maybe_save(6, restored.state)
  ckpt.close()
  assert Checkpointer(workdir, every=EVERY).newest_verified(state) == 6


def test_a_write_error_when_a_save_starts_names_the_step(data_dir, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  state = {"w": jnp.zeros(8)}
  ckpt = Checkpointer(str(tmp_path), every=1)
  ckpt.maybe_save(1, state)
  ckpt.wait()

  def no_space(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(CheckpointError, match=r"cannot save checkpoint step 2 in \S+checkpoints "
                                            r"\(\d+\.\d MiB free\): OSError: no space left on "
                                            r"device.*last checkpoint that verifies is step 1"):
    ckpt.maybe_save(2, state)
  ckpt.close()  # nothing more to report


# ---------------------------------------------------------------- torn metrics


def test_a_torn_metrics_line_is_cut_off_and_every_completed_step_survives(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "reward_mean": s / 10} for s in range(4)]
  complete = "".join(f'{{"step": {r["step"]}, "reward_mean": {r["reward_mean"]}}}\n' for r in rows)
  torn = '{"step": 4, "reward_me'
  path.write_text(complete + torn)
  assert read_jsonl(str(path)) == rows  # a reader skips the line being written

  writer = MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False)
  assert (f"metrics.jsonl: cut off a partial last line ({len(torn)} characters"
          in capsys.readouterr().err)
  writer.write(4, {"reward_mean": 0.4})
  writer.close()
  assert read_jsonl(str(path)) == rows + [{"step": 4, "reward_mean": 0.4}]

  path.write_text(complete.replace('"step": 1,', '"step": 1') + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON .*edited or damaged"):
    MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False)


# ---------------------------------------------------------------- bad paths


@pytest.mark.parametrize("fault,match", [
    ("reward", r"--config.reward.fns: reward function 'no_such_module:score': cannot import module "
               r"'no_such_module'"),
    ("weights", r"--config.reward.weights: 2 weights for 1 functions"),
    ("workdir", r"--workdir: \S+/file/run cannot be created: \S+/file is a file"),
    ("data_dir", r"--config.data.data_dir: \S+/file is not a directory"),
    ("tokenizer", r"--config.model.tokenizer: \S+/nowhere does not exist"),
    ("init", r"--config.model.init: \S+/nowhere/config.json does not exist"),
    ("weightless", r"--config.model.init: \S+/weightless: neither model.safetensors nor "),
])
def test_bad_paths_are_config_errors_before_any_work(data_dir, sft_dir, tmp_path, fault, match):
  (tmp_path / "file").write_text("")
  os.makedirs(tmp_path / "weightless")
  shutil.copy(os.path.join(sft_dir, "config.json"), tmp_path / "weightless")
  changes = {
      "reward": {"reward.fns": ("no_such_module:score",)},
      "weights": {"reward.weights": (1.0, 2.0)},
      "data_dir": {"data.data_dir": str(tmp_path / "file")},
      "tokenizer": {"model.tokenizer": str(tmp_path / "nowhere")},
      "init": {"model.init": str(tmp_path / "nowhere")},
      "weightless": {"model.init": str(tmp_path / "weightless")},
  }.get(fault, {})
  workdir = str(tmp_path / ("file/run" if fault == "workdir" else "run"))
  config = tiny_config(data_dir, **changes)
  with pytest.raises(grpo.ConfigError, match=match):
    grpo.validate(config, workdir)
  grpo.validate(tiny_config(data_dir, **{"model.init": sft_dir}), str(tmp_path / "run"))


@pytest.mark.slow
def test_cli_stops_on_a_bad_reward_path_before_the_warm_start(data_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS=child_xla_flags())  # one CPU device
  cmd = [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}",
         "--config.reward.fns=no_such_module:score"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "--config.reward.fns: reward function 'no_such_module:score'" in out.stderr
  assert not os.path.exists(tmp_path / "run" / "sft")  # no warm start ran


# ---------------------------------------------------------------- one run per directory


@pytest.mark.slow
def test_a_second_run_on_a_held_directory_stops_at_once_naming_the_holder(data_dir, sft_dir,
                                                                          tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from kljax.train import runlock\n"
       f"with runlock.hold({workdir!r}):\n  print('held', flush=True); time.sleep(600)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    env = dict(os.environ, XLA_FLAGS=child_xla_flags())  # one CPU device
    out = subprocess.run(_cli(workdir, sft_dir, f"--config.data.data_dir={data_dir}"), cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (f"RunLockedError: --workdir {workdir} is in use by another run (host "
            f"{socket.gethostname()}, pid {holder.pid}, started ") in out.stderr
    assert sorted(os.listdir(workdir)) == [runlock.LOCK_FILE]  # it wrote nothing
    with pytest.raises(runlock.RunLockedError, match=f"pid {holder.pid}"):
      grpo.train(_config(data_dir), workdir, progress=False)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with runlock.hold(workdir) as path:  # the kernel released the lock with the killed holder
    assert f'"pid": {os.getpid()}' in open(path).read()
